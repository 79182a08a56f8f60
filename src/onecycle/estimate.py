"""What a run will cost, said before it costs it: the range test times its first steps, training its first epoch,
and each prints one note when the rest will take longer than ONECYCLE_WARN_MINUTES (15 by default). Nothing is
refused: the note says what the wait will be and how to make it shorter.
"""

from __future__ import annotations

import math
import os
import time

from tqdm import tqdm

from onecycle import lr_finder, picks, schedules
from onecycle.config import Params
from onecycle.errors import UserError

WARN_ENV = "ONECYCLE_WARN_MINUTES"
WARN_MINUTES = 15.0  # minutes: a longer run prints its estimate
TIMED_STEPS = 1  # range-test steps timed after the first, which pays for allocations and warm-up: at
# width 64 on a 2-core AMD EPYC (11.8 s a step) the note came 33 s into the range test (50 s with 2 timed steps)
# An evaluated image costs about a third of a trained one: a forward pass (a backward pass is about two), no
# augmentation, no optimizer step.
EVAL_COST = 1 / 3


def warn_seconds() -> float:
    """ONECYCLE_WARN_MINUTES in seconds (UserError when it is not a number of minutes >= 0)."""
    raw = os.environ.get(WARN_ENV, "").strip()
    if not raw:
        return WARN_MINUTES * 60
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if not minutes >= 0 or math.isinf(minutes):
        raise UserError(f"{WARN_ENV}={raw!r} is not a number of minutes (0 or more); unset it for {WARN_MINUTES:g}")
    return minutes * 60


def duration(seconds: float) -> str:
    """'about 10 h 5 min', 'about 25 min', 'about 40 s'."""
    if seconds >= 3600:
        hours, minutes = divmod(round(seconds / 60), 60)
        return f"about {hours} h {minutes} min"
    if seconds >= 60:
        return f"about {round(seconds / 60)} min"
    return f"about {round(seconds)} s"


def run_steps(params: Params, train_images: int, test_images: int) -> float:
    """The whole run in training steps of train.batch_size: the range test (with its fine sweep, when the pick reads
    one), every epoch's steps and its evaluation (EVAL_COST a step per batch of test images)."""
    train = params.train
    per_epoch = schedules.steps_per_epoch(train_images, train.batch_size)
    per_eval = math.ceil(test_images / train.batch_size) * EVAL_COST
    sweeps = params.lr_finder.num_iter + (lr_finder.FINE_STEPS if picks.RULES[params.lr_finder.pick].needs_fine else 0)
    return sweeps + train.epochs * (per_epoch + per_eval)


def faster(params: Params, device_type: str) -> str:
    """The ways to a shorter run, for the note."""
    ways = [] if device_type == "cuda" else ["a GPU (train.device: auto uses CUDA when there is one)"]
    ways.append("`make quick` (2,000 images, width 16, 8 epochs)")
    width = params.model.width
    if width > 16:  # FLOP per image go with the width squared (model.training_flop)
        ways.append(f"a smaller model.width (width 16 costs 1/{(width / 16) ** 2:g} of width {width} in FLOP)")
    else:
        ways.append("fewer images (data.train_limit)")
    return "; ".join(ways)


class SweepTimer:
    """The range test's `on_step(i)` callback: after its first 1 + TIMED_STEPS steps, the whole run's cost at the
    speed of the timed steps, printed once when it exceeds the threshold."""

    def __init__(self, params: Params, train_images: int, test_images: int, device_type: str) -> None:
        self.params, self.device_type = params, device_type
        self.total_steps = run_steps(params, train_images, test_images)
        self.limit = warn_seconds()  # read now: a bad value stops the stage before the sweep
        self.started: float | None = None

    def __call__(self, step: int) -> None:
        if step == 0:  # after the first step: the timed ones start here
            self.started = time.perf_counter()
        elif step == TIMED_STEPS and self.started is not None:
            per_step = (time.perf_counter() - self.started) / TIMED_STEPS  # seconds
            total = per_step * self.total_steps
            if total > self.limit:
                p = self.params
                tqdm.write(
                    f"note: at {per_step:.3g} s a step on {self.device_type} (model.width {p.model.width}, batch "
                    f"{p.train.batch_size}), the range test and {p.train.epochs} epochs will take {duration(total)}. "
                    f"Faster: {faster(p, self.device_type)}. Carrying on."
                )


def after_first_epoch(seconds: float, epoch: int, params: Params, device_type: str) -> None:
    """Training's own estimate, once its first epoch in this process (`epoch`, which took `seconds`) has ended."""
    epochs = params.train.epochs - epoch
    left = epochs * seconds
    if left > warn_seconds():
        print(
            f"note: epoch {epoch} took {seconds:.0f} s: the {epochs} epoch{'s' * (epochs != 1)} left will take "
            f"{duration(left)} (model.width {params.model.width} on {device_type}). "
            f"Faster: {faster(params, device_type)}.",
            flush=True,
        )
