"""The custom ResNet for CIFAR-10 (the "ResNet-9" of the One Cycle assignment).

    prep    Conv3x3 -> BN -> ReLU                                   w     x 32 x 32
    layer1  X = Conv3x3 -> MaxPool2d(2) -> BN -> ReLU; X + Res(X)   2w    x 16 x 16
    layer2  Conv3x3 -> MaxPool2d(2) -> BN -> ReLU                   4w    x  8 x  8
    layer3  X = Conv3x3 -> MaxPool2d(2) -> BN -> ReLU; X + Res(X)   8w    x  4 x  4
    pool    MaxPool2d(4)                                            8w    x  1 x  1
    fc      Linear(8w -> 10)                                        10 logits (x model.logit_scale)

where Res = (Conv3x3 -> BN -> ReLU) x 2 at the same width. With w = 64 (the default model.width) the
channels are 64-128-256-512 and the model has 6,573,130 parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from onecycle.config import ModelParams

NUM_CLASSES = 10  # CIFAR-10


class ConvBNReLU(nn.Module):
    """Conv3x3 (stride 1, pad 1) -> [MaxPool2d(2)] -> BN -> ReLU.

    The conv has no bias: the BN right after it subtracts the mean, which would cancel any bias anyway.
    Pooling sits between the conv and the BN, as the spec orders it.
    """

    def __init__(self, in_channels: int, out_channels: int, pool: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()  # halves height and width
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (N, out, H, W)
        x = self.pool(x)  # (N, out, H/2, W/2) with pool, else unchanged
        x = self.bn(x)
        return self.relu(x)


class ResBlock(nn.Module):
    """(Conv3x3 -> BN -> ReLU) x 2, keeping channels and size; the caller adds its input back."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block1 = ConvBNReLU(channels, channels)
        self.block2 = ConvBNReLU(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block2(self.block1(x))  # (N, C, H, W) -> (N, C, H, W)


class Layer(nn.Module):
    """X = Conv3x3 -> MaxPool2d(2) -> BN -> ReLU; with a residual block the output is X + ResBlock(X)."""

    def __init__(self, in_channels: int, out_channels: int, residual: bool) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_channels, out_channels, pool=True)
        self.res = ResBlock(out_channels) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # (N, out, H/2, W/2)
        if self.res is not None:
            x = x + self.res(x)  # not in place: autograd needs X for the ResBlock's backward pass
        return x


class CustomResNet(nn.Module):
    """The custom ResNet; `width` is the PrepLayer's channels, doubled by each of the three layers."""

    def __init__(self, width: int = 64, num_classes: int = NUM_CLASSES, logit_scale: float = 1.0) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be a positive integer, got {width}")
        if not logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
        w = width
        # a plain number, not a parameter or buffer: the state_dict and the parameter count stay the spec's
        self.logit_scale = logit_scale
        self.prep = ConvBNReLU(3, w)  # RGB in
        self.layer1 = Layer(w, 2 * w, residual=True)
        self.layer2 = Layer(2 * w, 4 * w, residual=False)
        self.layer3 = Layer(4 * w, 8 * w, residual=True)
        self.pool = nn.MaxPool2d(kernel_size=4)  # 4x4 feature map -> 1x1
        self.fc = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, 3, 32, 32), normalised images
        x = self.prep(x)  # (N, w, 32, 32)
        x = self.layer1(x)  # (N, 2w, 16, 16)
        x = self.layer2(x)  # (N, 4w, 8, 8)
        x = self.layer3(x)  # (N, 8w, 4, 4)
        x = self.pool(x)  # (N, 8w, 1, 1)
        x = torch.flatten(x, 1)  # (N, 8w)
        # Logits, not probabilities: the spec's softmax is applied by the loss, F.cross_entropy on logits
        # (= log-softmax + NLL, numerically stabler than a softmax layer followed by log); argmax of the logits
        # is the predicted class. logit_scale > 0 changes the loss's temperature, never the argmax.
        return self.fc(x) * self.logit_scale  # (N, num_classes)


class Classifier(nn.Module):
    """The trained network as its MLflow model serves it: uint8 RGB images (N, 32, 32, 3), as data/cifar10 holds
    them and as an image file decodes, in; the 10 classes' logits out (their argmax is the class, in
    data/cifar10/meta.json's order). It normalises as the test transform does: (x - mean) * (1 / std), float32."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))  # pixel units
        self.register_buffer("inv_std", 1 / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()  # (N, 3, 32, 32)
        return self.net((x - self.mean) * self.inv_std)


def training_flop(width: int) -> float:
    """FLOP to train on one 32x32 image (forward and backward): 2.28e9 at width 64, counted from the convolutions
    and the FC; every layer's cost scales with width squared."""
    return 2.28e9 * (width / 64) ** 2


def build_model(params: ModelParams) -> CustomResNet:
    """The model as params.yaml describes it (model.width, model.logit_scale)."""
    return CustomResNet(width=params.width, logit_scale=params.logit_scale)
