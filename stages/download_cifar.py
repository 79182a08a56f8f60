"""DVC stage download_cifar: fetch and check the CIFAR-10 binary archive, write the decoded arrays."""

import argparse
from pathlib import Path

from onecycle import data
from onecycle.config import load_params
from onecycle.errors import stage_main


@stage_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, required=True, help="folder for the decoded arrays and meta.json")
    args = parser.parse_args()
    params = load_params(args.params)
    dataset = data.prepare(params.data, args.out)
    print(f"wrote {args.out}: {len(dataset.train.labels)} training and {len(dataset.test.labels)} test images")


if __name__ == "__main__":
    main()
