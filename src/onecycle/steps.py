"""How one training step runs, shared by training and the LR range test: the optimizer (SGD with the train
section's momentum, weight decay and Nesterov) and the step options (precision, memory layout, loss)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from onecycle.config import TrainParams


def make_optimizer(
    model: torch.nn.Module, params: TrainParams, lr: float, momentum: float | None = None
) -> torch.optim.SGD:
    """SGD with train.weight_decay (and train.nesterov); momentum defaults to the One Cycle's start (momentum at
    LRMIN). With train.decay_bn_and_bias false, the vectors (BatchNorm weights and biases, the FC bias) form a
    second parameter group without weight decay."""
    momentum = params.momentum[0] if momentum is None else momentum
    groups: list[dict] = [{"params": list(model.parameters())}]
    if not params.decay_bn_and_bias:
        groups = [
            {"params": [p for p in model.parameters() if p.ndim > 1]},  # conv kernels and the FC's matrix
            {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0},
        ]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=params.weight_decay, nesterov=params.nesterov)


@dataclass(frozen=True)
class StepOptions:
    """How each forward and backward pass runs (train.precision, train.channels_last, the device) and the
    training loss (train.label_smoothing)."""

    autocast: torch.dtype | None = None  # bf16 autocast on CUDA; None: float32
    channels_last: bool = False  # NHWC activations
    check_every_step: bool = True  # read the loss each step (free on the CPU); on CUDA only at the epoch's end
    label_smoothing: float = 0.0  # of the training loss (the range test's too), not of the test loss

    @classmethod
    def of(cls, params: TrainParams, device: torch.device) -> StepOptions:
        bf16 = params.precision == "bf16" or (params.precision == "auto" and device.type == "cuda")
        return cls(
            torch.bfloat16 if bf16 else None, params.channels_last, device.type != "cuda", params.label_smoothing
        )

    def place(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model on `device`, in the memory layout the passes use."""
        model.to(device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def forward(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, dtype=self.autocast or torch.float32, enabled=self.autocast is not None):
            return model(x).float()  # logits in float32: the loss and argmax are computed at full precision

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training loss: mean cross-entropy per image, with the label smoothing of train.label_smoothing."""
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
