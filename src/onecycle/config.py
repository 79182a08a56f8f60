"""params.yaml, parsed and validated once into frozen dataclasses.

Every stage calls `load_params` first, so a misspelt key, a wrong type or an impossible value stops
it before any work, with one line that names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onecycle import picks
from onecycle.errors import UserError

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
OFFICIAL_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
IMAGE_SIZE = 32  # CIFAR-10 images are 32x32 pixels


@dataclass(frozen=True)
class Rule:
    """How one param is parsed: `parse` returns the clean value or raises ValueError."""

    parse: Callable[[Any], Any]
    allowed: str


def _integer(lo: int, hi: int | None = None) -> Rule:
    def parse(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise ValueError
        return v

    return Rule(parse, f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}")


def _number(lo: float, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False) -> Rule:
    def parse(v: Any) -> float:
        # a quoted '0.5' is a string, not a number: read_yaml already reads 1e-4 (no dot) as a number
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError
        v = float(v)
        if v < lo or (lo_open and v == lo) or (hi is not None and (v > hi or (hi_open and v == hi))):
            raise ValueError
        return v

    left = f"> {lo:g}" if lo_open else f">= {lo:g}"
    right = "" if hi is None else (f" and < {hi:g}" if hi_open else f" and <= {hi:g}")
    return Rule(parse, f"a number {left}{right}")


def _choice(*options: str) -> Rule:
    def parse(v: Any) -> str:
        if v not in options:
            raise ValueError
        return v

    return Rule(parse, "one of " + ", ".join(repr(o) for o in options))


def _boolean() -> Rule:
    def parse(v: Any) -> bool:
        if not isinstance(v, bool):
            raise ValueError
        return v

    return Rule(parse, "true or false")


def _optional(rule: Rule) -> Rule:
    return Rule(lambda v: None if v is None else rule.parse(v), f"null or {rule.allowed}")


def _pattern(regex: str, allowed: str) -> Rule:
    def parse(v: Any) -> str:
        if not isinstance(v, str) or not re.fullmatch(regex, v):
            raise ValueError
        return v

    return Rule(parse, allowed)


def _pair(rule: Rule, allowed: str) -> Rule:
    def parse(v: Any) -> tuple:
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise ValueError
        return tuple(rule.parse(x) for x in v)

    return Rule(parse, allowed)


def _param(default: Any, rule: Rule) -> Any:
    return field(default=default, metadata={"rule": rule})


@dataclass(frozen=True)
class DataParams:
    url: str = _param(OFFICIAL_URL, _pattern(r"\S+", "a URL (https, http, file://) or a local path"))
    md5: str = _param(OFFICIAL_MD5, _pattern(r"[0-9a-f]{32}", "32 lowercase hex digits"))
    train_limit: int | None = _param(None, _optional(_integer(1, 50_000)))  # images; null = all
    test_limit: int | None = _param(None, _optional(_integer(1, 10_000)))  # images; null = all


@dataclass(frozen=True)
class AugmentParams:
    pad: int = _param(4, _integer(0, 16))  # pixels added on each side before the random crop
    crop: int = _param(IMAGE_SIZE, _integer(IMAGE_SIZE, IMAGE_SIZE + 32))  # pixels, side of the random crop
    flip_p: float = _param(0.5, _number(0.0, 1.0))  # probability of a horizontal flip
    cutout: int = _param(8, _integer(0, IMAGE_SIZE))  # pixels, side of the one square hole; 0 = none
    # albumentations: per image on the CPU (the reference); tensor: whole batches on the training device
    # (same distribution); auto: tensor on a GPU, albumentations on the CPU
    backend: str = _param("auto", _choice("auto", "albumentations", "tensor"))


@dataclass(frozen=True)
class ModelParams:
    width: int = _param(64, _integer(1, 1024))  # channels of the PrepLayer; doubled per layer
    # the FC's logits are multiplied by this (David Page's ResNet-9: 0.125); no parameter changes, nor the
    # predicted class: only the loss's temperature, and so the gradients' scale and the best LR
    logit_scale: float = _param(1.0, _number(0.0, lo_open=True))


@dataclass(frozen=True)
class LRFinderParams:
    start_lr: float = _param(1e-4, _number(0.0, lo_open=True))
    end_lr: float = _param(1.0, _number(0.0, lo_open=True))
    num_iter: int = _param(96, _integer(5, 5000))  # optimizer steps in the sweep (98 make one epoch of 50,000)
    step_mode: str = _param("exp", _choice("exp", "linear"))
    # fine: two fine sweeps of the project's design around the lowest loss, their lowest losses times a fitted
    # constant: the closest to the best LRMAX of the LR-finder benchmark's trained grids, in and out of sample, and
    # the one pick that the sweep's own knobs move by less than 1.2x (docs/lr-finder.md)
    pick: str = _param("fine", _choice(*picks.NAMES))
    min_div: float = _param(10.0, _number(1.0, lo_open=True))  # LRMIN = LRMAX / min_div
    smooth_beta: float = _param(0.98, _number(0.0, 1.0, hi_open=True))  # moving-average weight of the loss
    diverge_factor: float = _param(4.0, _number(1.0, lo_open=True))  # stop once smoothed loss > this x best


@dataclass(frozen=True)
class TrainParams:
    epochs: int = _param(24, _integer(1))
    peak_epoch: int = _param(5, _integer(1))  # the LR reaches LRMAX at the last step of this epoch
    batch_size: int = _param(512, _integer(1))  # images per optimizer step
    seed: int = _param(0, _integer(0, 2**32 - 1))
    # momentum at LRMIN and at LRMAX: it moves opposite to the LR
    momentum: tuple[float, float] = _param(
        (0.95, 0.85), _pair(_number(0.0, 1.0, hi_open=True), "a list of two numbers in [0, 1): [at LRMIN, at LRMAX]")
    )
    weight_decay: float = _param(5e-4, _number(0.0))
    # training runs from the found LR range times this (1 keeps the spec: LRMIN and LRMAX as the range test found
    # them); `make lr-check` trains 1/2, 1 and 2 to show where the found range stands
    lr_scale: float = _param(1.0, _number(0.0, lo_open=True))
    nesterov: bool = _param(False, _boolean())  # Nesterov momentum (needs both momentum values > 0)
    # the training loss's label smoothing: the target puts this mass uniformly on all 10 classes (0 = none);
    # the range test sweeps with the same loss. Test loss is always plain cross-entropy
    label_smoothing: float = _param(0.0, _number(0.0, 1.0, hi_open=True))
    # weight decay on BatchNorm weights and biases and on the FC bias too (false: only on conv and FC weights)
    decay_bn_and_bias: bool = _param(True, _boolean())
    # decay per optimizer step of an exponential moving average of the weights (and BN statistics), which is
    # then evaluated, plotted and saved as the model; 0 = none. 0.99 averages over about 100 steps (one epoch)
    ema_decay: float = _param(0.0, _number(0.0, 1.0, hi_open=True))
    device: str = _param("auto", _pattern(r"auto|cpu|cuda(:\d+)?", "'auto', 'cpu', 'cuda' or 'cuda:N'"))
    precision: str = _param("auto", _choice("auto", "fp32", "bf16"))  # auto: bf16 autocast on CUDA, fp32 on CPU
    channels_last: bool = _param(True, _boolean())  # NHWC activations: faster convolutions on CPU and GPU
    compile: bool = _param(False, _boolean())  # torch.compile the model (a warm-up; no faster on an H200)
    # torch.compile's mode when train.compile is true: reduce-overhead captures CUDA graphs (fewer launches),
    # max-autotune also times Triton kernels (a longer warm-up)
    compile_mode: str = _param("default", _choice("default", "reduce-overhead", "max-autotune"))
    # CUDA: time cuDNN's algorithms for each new shape first. Off: on an H200 the timing cost 9 s of a fresh
    # process's first epoch and won nothing after it (docs/h200.md)
    cudnn_benchmark: bool = _param(False, _boolean())


@dataclass(frozen=True)
class Params:
    data: DataParams = DataParams()
    augment: AugmentParams = AugmentParams()
    model: ModelParams = ModelParams()
    lr_finder: LRFinderParams = LRFinderParams()
    train: TrainParams = TrainParams()


def _closest(word: str, options: list[str]) -> str:
    match = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else f" (known: {', '.join(options)})"


def _parse_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"params.yaml: {name} must be a mapping of keys to values, got {raw!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in known:
            raise UserError(f"params.yaml: unknown key {name}.{key}{_closest(str(key), list(known))}")
        rule: Rule = known[key].metadata["rule"]
        try:
            values[key] = rule.parse(value)
        except (ValueError, TypeError):
            raise UserError(f"params.yaml: {name}.{key} = {value!r} is not allowed: use {rule.allowed}") from None
    return cls(**values)


def _check_together(p: Params) -> None:
    """Rules that tie two keys together."""

    def fail(key: str, value: Any, allowed: str) -> None:
        raise UserError(f"params.yaml: {key} = {value!r} is not allowed: use {allowed}")

    if p.train.peak_epoch >= p.train.epochs:
        fail("train.peak_epoch", p.train.peak_epoch, f"an integer from 1 to train.epochs - 1 = {p.train.epochs - 1}")
    if p.lr_finder.end_lr <= p.lr_finder.start_lr:
        fail("lr_finder.end_lr", p.lr_finder.end_lr, f"a number > lr_finder.start_lr = {p.lr_finder.start_lr:g}")
    if p.augment.crop > IMAGE_SIZE + 2 * p.augment.pad:
        fail("augment.crop", p.augment.crop, f"an integer from {IMAGE_SIZE} to 32 + 2 * augment.pad")
    if p.augment.cutout > p.augment.crop:
        fail("augment.cutout", p.augment.cutout, f"an integer from 0 to augment.crop = {p.augment.crop}")
    if p.train.nesterov and min(p.train.momentum) == 0:
        fail("train.nesterov", True, "false, or train.momentum values > 0: Nesterov momentum needs a momentum")


def parse_params(raw: Any) -> Params:
    """Validate a params mapping (as read from params.yaml) into Params; raise UserError naming the key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError("params.yaml must be a mapping of sections (data, augment, model, lr_finder, train)")
    sections = {f.name: type(f.default) for f in dataclasses.fields(Params)}  # name -> its dataclass
    for name in raw:
        if name not in sections:
            raise UserError(f"params.yaml: unknown section {name!r}{_closest(str(name), list(sections))}")
    params = Params(**{name: _parse_section(name, sections[name], raw[name]) for name in raw})
    _check_together(params)
    return params


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but reading 1e-4 (an exponent, no dot) as a number, as YAML 1.2 and DVC do.

    PyYAML follows YAML 1.1, where a float needs a dot (1.0e-4), so `weight_decay: 5e-4` would be a string.
    """


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """YAML text -> Python values, numbers read as DVC reads them (`dvc exp run -S train.weight_decay=1e-3`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # safe: a SafeLoader subclass builds plain values only


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = read_yaml(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no params file at {path}: run from the repository root, where params.yaml is") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from None
    try:
        return parse_params(raw)
    except UserError as exc:
        raise UserError(f"{exc}{_exp_run_hint()}") from None


def _exp_run_hint() -> str:
    """How to get params.yaml back after `dvc exp run -S` in the workspace: DVC writes the -S values into the file
    (and rewrites its layout: `null` becomes empty, lists are reflowed) and leaves it so when the run fails. A
    queued or --temp experiment runs in a copy, whose working folder is not DVC_ROOT, and leaves the file alone."""
    root = os.environ.get("DVC_ROOT")
    if os.environ.get("DVC_EXP_NAME") and root and Path(root).resolve() == Path.cwd().resolve():
        return (
            ". `dvc exp run -S` wrote its values into params.yaml and left them there: `git diff params.yaml` shows "
            "them, `git checkout params.yaml` restores the file"
        )
    return ""


def flatten(params: Params) -> dict[str, Any]:
    """{"train.epochs": 24, ...}: every param under its dotted name (for tracking), lists as params.yaml has
    them ([0.95, 0.85], not the tuple the dataclass holds)."""
    return {
        f"{section}.{key}": list(value) if isinstance(value, tuple) else value
        for section, values in dataclasses.asdict(params).items()
        for key, value in values.items()
    }
