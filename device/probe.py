"""The device's name, torch and Python versions and its measured bf16 matrix-product peak, as one JSON line.

    python3 -m device.probe

device/pipeline.py runs it in a process of its own after the pipeline, so that its own process never holds a
CUDA context while the stages run.
"""

from __future__ import annotations

import json
import platform

import torch

from scripts.measure import device_name, matmul_tflops

if __name__ == "__main__":
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    figures = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version()}
    print(json.dumps(figures | {"matmul_bf16_tflops": matmul_tflops(device)}))
