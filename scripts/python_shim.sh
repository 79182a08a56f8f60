#!/bin/sh
# dvc.yaml's `python` while `dvc repro` is timed (scripts/pipeline_repo.py, shim_env): runs $SHIM_PYTHON and
# appends this process's start and end (epoch seconds), exit status and script to $SHIM_TIMES.
start=$(date +%s.%N)
"$SHIM_PYTHON" "$@"
status=$?
echo "$start $(date +%s.%N) $status $1" >>"$SHIM_TIMES"
exit $status
