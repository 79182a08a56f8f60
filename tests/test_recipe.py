"""The recipe knobs (model.logit_scale, train.nesterov, train.label_smoothing, train.decay_bn_and_bias,
train.ema_decay): what each one does to the model, the optimizer, the loss and the trained weights."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from onecycle import batches, data, lr_finder, training
from onecycle.config import ModelParams, Params, TrainParams, parse_params
from onecycle.errors import UserError
from onecycle.model import build_model

CPU = torch.device("cpu")


def test_logit_scale_multiplies_the_logits_and_changes_no_parameter_nor_prediction():
    x = torch.randn(8, 3, 32, 32)
    torch.manual_seed(0)
    plain = build_model(ModelParams(width=4)).eval()
    torch.manual_seed(0)
    scaled = build_model(ModelParams(width=4, logit_scale=0.125)).eval()
    assert torch.allclose(scaled(x), 0.125 * plain(x), atol=1e-6)
    assert torch.equal(scaled(x).argmax(1), plain(x).argmax(1))
    assert scaled.state_dict().keys() == plain.state_dict().keys()  # model.pt loads at any scale
    assert sum(p.numel() for p in build_model(ModelParams(logit_scale=0.125)).parameters()) == 6_573_130


def test_nesterov_steps_along_the_momentum_look_ahead():
    w = torch.nn.Parameter(torch.tensor([1.0]))
    model = torch.nn.Module()
    model.w = w
    params = TrainParams(nesterov=True, weight_decay=0.0, momentum=(0.9, 0.9))
    optimizer = training.make_optimizer(model, params, lr=0.1)
    assert optimizer.param_groups[0]["nesterov"] is True
    for _ in range(2):  # constant gradient 1: buffer 1 then 1.9; Nesterov steps by g + momentum x buffer
        w.grad = torch.tensor([1.0])
        optimizer.step()
    assert w.item() == pytest.approx(1.0 - 0.1 * (1 + 0.9 * 1) - 0.1 * (1 + 0.9 * 1.9))


def test_nesterov_without_momentum_is_refused_naming_the_key():
    with pytest.raises(UserError, match=r"train.nesterov = True is not allowed: use false, or train.momentum"):
        parse_params({"train": {"nesterov": True, "momentum": [0.9, 0.0]}})


def test_label_smoothing_spreads_the_target_over_the_classes_in_training_only():
    logits, y = torch.randn(16, 10), torch.randint(0, 10, (16,))
    options = training.StepOptions.of(TrainParams(label_smoothing=0.2), CPU)
    log_p = F.log_softmax(logits, 1)
    expected = (0.8 * F.nll_loss(log_p, y) - 0.2 * log_p.mean(1).mean()).item()
    assert options.loss(logits, y).item() == pytest.approx(expected, rel=1e-6)
    assert training.StepOptions.of(TrainParams(), CPU).loss(logits, y).item() == pytest.approx(
        F.cross_entropy(logits, y).item()
    )
    # the test loss stays plain cross-entropy, so runs with and without smoothing compare
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    x = torch.randn(16, 3, 32, 32)
    test_loss, _, _ = training.evaluate(model, [(x, y)], options)
    assert test_loss == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)


@pytest.mark.parametrize("decay_bn_and_bias", [True, False])
def test_decay_bn_and_bias_false_leaves_batchnorm_and_biases_undecayed(decay_bn_and_bias):
    model = build_model(ModelParams(width=4))
    params = TrainParams(weight_decay=0.5, decay_bn_and_bias=decay_bn_and_bias)
    optimizer = training.make_optimizer(model, params, lr=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # BN biases start at 0, where decay would show nothing
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # only the weight decay moves the weights
    optimizer.step()
    for name, p in model.named_parameters():
        decayed = not torch.equal(p.detach(), before[name])
        assert decayed == (decay_bn_and_bias or p.ndim > 1), name
        if decayed:
            assert torch.allclose(p.detach(), before[name] * (1 - 0.1 * 0.5))
    assert any(".bn." in name for name, _ in model.named_parameters())  # the BN parameters were checked


def fit_tiny(archive, epochs: int = 2, **train) -> tuple[torch.nn.Module, list[training.EpochRecord], Params]:
    path, md5 = archive
    params = parse_params(
        {
            "data": {"url": str(path), "md5": md5},
            "model": {"width": 4},
            "train": {"epochs": epochs, "peak_epoch": 1, "batch_size": 32, "device": "cpu", **train},
        }
    )
    dataset = data.decode_archive(path, params.data)
    torch.manual_seed(0)
    model = build_model(params.model)
    history = training.fit(model, dataset, params, 0.02, 0.2, CPU, progress=False)
    return model, history, params


def distance(a: torch.nn.Module, b: dict[str, torch.Tensor]) -> float:
    return sum((p.detach() - b[name]).norm().item() for name, p in a.named_parameters())


def test_ema_evaluates_and_returns_the_moving_average_of_the_weights(tiny_archive):
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in build_model(ModelParams(width=4)).named_parameters()}
    raw, raw_history, _ = fit_tiny(tiny_archive)
    slow, slow_history, params = fit_tiny(tiny_archive, ema_decay=0.999)
    fast, _, _ = fit_tiny(tiny_archive, ema_decay=1e-9)
    # a decay near 0 follows the weights; 0.999 over 8 steps stays near where training started
    assert distance(fast, dict(raw.named_parameters())) < 1e-4
    assert distance(slow, start) < 0.1 * distance(raw, start)
    # the model returned (saved and plotted by the stages) is the one each epoch evaluated
    dataset = data.decode_archive(tiny_archive[0], params.data)
    test = batches.eval_batches(dataset.test, dataset.mean, dataset.std, 32, CPU)
    loss, correct, total = training.evaluate(slow, test, training.StepOptions.of(params.train, CPU))
    assert 100 * correct / total == slow_history[-1].test_acc and loss == pytest.approx(slow_history[-1].test_loss)
    assert [r.train_loss for r in slow_history] == [r.train_loss for r in raw_history]  # training itself is unchanged


def test_a_run_with_ema_resumes_as_an_uninterrupted_one(tiny_archive, tmp_path):
    whole, whole_history, params = fit_tiny(tiny_archive, epochs=3, ema_decay=0.9)
    dataset = data.decode_archive(tiny_archive[0], params.data)
    checkpoint = tmp_path / "ckpt.pt"

    def stop_after_epoch_1(record):
        if record.epoch == 2:
            raise KeyboardInterrupt  # the checkpoint then holds epoch 1

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        training.fit(build_model(params.model), dataset, params, 0.02, 0.2, CPU, checkpoint_path=checkpoint,
                     on_epoch=stop_after_epoch_1, progress=False)  # fmt: skip
    resume = training.Checkpoint.load(checkpoint, training.fingerprint(params, 0.02, 0.2))
    assert resume is not None and len(resume.history) == 1 and resume.ema is not None
    torch.manual_seed(0)
    resumed = build_model(params.model)
    history = training.fit(resumed, dataset, params, 0.02, 0.2, CPU, resume=resume, progress=False)
    strip = [dataclasses.replace(r, seconds=0.0) for r in history]
    assert strip == [dataclasses.replace(r, seconds=0.0) for r in whole_history]
    assert all(
        torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True)
    )


def test_the_range_test_sweeps_with_the_training_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    x, y = torch.randn(32, 3, 4, 4), torch.randint(0, 10, (32,))
    expected = F.cross_entropy(model(x), y, label_smoothing=0.3).item()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    options = training.StepOptions(label_smoothing=0.3)
    sweep = lr_finder.LRFinderParams(num_iter=5)
    curve = lr_finder.range_test(model, optimizer, iter([(x, y)] * 5), sweep, options=options, progress=False)
    assert curve.loss[0] == pytest.approx(expected, rel=1e-6)  # the first step: the untrained model's loss


def test_testing_the_last_epoch_only_trains_the_same_and_gives_the_same_final_accuracy(tiny_archive):
    every, every_history, params = fit_tiny(tiny_archive, epochs=3)
    dataset = data.decode_archive(tiny_archive[0], params.data)
    torch.manual_seed(0)
    last = build_model(params.model)
    last_history = training.fit(last, dataset, params, 0.02, 0.2, CPU, progress=False, test_every_epoch=False)
    # the research tools' option: the same steps, the final test alone (earlier epochs' test figures are NaN)
    assert [r.train_loss for r in last_history] == [r.train_loss for r in every_history]
    assert (last_history[-1].test_acc, last_history[-1].test_loss) == (
        every_history[-1].test_acc,
        every_history[-1].test_loss,
    )
    assert all(math.isnan(r.test_acc) and math.isnan(r.test_loss) for r in last_history[:-1])
    assert all(torch.equal(a, b) for a, b in zip(last.state_dict().values(), every.state_dict().values(), strict=True))
