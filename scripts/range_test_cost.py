"""Print what the LR range test cost, in training images and epochs, beside the reference run's 20 epochs.

    python scripts/range_test_cost.py [reports/lr_range.json]

The reference run found its range by training 20 one-epoch models at 20 LRs (20 epochs of 50,000 images);
this pipeline's sweep is one pass of lr_finder.num_iter batches. The figures come from the lr_range.json
that the lr_range_test stage wrote (images_seen, epochs_of_training_set).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REFERENCE_EPOCHS = 20  # S11 reference: "Trained model for 20 Epochs with linearly increasing LR"
CIFAR_TRAIN_IMAGES = 50_000


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "reports/lr_range.json")
    found = json.loads(path.read_text())
    images, epochs = found["images_seen"], found["epochs_of_training_set"]
    reference = REFERENCE_EPOCHS * CIFAR_TRAIN_IMAGES
    print(f"{path}: LRMIN {found['lr_min']:.4g}, LRMAX {found['lr_max']:.4g} ({found['pick']})")
    print(f"range test cost : {images:,} training images = {epochs:.2f} epochs of this training set")
    print(f"reference cost  : {reference:,} training images = {REFERENCE_EPOCHS} epochs of 50,000")
    print(f"ratio           : {reference / images:.1f}x fewer images than the reference")


if __name__ == "__main__":
    main()
