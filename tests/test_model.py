from __future__ import annotations

import pytest
import torch
from torch import nn

from onecycle.config import ModelParams
from onecycle.model import CustomResNet, build_model


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_default_width_has_the_reference_parameter_count():
    model = build_model(ModelParams())
    assert _count(model) == 6_573_130


def test_width_sets_channels_64_128_256_512_doubling_per_layer():
    model = build_model(ModelParams(width=64))
    assert model.prep.conv.out_channels == 64
    assert model.layer1.conv.conv.out_channels == 128
    assert model.layer1.res.block2.conv.out_channels == 128
    assert model.layer2.conv.conv.out_channels == 256
    assert model.layer3.conv.conv.out_channels == 512
    assert model.layer3.res.block2.conv.out_channels == 512
    assert (model.fc.in_features, model.fc.out_features) == (512, 10)


@pytest.mark.parametrize("width", [4, 8])
def test_width_scales_every_layer(width):
    model = CustomResNet(width)
    assert model.prep.conv.in_channels == 3
    assert model.prep.conv.out_channels == width
    assert model.layer1.conv.conv.out_channels == 2 * width
    assert model.layer2.conv.conv.out_channels == 4 * width
    assert model.layer3.conv.conv.out_channels == 8 * width
    assert model.fc.in_features == 8 * width


@pytest.mark.parametrize("width", [4, 8])
def test_logits_have_shape_batch_by_10(width):
    torch.manual_seed(0)
    model = CustomResNet(width).eval()
    with torch.no_grad():
        out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()


def test_forward_returns_logits_not_probabilities():
    # The loss is cross-entropy on logits; a softmax inside the model would make rows sum to 1.
    torch.manual_seed(0)
    model = CustomResNet(4).eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 32, 32))
    assert not torch.allclose(out.sum(dim=1), torch.ones(4))


def test_convolutions_carry_no_bias_and_are_3x3_stride_1_pad_1():
    convs = [m for m in CustomResNet(4).modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 8  # prep, layer1 conv + 2 res, layer2 conv, layer3 conv + 2 res
    for conv in convs:
        assert conv.bias is None
        assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)


def _execution_order(model: nn.Module, module: nn.Module) -> list[str]:
    """Kinds of the leaf modules under `module`, in the order they run during a forward pass of `model`."""
    order: list[str] = []
    leaf_types = (nn.Conv2d, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU, nn.Linear)
    names = {nn.Conv2d: "conv", nn.MaxPool2d: "maxpool", nn.BatchNorm2d: "bn", nn.ReLU: "relu", nn.Linear: "fc"}
    handles = [
        m.register_forward_hook(lambda mod, inp, out: order.append(names[type(mod)]))
        for m in module.modules()
        if isinstance(m, leaf_types)
    ]
    with torch.no_grad():
        model.eval()(torch.randn(2, 3, 32, 32))
    for handle in handles:
        handle.remove()
    return order


def test_layers_run_conv_then_maxpool_then_bn_then_relu():
    model = CustomResNet(4)
    conv_bn_relu = ["conv", "bn", "relu"]
    assert _execution_order(model, model.prep) == conv_bn_relu
    assert _execution_order(model, model.layer1) == ["conv", "maxpool", "bn", "relu", *conv_bn_relu * 2]
    assert _execution_order(model, model.layer2) == ["conv", "maxpool", "bn", "relu"]
    assert _execution_order(model, model.layer3) == ["conv", "maxpool", "bn", "relu", *conv_bn_relu * 2]
    assert model.layer2.res is None


def test_whole_network_order_ends_with_maxpool_4_then_fc():
    model = CustomResNet(4)
    order = _execution_order(model, model)
    assert order[-2:] == ["maxpool", "fc"]
    assert model.pool.kernel_size == 4
    assert order.count("maxpool") == 4  # three halvings 32 -> 4, then 4 -> 1


def test_spatial_sizes_halve_per_layer_down_to_1x1():
    model = CustomResNet(4).eval()
    shapes = {}
    for name in ("prep", "layer1", "layer2", "layer3", "pool"):
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert shapes == {
        "prep": (2, 4, 32, 32),
        "layer1": (2, 8, 16, 16),
        "layer2": (2, 16, 8, 8),
        "layer3": (2, 32, 4, 4),
        "pool": (2, 32, 1, 1),
    }


@pytest.mark.parametrize("layer_name", ["layer1", "layer3"])
def test_residual_layer_outputs_x_plus_resblock_of_x(layer_name):
    torch.manual_seed(0)
    model = CustomResNet(4).eval()
    layer = getattr(model, layer_name)
    seen = {}
    layer.conv.register_forward_hook(lambda m, i, o: seen.__setitem__("x", o.clone()))
    layer.res.register_forward_hook(lambda m, i, o: seen.update(res_in=i[0].clone(), res_out=o.clone()))
    layer.register_forward_hook(lambda m, i, o: seen.__setitem__("out", o.clone()))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert torch.equal(seen["res_in"], seen["x"])  # the ResBlock reads X, the conv branch's output
    assert seen["res_out"].abs().sum() > 0  # so the sum below is not trivially X
    torch.testing.assert_close(seen["out"], seen["x"] + seen["res_out"])


def test_silencing_the_resblock_leaves_the_plain_path():
    # With the ResBlock's last BN zeroed, R = ReLU(0) = 0, so layer1 must output exactly X.
    torch.manual_seed(0)
    model = CustomResNet(4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model.layer1(model.prep(x))
        nn.init.zeros_(model.layer1.res.block2.bn.weight)
        nn.init.zeros_(model.layer1.res.block2.bn.bias)
        after = model.layer1(model.prep(x))
        plain = model.layer1.conv(model.prep(x))
    assert torch.equal(after, plain)
    assert not torch.allclose(before, plain)


def test_gradients_reach_the_first_conv():
    torch.manual_seed(0)
    model = CustomResNet(4).train()
    loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model.prep.conv.weight.grad is not None
    assert model.prep.conv.weight.grad.abs().sum() > 0
