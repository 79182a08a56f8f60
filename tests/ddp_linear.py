"""Trains a BatchNorm-free linear model with training.fit, as one process or under torchrun, and saves the
weights: without BatchNorm and augmentation, data-parallel training must give the single-process weights
(gradients of shards averaged = gradient of the batch). Used by test_training.py.

    python tests/ddp_linear.py ARCHIVE MD5 OUT.pt
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_linear.py ARCHIVE MD5 OUT.pt
"""

import sys

import torch
from torch import nn

from onecycle import data, distributed, training
from onecycle.config import parse_params

archive, md5, out = sys.argv[1:4]
params = parse_params(
    {
        "data": {"url": archive, "md5": md5},
        "augment": {"pad": 0, "flip_p": 0.0, "cutout": 0},  # normalisation only: the same batches everywhere
        "train": {"epochs": 3, "peak_epoch": 1, "batch_size": 64, "device": "cpu"},
    }
)
group, device = distributed.start("cpu")
dataset = data.decode_archive(archive, params.data)
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
history = training.fit(model, dataset, params, 0.001, 0.01, device, group=group, progress=False)
if group.is_main:
    torch.save({"weights": model.state_dict(), "train_loss": [r.train_loss for r in history]}, out)
distributed.stop(group)
