"""params.yaml: the defaults of CONTRACT.md, and one clear line for each kind of bad param."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from onecycle.config import Params, flatten, load_params, parse_params
from onecycle.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_are_the_contract_defaults():
    params = load_params(ROOT / "params.yaml")
    assert params == Params()
    assert params.data.url == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    assert params.data.md5 == "c32a1d4ab5d03f1284b67883e8d87530"
    assert (params.train.epochs, params.train.peak_epoch, params.train.batch_size) == (24, 5, 512)
    assert params.model.width == 64 and params.lr_finder.min_div == 10
    assert (params.augment.pad, params.augment.crop, params.augment.flip_p, params.augment.cutout) == (4, 32, 0.5, 8)


def test_every_key_of_params_yaml_is_known_and_every_known_key_is_in_it():
    assert set(flatten(Params())) == {f"{s}.{k}" for s, keys in repo_params().items() for k in keys}


def test_params_are_frozen():
    with pytest.raises(AttributeError):
        Params().train.epochs = 3


def test_numbers_written_like_1e_4_are_read_as_numbers_and_quoted_numbers_are_refused(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    # YAML 1.1 (PyYAML) reads 1e-5 and 2e-3, with no dot, as strings; DVC (YAML 1.2) and this project as numbers
    edited = text.replace("start_lr: 1.0e-4", "start_lr: 1e-5").replace("weight_decay: 5.0e-4", "weight_decay: 2E+3")
    assert edited.count("1e-5") == 1 and edited.count("2E+3") == 1
    path = tmp_path / "params.yaml"
    path.write_text(edited)
    params = load_params(path)
    assert (params.lr_finder.start_lr, params.train.weight_decay) == (1e-5, 2000.0)
    # a quoted number is a string: refused, naming the key, like any other wrong type
    path.write_text(text.replace("flip_p: 0.5", "flip_p: '0.5'"))
    with pytest.raises(UserError, match=r"augment.flip_p = '0.5' is not allowed: use a number >= 0 and <= 1"):
        load_params(path)


def test_list_params_are_tracked_as_the_lists_params_yaml_has():
    assert flatten(Params())["train.momentum"] == [0.95, 0.85]  # MLflow logs "[0.95, 0.85]", not a tuple's "(...)"


def edit(path: str, value):
    raw = repo_params()
    section, key = path.split(".")
    raw[section][key] = value
    return raw


BAD = [
    # misspelt keys: the closest valid one is named
    (edit("train.epoch", 3), "unknown key train.epoch (did you mean 'epochs'?)"),
    (edit("data.ulr", "x"), "unknown key data.ulr (did you mean 'url'?)"),
    (edit("lr_finder.min_dif", 5), "unknown key lr_finder.min_dif (did you mean 'min_div'?)"),
    ({**repo_params(), "trian": {}}, "unknown section 'trian' (did you mean 'train'?)"),
    # wrong types
    (edit("train.epochs", "24"), "train.epochs = '24' is not allowed: use an integer >= 1"),
    (edit("train.epochs", 2.5), "train.epochs = 2.5 is not allowed: use an integer >= 1"),
    (edit("train.batch_size", True), "train.batch_size = True is not allowed: use an integer >= 1"),
    (edit("augment.flip_p", "half"), "augment.flip_p = 'half' is not allowed: use a number >= 0 and <= 1"),
    (edit("train.momentum", 0.9), "train.momentum = 0.9 is not allowed: use a list of two numbers in [0, 1)"),
    (edit("data.train_limit", "all"), "data.train_limit = 'all' is not allowed: use null or an integer"),
    ({**repo_params(), "train": [1, 2]}, "train must be a mapping"),
    # impossible values
    (edit("train.batch_size", 0), "train.batch_size = 0 is not allowed: use an integer >= 1"),
    (edit("train.peak_epoch", 30), "train.peak_epoch = 30 is not allowed: use an integer from 1 to train.epochs - 1"),
    (edit("train.peak_epoch", 24), "train.peak_epoch = 24 is not allowed"),
    (edit("train.epochs", 0), "train.epochs = 0 is not allowed"),
    (edit("augment.flip_p", 1.5), "augment.flip_p = 1.5 is not allowed"),
    (edit("augment.pad", -1), "augment.pad = -1 is not allowed: use an integer from 0 to 16"),
    (edit("augment.cutout", 40), "augment.cutout = 40 is not allowed: use an integer from 0 to 32"),
    (edit("augment.crop", 48), "augment.crop = 48 is not allowed: use an integer from 32 to 32 + 2 * augment.pad"),
    (edit("model.width", 0), "model.width = 0 is not allowed"),
    (edit("lr_finder.start_lr", 0), "lr_finder.start_lr = 0 is not allowed: use a number > 0"),
    (edit("lr_finder.end_lr", 1e-5), "lr_finder.end_lr = 1e-05 is not allowed: use a number > lr_finder.start_lr"),
    (edit("lr_finder.min_div", 1), "lr_finder.min_div = 1 is not allowed: use a number > 1"),
    (edit("lr_finder.step_mode", "log"), "lr_finder.step_mode = 'log' is not allowed: use one of 'exp', 'linear'"),
    (edit("lr_finder.pick", "best"), "lr_finder.pick = 'best' is not allowed: use one of 'min_loss', 'min_loss_div10'"),
    (edit("lr_finder.smooth_beta", 1.0), "lr_finder.smooth_beta = 1.0 is not allowed: use a number >= 0 and < 1"),
    (edit("lr_finder.num_iter", 2), "lr_finder.num_iter = 2 is not allowed: use an integer from 5 to 5000"),
    # acc_drop smooths the curve with an n x n kernel: 5,000 steps (50 epochs) is 200 MB, far more would not fit
    (edit("lr_finder.num_iter", 10_000), "lr_finder.num_iter = 10000 is not allowed: use an integer from 5 to 5000"),
    (edit("train.momentum", [0.95, 1.2]), "train.momentum = [0.95, 1.2] is not allowed"),
    (edit("train.weight_decay", -0.1), "train.weight_decay = -0.1 is not allowed: use a number >= 0"),
    (edit("train.weight_decay", ".nan"), "train.weight_decay = '.nan' is not allowed"),
    (edit("train.device", "gpu"), "train.device = 'gpu' is not allowed: use 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    (edit("data.md5", "abc"), "data.md5 = 'abc' is not allowed: use 32 lowercase hex digits"),
    (edit("data.test_limit", 0), "data.test_limit = 0 is not allowed"),
    (edit("train.seed", -1), "train.seed = -1 is not allowed"),
    (edit("train.cudnn_benchmark", "yes"), "train.cudnn_benchmark = 'yes' is not allowed: use true or false"),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[m.split(" is ")[0][:40] for _, m in BAD])
def test_bad_param_names_key_value_and_what_is_allowed(raw, message):
    with pytest.raises(UserError) as info:
        parse_params(copy.deepcopy(raw))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_broken_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochs: [1,\n")
    with pytest.raises(UserError, match="is not valid YAML"):
        load_params(bad)
    with pytest.raises(UserError, match="no params file at"):
        load_params(tmp_path / "absent.yaml")
