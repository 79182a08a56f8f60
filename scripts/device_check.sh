#!/usr/bin/env bash
# The next GPU check of the speed issue in one device call (README: "Speed and accuracy on an NVIDIA H200").
#
#   bash scripts/device_check.sh prepare   # here, once: .whl/ and .carry/ (both git-ignored)
#   bash scripts/device_check.sh run       # on the device, carrying .whl and .carry: results under $OUT
#
# The lent H200 machines have torch, numpy, opencv and Pillow but not albumentations (nor its needs, nor
# DVC or MLflow, which these scripts do not import), and no internet. `prepare` downloads the wheels they lack
# (for the device's Python 3.12, x86-64) into .whl/ and copies the stand-in's 18 MB source into .carry/;
# `run` installs the wheels, rebuilds the stand-in archive there (170 MB: too big to carry), then trains the
# grid below, one fresh process per setting (scripts/gpu_fresh.py), and runs `make bench`'s GPU path
# (scripts/bench.py --no-repro). About 5 minutes on an H200.
#
# Sizes can be made tiny to try `run` on a CPU first, e.g.
#   OUT=/tmp/check PROXY_OPTS="--train 600 --test 200" WIDTH=2 EPOCHS=3 BATCH=64 bash scripts/device_check.sh run
set -euo pipefail
cd "$(dirname "$0")/.."

SHARED=${SHARED:-../shared}            # where CONTRACT.md and data/ of the workplace are
WIDTH=${WIDTH:-64}                     # model.width
EPOCHS=${EPOCHS:-24}                   # train.epochs
BATCH=${BATCH:-512}                    # train.batch_size
PROXY_OPTS=${PROXY_OPTS:-}             # make_cifar10_proxy.py options: none = all 50,000 + 10,000 images

case "${1:-}" in
prepare)
    rm -rf .whl .carry
    mkdir -p .whl .carry
    cp "$SHARED/data/make_cifar10_proxy.py" "$SHARED/data/cifar10-jpeg-proxy.npz" .carry/
    # albumentations as pyproject.toml pins it, and what it needs that the device lacks, one version each
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl albumentations==2.0.8 albucore==0.0.24 pydantic==2.14.4 pydantic_core==2.50.5 \
        annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0 simsimd==6.5.16 \
        stringzilla==5.3.2
    du -sh .whl .carry
    ;;
run)
    : "${OUT:?set OUT to the folder for the results (the device sets it)}"
    export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
    if python3 -c "import albumentations" 2>/dev/null; then  # a machine with the project installed
        export PYTHONPATH=src
    else  # the device: the carried wheels
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            .whl/*.whl
        export PYTHONPATH=/tmp/site:src
    fi
    archive=/tmp/device_check/cifar.tar.gz
    mkdir -p "$(dirname "$archive")" "$OUT"
    # shellcheck disable=SC2086 # PROXY_OPTS is a list of options
    md5=$(python3 .carry/make_cifar10_proxy.py "$archive" $PROXY_OPTS | tee /dev/stderr | awk '/^md5 /{print $2}')
    size=(--width "$WIDTH" --batch-size "$BATCH")
    # The noise at the best LRMAX of the last grid (three seeds), the reference's weight decay, one more LR,
    # and the found range (0.0105), all as fresh processes, as `dvc repro` runs the training stage
    status=0
    python3 scripts/gpu_fresh.py --archive "$archive" --md5 "$md5" "${size[@]}" --epochs "$EPOCHS" \
        --lr-max 0.025 --out "$OUT/recipe.json" \
        --setting base: --setting seed1:seed=1 --setting seed2:seed=2 --setting wd1e-3:weight_decay=1e-3 \
        --setting lr035:lr_max=0.035 --setting found:lr_max=0.0105 || status=$?
    PEAK_TFLOPS=${PEAK_TFLOPS:-989} python3 scripts/bench.py --no-repro "${size[@]}" --steps 20 \
        --out "$OUT/bench.json" || status=$?
    exit "$status"
    ;;
*)
    echo "usage: bash scripts/device_check.sh prepare|run" >&2
    exit 2
    ;;
esac
