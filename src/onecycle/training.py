"""Training with the One Cycle Policy: train_one_epoch / evaluate / fit, with checkpoints to resume from.

The loop counts optimizer steps itself and sets the LR and momentum of every step from
`schedules.one_cycle`. Each epoch's shuffle and augmentations come from (train.seed, epoch), so a run
resumed from its checkpoint after epoch k replays epochs k+1.. exactly as an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from onecycle import batches, distributed, outputs, schedules
from onecycle.config import Params, TrainParams, flatten
from onecycle.data import Dataset
from onecycle.distributed import SINGLE, Group
from onecycle.errors import UserError
from onecycle.steps import StepOptions, make_optimizer

HISTORY_COLUMNS = ("epoch", "lr", "momentum", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    lr: float  # at the epoch's last step
    momentum: float  # at the epoch's last step
    train_loss: float  # mean cross-entropy per image over the epoch, as trained (augmented, weights moving)
    train_acc: float  # percent
    test_loss: float  # mean cross-entropy per test image after the epoch
    test_acc: float  # percent
    seconds: float  # wall clock of the epoch, training and evaluation

    def line(self, epochs: int, test_correct: int, test_total: int) -> str:
        return (
            f"epoch {self.epoch:>2}/{epochs}  lr {self.lr:.5f}  momentum {self.momentum:.4f}  "
            f"train loss {self.train_loss:.4f} acc {self.train_acc:.2f}%  "
            + (
                f"test loss {self.test_loss:.4f} acc {self.test_acc:.2f}% ({test_correct}/{test_total})  "
                if test_total  # this epoch was evaluated
                else ""
            )
            + f"{self.seconds:.1f} s"
        )


class Diverged(UserError):
    """A non-finite loss: the LR range is too high for this run."""


def _diverged(value: float, epoch: int, step: int, batch_id: int, lr: float) -> Diverged:
    return Diverged(
        f"the loss became {value} at epoch {epoch}, step {step} (batch {batch_id}), LR {lr:.4g}: training "
        "diverged. Lower the LR range (train.lr_scale: 0.5, or another lr_finder.pick, or a lower lr_finder.end_lr). "
        "Earlier outputs were left as they were"
    )


def train_one_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Iterator[tuple[torch.Tensor, torch.Tensor]],
    schedule: list[tuple[float, float]],
    *,
    first_step: int,
    epoch: int,
    steps: int,
    options: StepOptions = StepOptions(),
    group: Group = SINGLE,
    after_step: Callable[[], None] | None = None,
    progress: bool = True,
) -> tuple[float, int, int]:
    """One pass over `data`, setting (lr, momentum) = schedule[step] before each optimizer step, and calling
    `after_step()` after it (the weights' moving average).

    Returns this process's (loss summed over images, correct, images). Raises Diverged at a non-finite loss,
    on every process at once (under torchrun the loss checked is the sum over processes). On CUDA the
    losses and counts stay on the device until the epoch ends (no synchronisation per step); a non-finite
    loss is then reported at the end of its epoch, with its exact step.
    """
    model.train()
    device = next(model.parameters()).device
    losses, sizes = [], []  # per step: mean loss (a device tensor), images
    correct = torch.zeros((), dtype=torch.int64, device=device)
    bar = tqdm(data, total=steps, desc=f"epoch {epoch}", leave=False, disable=not progress)
    for batch_id, (x, y) in enumerate(bar):
        step = first_step + batch_id
        lr, momentum = schedule[step]
        for param_group in optimizer.param_groups:
            param_group["lr"], param_group["momentum"] = lr, momentum
        logits = options.forward(model, x)
        loss = options.loss(logits, y)
        if options.check_every_step:
            value = loss.item()
            if not math.isfinite(distributed.all_sum([value], group, device)[0]):
                raise _diverged(value, epoch, step, batch_id, lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step:
            after_step()
        losses.append(loss.detach())
        sizes.append(len(y))
        correct += (logits.argmax(1) == y).sum()
        if options.check_every_step:
            # the reference run's progress line: loss of this batch, batch index, running accuracy
            running = 100 * correct.item() / sum(sizes)
            bar.set_description(f"Loss={value:.4f} Batch_id={batch_id} Accuracy={running:.2f}")
    per_step = torch.stack(losses).double().cpu()  # the epoch's one synchronisation on CUDA
    bad = torch.flatten(torch.nonzero(~torch.isfinite(per_step)))
    if distributed.all_sum([float(len(bad))], group, device)[0]:
        first = int(bad[0]) if len(bad) else 0
        raise _diverged(float(per_step[first]), epoch, first_step + first, first, schedule[first_step + first][0])
    return float((per_step * torch.tensor(sizes, dtype=torch.float64)).sum()), int(correct), sum(sizes)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: Iterator[tuple[torch.Tensor, torch.Tensor]], options: StepOptions = StepOptions()
) -> tuple[float, int, int]:
    """(mean loss per image, correct, total) on `data`."""
    model.eval()
    device = next(model.parameters()).device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: one synchronisation at the end
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for x, y in data:
        logits = options.forward(model, x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        total += len(y)
    return float(loss_sum) / total, int(correct), total


@torch.no_grad()
def predict(
    model: torch.nn.Module, data: Iterator[tuple[torch.Tensor, torch.Tensor]], options: StepOptions = StepOptions()
) -> torch.Tensor:
    """Predicted class of every image of `data`, in order (on the CPU), computed as training evaluates."""
    model.eval()
    return torch.cat([options.forward(model, x).argmax(1).cpu() for x, _ in data])


def fingerprint(params: Params, lr_min: float, lr_max: float) -> str:
    """What a checkpoint must match to be resumed: every param but the device, and the LR range."""
    values = {k: v for k, v in flatten(params).items() if k != "train.device"}
    values.update(lr_min=lr_min, lr_max=lr_max)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=list).encode()).hexdigest()


@dataclass
class Checkpoint:
    fingerprint: str
    history: list[EpochRecord]
    model: dict
    optimizer: dict
    torch_rng: torch.Tensor
    extra: dict = dataclasses.field(default_factory=dict)  # the caller's, kept as given (fit's `extra`)
    ema: dict | None = None  # the weights' moving average (train.ema_decay > 0)

    def save(self, path: Path) -> None:
        state = dataclasses.asdict(self) | {"history": [dataclasses.asdict(r) for r in self.history]}
        outputs.torch_save(state, path)

    @classmethod
    def load(cls, path: Path, expected_fingerprint: str, *, quiet: bool = False) -> Checkpoint | None:
        """The checkpoint at `path` if it belongs to this very run (same params and LR range), else None."""
        say = (lambda _: None) if quiet else print
        if not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a damaged checkpoint is not worth stopping for: start afresh
            say(f"ignoring the unreadable checkpoint {path} ({exc}); starting afresh")
            return None
        if state.get("fingerprint") != expected_fingerprint:
            say(f"params or LR range changed since the checkpoint {path}: starting afresh")
            return None
        if set(state) != {f.name for f in dataclasses.fields(cls)}:
            say(f"ignoring the checkpoint {path}, written by another version of this code; starting afresh")
            return None
        state["history"] = [EpochRecord(**r) for r in state["history"]]
        return cls(**state)


def check_fits(train: TrainParams, n_images: int, world: int = 1) -> None:
    """Stop a run that cannot train on `n_images` training images, naming the param to change. The stages
    call it before any work (the range test before its sweep, the training stage before it starts tracking)."""
    if train.batch_size > n_images:
        raise UserError(
            f"train.batch_size = {train.batch_size} is more than the {n_images} training images, so every batch "
            "would be the whole set: lower train.batch_size, or raise data.train_limit"
        )
    smallest_batch = n_images % train.batch_size or train.batch_size
    if smallest_batch < world:
        raise UserError(
            f"train.batch_size = {train.batch_size} leaves a batch of {smallest_batch} images, fewer than the "
            f"{world} processes: every process needs at least one image of every batch"
        )
    steps = schedules.steps_per_epoch(n_images, train.batch_size)
    try:
        schedules.one_cycle_peak_step(train.epochs, train.peak_epoch, steps)
    except ValueError as exc:
        raise UserError(
            f"cannot build the One Cycle schedule from {n_images} images in batches of {train.batch_size}: {exc}"
        ) from None


def fit(
    model: torch.nn.Module,
    dataset: Dataset,
    params: Params,
    lr_min: float,
    lr_max: float,
    device: torch.device,
    *,
    group: Group = SINGLE,
    checkpoint_path: Path | None = None,
    resume: Checkpoint | None = None,
    extra: dict | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
    progress: bool = True,
    test_every_epoch: bool = True,
) -> list[EpochRecord]:
    """Train `model` for train.epochs with the One Cycle Policy between lr_min and lr_max.

    With `checkpoint_path`, every finished epoch is saved there, with `extra` (what the caller needs to resume
    its own part, e.g. the tracking run: plain values, as torch.load(weights_only=True) reads them back);
    `resume`, a checkpoint of this run (`Checkpoint.load`), continues after its last epoch.
    `on_epoch(record)` is called after each epoch (tracking). Under torchrun (`group`), every process trains
    on its shard of each batch and rank 0 alone evaluates, prints, checkpoints and calls `on_epoch`; the
    history is returned on rank 0 (empty elsewhere).
    `test_every_epoch=False` evaluates the last epoch alone (the others' test_loss and test_acc are NaN): for a
    study that reads the final accuracy only, the per-epoch evaluation is arithmetic it throws away.
    """
    train = params.train
    n_images = len(dataset.train.labels)
    check_fits(train, n_images, group.world)
    steps = schedules.steps_per_epoch(n_images, train.batch_size)
    try:
        schedule = schedules.one_cycle_table(train, steps, lr_min, lr_max)
    except ValueError as exc:
        raise UserError(f"cannot build the One Cycle schedule: {exc}") from None
    options = StepOptions.of(train, device)
    options.place(model, device)
    if device.type == "cuda":
        # train.cudnn_benchmark: time cuDNN's algorithms once per input shape and keep the fastest
        torch.backends.cudnn.benchmark = train.cudnn_benchmark
    optimizer = make_optimizer(model, train, lr_min)
    # train.ema_decay: a moving average of the weights and BN statistics, updated after every step; it is what
    # each epoch evaluates, and its weights end up in `model`
    ema = None
    if train.ema_decay:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(train.ema_decay), use_buffers=True)
    key = fingerprint(params, lr_min, lr_max)
    history: list[EpochRecord] = []
    if resume:
        model.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.optimizer)
        if ema and resume.ema:
            ema.load_state_dict(resume.ema)
        torch.set_rng_state(resume.torch_rng)
        history = list(resume.history)
        if group.is_main:
            print(f"resuming after epoch {len(history)} of {train.epochs}")
    # DDP averages the gradients over the processes; it and torch.compile wrap the model for training passes
    net = model
    if group.active:
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    if train.compile:
        net = torch.compile(net, mode=train.compile_mode)
    loader = batches.TrainLoader(dataset, params.augment, train.batch_size, device)
    test = batches.EvalSet(dataset.test, dataset.mean, dataset.std, device) if group.is_main else None

    for epoch in range(len(history) + 1, train.epochs + 1):
        start = time.perf_counter()
        data = loader.epoch(seed=train.seed, epoch=epoch, rank=group.rank, world=group.world)
        first_step = (epoch - 1) * steps
        sums = train_one_epoch(
            net, optimizer, data, schedule, first_step=first_step, epoch=epoch, steps=steps, options=options,
            group=group, after_step=(lambda: ema.update_parameters(model)) if ema else None,
            progress=progress and group.is_main,
        )  # fmt: skip
        loss_sum, correct_sum, seen = distributed.all_sum(list(sums), group, device)
        if group.is_main:
            evaluated = ema.module if ema else model
            if test_every_epoch or epoch == train.epochs:
                test_loss, correct, total = evaluate(evaluated, test.batches(train.batch_size), options)
            else:
                test_loss, correct, total = float("nan"), 0, 0
            lr, momentum = schedule[first_step + steps - 1]
            seconds = time.perf_counter() - start
            train_loss, train_acc = loss_sum / seen, 100 * correct_sum / seen
            test_acc = 100 * correct / total if total else float("nan")
            record = EpochRecord(epoch, lr, momentum, train_loss, train_acc, test_loss, test_acc, seconds)
            history.append(record)
            print(record.line(train.epochs, correct, total), flush=True)
            if on_epoch:
                on_epoch(record)
            if checkpoint_path:
                rng = torch.get_rng_state()
                averaged = ema.state_dict() if ema else None
                state = Checkpoint(key, history, model.state_dict(), optimizer.state_dict(), rng, extra or {}, averaged)
                state.save(checkpoint_path)
    distributed.barrier(group)
    if ema:  # the model that was evaluated is the one the caller saves and plots
        model.load_state_dict(ema.module.state_dict())
    return history
