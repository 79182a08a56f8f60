#!/usr/bin/env bash
# The one device call shared by issue 13 (the real pipeline on a GPU) and issue 12 (accuracy), each part with
# its own deadline, most important first:
#
#   bash device/session.sh prepare   # here: .whl/ and .carry/ (git-ignored), under 64 MiB
#   bash device/session.sh run       # there, carrying .whl and .carry: every result under $OUT
#
# run, deadlines in seconds from its start (the call's limit is 600: give it timeout_s 590):
#   1. `dvc repro` from a clean checkout, every stage timed, then `make bench`'s GPU path if it fits
#      (device/pipeline.py), until PIPELINE (200): $OUT/h200-pipeline.json, pipeline.log, bench.json
#   2. the accuracy study (research/study.py, a warm process each): the 5 seeds of SEEDS_GRID
#      (device/accuracy_seeds.yaml) until SEEDS (420): $OUT/seeds.json; then GRID
#      (device/accuracy_grid.yaml) until STUDY (545): $OUT/study.json
#   3. airbench94 from its sdist on the same data, 3 seeds (research/airbench_standin.py) until AIRBENCH (575):
#      $OUT/airbench.json
# The stand-in archive that part 1 builds in $WORK is the data of parts 2 and 3. $OUT/session.log holds
# everything printed. STUDY_SET (e.g. "-S model.width=2 -S train.epochs=2") and the env of device/pipeline.py
# (WIDTH, EPOCHS, BATCH, SET, ARCHIVE, PROXY_OPTS) make every part tiny, to try `run` on a CPU first.
set -uo pipefail
cd "$(dirname "$0")/.."

PIPELINE=${PIPELINE:-200}
SEEDS=${SEEDS:-420}
STUDY=${STUDY:-545}
AIRBENCH=${AIRBENCH:-575}
SEEDS_GRID=${SEEDS_GRID:-device/accuracy_seeds.yaml}
GRID=${GRID:-device/accuracy_grid.yaml}
STUDY_SET=${STUDY_SET:-}
AIRBENCH_SDIST=.carry/airbench-0.1.8.tar.gz

case "${1:-}" in
prepare)
    PYTHONPATH=src python3 -m device.prepare || exit
    # airbench publishes an sdist only; its lib_airbench94.py is what the study runs
    python3 -m pip download --quiet --no-deps --no-binary=:all: -d .carry airbench==0.1.8 || exit
    du -sh .whl .carry
    ;;
run)
    : "${OUT:?set OUT to the folder for the results (the device sets it)}"
    export PYTHONUNBUFFERED=1 NO_ALBUMENTATIONS_UPDATE=1 DVC_NO_ANALYTICS=1
    export WORK=${WORK:-/tmp/device_session}
    mkdir -p "$OUT" "$WORK"
    exec > >(tee -a "$OUT/session.log") 2>&1
    began=$(date +%s)
    left() { echo $(($1 - ($(date +%s) - began))); }  # seconds until the part's deadline
    status=0

    echo "== 1. dvc repro on a clean checkout, then make bench ($(left "$PIPELINE") s)"
    # make bench without its own tiny `dvc repro`: the real one was just timed stage by stage
    DEADLINE=$(left "$PIPELINE") REPEAT=${REPEAT:-0} BENCH_ARGS=${BENCH_ARGS:---no-repro --width 64 --batch-size 512 \
        --steps 20} PYTHONPATH=src python3 -m device.pipeline || status=$?
    # where the project is not installed (the device), the other parts need the wheels device/pipeline.py installed
    if python3 -c "import albumentations" 2>/dev/null; then export PYTHONPATH=src; else
        export PYTHONPATH="${SITE:-/tmp/site}:src"; fi
    data=$(python3 -c 'import json, sys; a = json.load(open(sys.argv[1]))["archive"]; print(a["path"], a["md5"])' \
        "$OUT/h200-pipeline.json") || { echo "no archive recorded: the study has no data"; exit 1; }
    read -r archive md5 <<<"$data"
    on_data=(-S "data.url=$archive" -S "data.md5=$md5")
    commit=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("commit", ""))' \
        "$OUT/h200-pipeline.json")

    for part in "$SEEDS_GRID:$SEEDS:seeds" "$GRID:$STUDY:study"; do
        IFS=: read -r grid deadline name <<<"$part"
        echo "== 2. accuracy study, $grid ($(left "$deadline") s)"
        # shellcheck disable=SC2086 # STUDY_SET is a list of options
        python3 -m research.study --grid "$grid" "${on_data[@]}" $STUDY_SET --out "$OUT/$name.json" \
            --deadline "$(left "$deadline")" --cache "$WORK/cache" --peak --datasheet-tflops 989 \
            ${commit:+--commit "$commit"} || status=$?
    done

    echo "== 3. airbench94 ($(left "$AIRBENCH") s)"
    # shellcheck disable=SC2086
    python3 -m research.airbench_standin --airbench "$AIRBENCH_SDIST" "${on_data[@]}" --seeds 3 \
        --out "$OUT/airbench.json" --deadline "$(left "$AIRBENCH")" --cache "$WORK/cache" \
        ${commit:+--commit "$commit"} || status=$?

    echo "== done in $(($(date +%s) - began)) s, status $status"
    exit "$status"
    ;;
*)
    echo "usage: bash device/session.sh prepare|run" >&2
    exit 2
    ;;
esac
