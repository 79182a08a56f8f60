"""The LR range test: one sweep of training steps with a rising LR, and the rule that reads LRMAX off it.

Loss method (Smith 2017, fastai): the LR rises exponentially from lr_finder.start_lr to end_lr over
num_iter steps; the loss is smoothed with a bias-corrected moving average; the sweep stops once the
smoothed loss exceeds diverge_factor x its best. The reference run's accuracy method (accuracy against a
linearly rising LR) is the same sweep with step_mode: linear and pick: max_acc, at the cost of one
sweep (at most about one epoch) instead of the reference's 20 one-epoch trainings.

The sweep trains the model it is given; its weights and the optimizer come back exactly as they were.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from onecycle import batches, outputs, picks, schedules, steps, training
from onecycle.config import LRFinderParams, Params, TrainParams, flatten
from onecycle.data import Dataset
from onecycle.errors import UserError
from onecycle.model import build_model

# The train keys the sweep reads (dvc.yaml lists them as the stage's params, so a change reruns it): its batches,
# seed, optimizer, loss, precision and memory layout, as training runs them
SWEEP_TRAIN_KEYS = (
    "train.batch_size",
    "train.seed",
    "train.momentum",
    "train.weight_decay",
    "train.nesterov",
    "train.label_smoothing",
    "train.decay_bn_and_bias",
    "train.precision",
    "train.channels_last",
    "train.device",
)

# The keys that the pick reads and the sweep does not (dvc.yaml lists them as the stage's params too). A change to
# these alone reruns the stage, which then re-picks from the curve saved under the sweep's inputs (saved_sweep):
# the same lr_range.json as a new sweep would give, without its cost (at full width, 10 to 20 minutes on a CPU).
PICK_KEYS = (
    "lr_finder.pick",
    "lr_finder.min_div",
    "train.epochs",  # the training's length in steps, which the default pick (budget) reads
)
PICK_TRAIN_KEYS = tuple(k for k in PICK_KEYS if k.startswith("train."))

CSV_COLUMNS = ("iteration", "lr", "loss", "smoothed_loss", "accuracy", "smoothed_accuracy")
FINE_CSV_COLUMNS = ("round", *CSV_COLUMNS)  # lr_range_fine.csv: the fine sweeps, one after the other

# The fine sweeps (fine_sweep), for a rule that reads them (picks.Rule.needs_fine): FINE_ROUNDS more sweeps of a
# fresh model with the same seed, whose design is the project's, not lr_finder.*: FINE_STEPS steps (16 per
# decade), exponential, from the lowest-loss LR of the sweep before / FINE_BELOW to that LR x FINE_ABOVE, smoothed
# and stopped as the defaults do. The user's knobs reach them only through where the first sweep's lowest loss
# lies, and the second round is centred by the first alone: over 4 seeds, the knobs moved the first round's lowest
# loss by up to 1.52x, the mean of both rounds' by up to 1.18x (docs/lr-finder.md, the knob tables).
FINE_BELOW, FINE_ABOVE, FINE_STEPS, FINE_ROUNDS = 100.0, 10.0, 48, 2


@dataclass(frozen=True)
class Curve:
    """What the sweep saw, one entry per step taken (accuracy: of the batch, in percent, before the step)."""

    lr: list[float]
    loss: list[float]
    smoothed_loss: list[float]
    accuracy: list[float]
    smoothed_accuracy: list[float]
    stop_reason: str  # "finished", "diverged" (smoothed loss > diverge_factor x best) or "non-finite loss"
    images_seen: int
    fine: Curve | None = None  # the fine sweep around this one (fine_sweep), when the pick reads one

    @classmethod
    def of(cls, saved: dict) -> Curve:
        """The curve that dataclasses.asdict gave `saved` (save_sweep), its fine sweep with it."""
        fine = saved.get("fine")
        return cls(**(saved | {"fine": cls.of(fine) if fine else None}))

    def rows(self) -> list[tuple]:
        return [
            (i, *values)
            for i, values in enumerate(
                zip(self.lr, self.loss, self.smoothed_loss, self.accuracy, self.smoothed_accuracy, strict=True)
            )
        ]


@dataclass(frozen=True)
class LRRange:
    lr_min: float
    lr_max: float
    pick: str
    min_div: float
    lr_at_min_loss: float  # LR where the smoothed loss was lowest
    min_smoothed_loss: float
    note: str = ""  # why the rule gave this LRMAX, when it fell back to another rule

    def as_dict(self, curve: Curve, train_images: int) -> dict:
        rounds = fine_rounds(curve)
        images = curve.images_seen + sum(r.images_seen for r in rounds)
        return {
            "lr_min": self.lr_min,
            "lr_max": self.lr_max,
            "pick": self.pick,
            "min_div": self.min_div,
            "lr_at_min_loss": self.lr_at_min_loss,
            "min_smoothed_loss": self.min_smoothed_loss,
            "note": self.note,
            "iterations": len(curve.lr),
            "stop_reason": curve.stop_reason,
            "images_seen": images,  # every sweep's, the fine ones' too
            "epochs_of_training_set": images / train_images,  # the range test's cost, in epochs
            "fine_sweeps": [
                {"start_lr": r.lr[0], "iterations": len(r.lr), "stop_reason": r.stop_reason} for r in rounds
            ],
        }


def fine_rounds(curve: Curve) -> list[Curve]:
    """The fine sweeps under `curve` (each the `fine` of the one before), first to last."""
    rounds = []
    while curve.fine is not None:
        curve = curve.fine
        rounds.append(curve)
    return rounds


def smooth(values: list[float], beta: float) -> list[float]:
    """The bias-corrected moving average of `values` (weight `beta` on the past), as the sweep smooths its loss
    and accuracy step by step: the first values are not pulled towards 0."""
    average, out = 0.0, []
    for i, value in enumerate(values):
        average = beta * average + (1 - beta) * value
        out.append(average / (1 - beta ** (i + 1)))
    return out


def sweep_lr(i: int, params: LRFinderParams) -> float:
    """LR of the i-th step (0-based) of the sweep: start_lr at 0, end_lr at num_iter - 1."""
    fraction = i / (params.num_iter - 1)
    if params.step_mode == "exp":
        return params.start_lr * (params.end_lr / params.start_lr) ** fraction
    return params.start_lr + (params.end_lr - params.start_lr) * fraction


def range_test(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    params: LRFinderParams,
    *,
    options: steps.StepOptions | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> Curve:
    """Run the sweep on `model`, each step's forward pass and loss as training runs them (`options`), then put
    the model and optimizer back exactly as they were. `on_step(i)` is called after the i-th step (0-based)."""
    options = options or steps.StepOptions()
    model_state = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    lrs, losses, smoothed, accs, smoothed_accs = [], [], [], [], []
    loss_avg = acc_avg = 0.0
    best = math.inf
    stop_reason, images = "finished", 0
    model.train()
    try:
        bar = tqdm(range(params.num_iter), desc="LR range test", disable=not progress)
        for i in bar:
            lr = sweep_lr(i, params)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = next(batches)
            logits = options.forward(model, x)
            loss = options.loss(logits, y)
            value = loss.item()
            if not math.isfinite(value):
                stop_reason = "non-finite loss"
                break
            accuracy = (logits.argmax(1) == y).float().mean().item() * 100
            # bias-corrected moving averages: the first values are not pulled towards 0
            loss_avg = params.smooth_beta * loss_avg + (1 - params.smooth_beta) * value
            acc_avg = params.smooth_beta * acc_avg + (1 - params.smooth_beta) * accuracy
            correction = 1 - params.smooth_beta ** (i + 1)
            lrs.append(lr)
            losses.append(value)
            smoothed.append(loss_avg / correction)
            accs.append(accuracy)
            smoothed_accs.append(acc_avg / correction)
            images += len(y)
            bar.set_postfix(lr=f"{lr:.2e}", loss=f"{smoothed[-1]:.4f}")
            best = min(best, smoothed[-1])
            if smoothed[-1] > params.diverge_factor * best:
                stop_reason = "diverged"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if on_step:
                on_step(i)
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        model.train(was_training)
    return Curve(lrs, losses, smoothed, accs, smoothed_accs, stop_reason, images)


def sweep_of(curve: Curve, params: LRFinderParams, train_steps: int | None = None) -> picks.Sweep:
    """The curve as the rules read it, with its fine sweep (whose design is fine_params')."""
    return picks.Sweep(
        *(np.asarray(v, dtype=float) for v in (curve.lr, curve.loss, curve.smoothed_loss, curve.accuracy)),
        np.asarray(curve.smoothed_accuracy, dtype=float),
        params.num_iter,
        train_steps,
        fine=sweep_of(curve.fine, dataclasses.replace(params, num_iter=FINE_STEPS)) if curve.fine else None,
    )


def fine_params(params: LRFinderParams, anchor: float) -> LRFinderParams:
    """The fine sweep's design around `anchor` (FINE_*): what is left of `params` is the pick's keys."""
    defaults = LRFinderParams()
    return dataclasses.replace(
        params, start_lr=anchor / FINE_BELOW, end_lr=anchor * FINE_ABOVE, num_iter=FINE_STEPS, step_mode="exp",
        smooth_beta=defaults.smooth_beta, diverge_factor=defaults.diverge_factor,
    )  # fmt: skip


def fine_anchor(curve: Curve, params: LRFinderParams) -> float:
    """The LR the fine sweep's window is set around: `curve`'s lowest loss (picks.lowest_loss_lr)."""
    return picks.lowest_loss_lr(sweep_of(dataclasses.replace(curve, fine=None), params))


def fine_designs(curve: Curve, params: LRFinderParams) -> list[LRFinderParams]:
    """The design of each fine sweep (fine_params) that `curve`'s fine sweeps, as far as it has them, call for:
    the first around `curve`'s lowest loss, each next one around the lowest loss of the one before."""
    designs, finder = [], params
    for around in [curve, *fine_rounds(curve)][:FINE_ROUNDS]:
        finder = fine_params(params, fine_anchor(around, finder))
        designs.append(finder)
    return designs


def fine_sweep(params: Params, dataset: Dataset, device: torch.device, curve: Curve, *, progress: bool = True) -> Curve:
    """The FINE_ROUNDS fine sweeps around `curve`'s lowest loss (fine_designs): each a fresh model with the same
    seed and batches. Returned as the first, the next one as its `fine`."""
    rounds: list[Curve] = []
    for i in range(FINE_ROUNDS):
        finder = fine_designs(nest(curve, rounds), params.lr_finder)[i]
        rounds.append(sweep(dataclasses.replace(params, lr_finder=finder), dataset, device, progress=progress))
    return nest(curve, rounds).fine


def nest(curve: Curve, rounds: list[Curve]) -> Curve:
    """`curve` with `rounds` under it, each the `fine` of the one before (fine_rounds' inverse)."""
    nested = None
    for fine in reversed(rounds):
        nested = dataclasses.replace(fine, fine=nested)
    return dataclasses.replace(curve, fine=nested)


def for_pick(curve: Curve, params: Params, dataset: Dataset, device: torch.device, *, progress: bool = True) -> Curve:
    """`curve` as lr_finder.pick reads it: with its fine sweeps when the rule reads them (picks.Rule.needs_fine;
    swept here unless `curve` has them, centred where fine_designs says), else without, so that the outputs are the
    same whatever an earlier pick saved."""
    if not picks.RULES[params.lr_finder.pick].needs_fine or not curve.lr:
        return dataclasses.replace(curve, fine=None)
    rounds, designs = fine_rounds(curve), fine_designs(curve, params.lr_finder)
    if len(rounds) == FINE_ROUNDS and [r.lr[0] for r in rounds] == [d.start_lr for d in designs]:
        return curve  # the saved ones are still centred where they should be
    return dataclasses.replace(curve, fine=fine_sweep(params, dataset, device, curve, progress=progress))


def pick_range(curve: Curve, params: LRFinderParams, train_steps: int | None = None) -> LRRange:
    """LRMAX by the rule `params.pick` (picks.RULES), LRMIN = LRMAX / min_div; UserError when the curve shows no
    range. A rule that finds nothing on the curve leaves LRMAX to min_loss, and `note` says why. `train_steps`:
    the optimizer steps of the One Cycle's climb to LRMAX in the training the range serves."""
    if not curve.lr:
        raise UserError(
            f"the LR range test saw a non-finite loss at its first step (LR {params.start_lr:g}): no range found; "
            "lower lr_finder.start_lr, or check the data"
        )
    sweep = sweep_of(curve, params, train_steps)
    loss, lr = sweep.smoothed_loss, sweep.lr
    best = int(np.argmin(loss))
    if best < 2 or loss[best] >= loss[0]:
        seen = (
            f"the smoothed loss went from {loss[0]:.4g} to {loss[best]:.4g} (lowest, at LR {lr[best]:.3g}) over "
            f"{len(lr)} steps up to LR {lr[-1]:.3g}, which ended {curve.stop_reason}"
        )
        raise UserError(
            f"the loss never fell in the LR range test: {seen}. Lower lr_finder.start_lr, "
            "or raise lr_finder.num_iter so that the sweep has room to descend"
        )
    lr_max, note = picks.RULES[params.pick].pick(sweep), ""
    if lr_max is None:
        lr_max = picks.min_loss(sweep)
        note = (
            f"{params.pick} found nothing on this curve (an accuracy that never rose; for acc_drop, one still "
            "above half its gain when the sweep stopped: raise lr_finder.end_lr to let it fall; for budget, no "
            "training length given; or too few steps for the rule), so LRMAX is min_loss's"
        )
    return LRRange(
        lr_min=lr_max / params.min_div,
        lr_max=lr_max,
        pick=params.pick,
        min_div=params.min_div,
        lr_at_min_loss=float(lr[best]),
        min_smoothed_loss=float(loss[best]),
        note=note,
    )


def read_range(path: Path) -> dict:
    """The lr_range.json that the lr_range_test stage wrote, with float lr_min and lr_max."""
    try:
        found = json.loads(Path(path).read_text())
        found["lr_min"], found["lr_max"] = float(found["lr_min"]), float(found["lr_max"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is missing or damaged ({exc}); run `dvc repro lr_range_test`") from None
    if not 0 < found["lr_min"] < found["lr_max"] or not math.isfinite(found["lr_max"]):
        raise UserError(f"{path} holds no usable range (lr_min {found['lr_min']}, lr_max {found['lr_max']})")
    return found


def training_range(found: dict, train: TrainParams) -> tuple[float, float]:
    """(LRMIN, LRMAX) that training runs with: the found range (read_range) times train.lr_scale."""
    return found["lr_min"] * train.lr_scale, found["lr_max"] * train.lr_scale


def sweep(
    params: Params,
    dataset: Dataset,
    device: torch.device,
    *,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> Curve:
    """The range test's sweep: a fresh model (seeded by train.seed) trained on the training batches as training
    would see them, with a rising LR. A batch size or peak epoch that training could not use stops it first."""
    training.check_fits(params.train, len(dataset.train.labels))
    torch.manual_seed(params.train.seed)
    options = steps.StepOptions.of(params.train, device)  # precision, memory layout and loss of training
    model = options.place(build_model(params.model), device)
    # momentum of the One Cycle's peak: the sweep looks for the LR that is safe at LRMAX
    optimizer = steps.make_optimizer(model, params.train, params.lr_finder.start_lr, params.train.momentum[1])
    loader = batches.TrainLoader(dataset, params.augment, params.train.batch_size, device)
    sweep_batches = loader.endless(seed=params.train.seed)
    return range_test(
        model, optimizer, sweep_batches, params.lr_finder, options=options, progress=progress, on_step=on_step
    )


def pick(curve: Curve, params: Params, train_images: int) -> LRRange:
    """LRMAX off `curve` by lr_finder.pick, for a training of train.epochs on `train_images` images (UserError
    when the curve shows no range)."""
    training.check_fits(params.train, train_images)
    steps_per_epoch = schedules.steps_per_epoch(train_images, params.train.batch_size)
    return pick_range(curve, params.lr_finder, params.train.epochs * steps_per_epoch)


def find_range(
    params: Params,
    dataset: Dataset,
    device: torch.device,
    *,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> tuple[Curve, LRRange]:
    """The sweep (and the fine sweep around it, when the pick reads one), then the pick off the curve."""
    curve = sweep(params, dataset, device, progress=progress, on_step=on_step)
    curve = for_pick(curve, params, dataset, device, progress=progress)
    return curve, pick(curve, params, len(dataset.train.labels))


def sweep_inputs(params: Params, data_meta: dict, device: torch.device) -> dict:
    """Everything a sweep's curve depends on: the params it reads (every augment, model and lr_finder key but the
    pick's, and SWEEP_TRAIN_KEYS), the data (download_cifar's meta.json), the library's code but the pick rules',
    torch and the device with its CPU kernels. Two sweeps with the same inputs give the same curve, bit for bit,
    on the CPU."""
    flat = flatten(params)
    read = {
        k: v
        for k, v in flat.items()
        if (k.split(".")[0] in ("augment", "model", "lr_finder") or k in SWEEP_TRAIN_KEYS) and k not in PICK_KEYS
    }
    return {
        "params": read,
        "data": {k: v for k, v in data_meta.items() if k != "source_url"},  # the same archive read from elsewhere
        "code": code_digest(Path(__file__).parent),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
    }


def code_digest(library: Path) -> str:
    """The sha256 of the library's modules, but picks.py: the pick rules read the curve, they do not make it."""
    code = hashlib.sha256()
    for module in sorted(Path(library).glob("*.py")):
        if module.name != "picks.py":
            code.update(module.name.encode() + b"\0" + module.read_bytes())
    return code.hexdigest()


def saved_path(folder: Path, inputs: dict) -> Path:
    """Where the sweep of these inputs is saved in `folder`: a file named by their digest."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return Path(folder) / f"{digest[:20]}.json"


def saved_sweep(folder: Path, inputs: dict) -> Curve | None:
    """The curve a sweep with these inputs saved in `folder` (save_sweep), or None when there is none (or it is
    unreadable: then the stage sweeps again)."""
    path = saved_path(folder, inputs)
    try:
        saved = json.loads(path.read_text())
        if saved["inputs"] != json.loads(json.dumps(inputs)):
            return None
        return Curve.of(saved["curve"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_sweep(folder: Path, inputs: dict, curve: Curve) -> Path:
    """Keep `curve` (and its fine sweep) under its inputs, so that a change of a key only the pick reads re-picks
    from it. The fine sweep depends on the curve and those inputs alone."""
    path = saved_path(folder, inputs)
    outputs.write_json(path, {"inputs": inputs, "curve": dataclasses.asdict(curve)})
    return path
