#!/bin/sh
# dvc.yaml's `python` while `dvc repro` is timed (scripts/pipeline_repo.py, shim_env): runs $SHIM_PYTHON and
# appends this process's start and end (epoch seconds), exit status and script to $SHIM_TIMES. With SHIM_PROFILE
# (scripts/stage_profile.py), the stage runs through it, which writes its phases to $SHIM_TIMES.<pid>.json.
start=$(date +%s.%N)
if [ -n "$SHIM_PROFILE" ]; then
  "$SHIM_PYTHON" "$SHIM_PROFILE" "$SHIM_TIMES.$$.json" "$@"
else
  "$SHIM_PYTHON" "$@"
fi
status=$?
echo "$start $(date +%s.%N) $status $1" >>"$SHIM_TIMES"
exit $status
