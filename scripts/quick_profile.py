"""Where `make quick`'s time goes: `make profile-quick ARCHIVE=...` (python -m scripts.quick_profile).

    python -m scripts.quick_profile --archive cifar-10-binary.tar.gz [--out reports/quick_profile.json] [-S K=V]...

It runs `make quick`'s `dvc exp run` (the Makefile's QUICK_PARAMS, read from it, with the archive; -S adds
overrides after them, as `make quick ARGS=...`) in a new git repository of this checkout, as on a fresh clone:
each stage process through scripts/stage_profile.py, which splits it into phases (interpreter start-up, imports,
the archive, MLflow store set-up, run and model logging, the sweep's steps, training steps, evaluation, plots),
and DVC's own time is what is left of the `dvc exp run`. It prints a table with the machine's name and the ratio
of the whole to the steps alone (sweep, training and evaluation), and writes the figures to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onecycle.errors import UserError
from scripts.experiments import git_commit, tool_main
from scripts.pipeline_repo import ROOT, pipeline_repo, shim_env, stage_names

STEPS = ("sweep steps", "training steps", "evaluation")  # the arithmetic `make quick` is for


def quick_params(makefile: Path = ROOT / "Makefile") -> list[str]:
    """The `-S key=value` arguments of the Makefile's QUICK_PARAMS, as `make quick` passes them."""
    text = makefile.read_text().replace("\\\n", " ")
    found = re.search(r"^QUICK_PARAMS := (.*)$", text, flags=re.M)
    if not found:
        raise UserError(f"{makefile} has no QUICK_PARAMS")
    return found.group(1).split()


def profile(archive: Path, work: Path, extra: list[str]) -> dict:
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    repo = pipeline_repo(work / "repo", {})
    times = work / "stage_times.txt"
    times.write_text("")
    env = os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1", "DVC_NO_ANALYTICS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the new repository's own mlflow.db, as a fresh clone has
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env = shim_env(work / "shim", times, env) | {"SHIM_PROFILE": str(ROOT / "scripts" / "stage_profile.py")}
    env["PYTHONPATH"] = str(repo / "src")  # the copy's library, as in a clean checkout
    data = ["-S", f"data.url={archive.resolve()}", "-S", f"data.md5={md5}"]
    command = ["dvc", "exp", "run", *quick_params(), *(a for kv in extra for a in ("-S", kv)), *data]
    start = time.time()
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    if done.returncode != 0:
        raise UserError(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    names = stage_names()
    stages = {}
    for path in sorted(work.glob("stage_times.txt.*.json")):
        record = json.loads(path.read_text())
        stages[names.get(record["script"], record["script"])] = record
    in_stages = sum(r["seconds"] for r in stages.values())
    steps = sum(r["phases"].get(p, 0.0) for r in stages.values() for p in STEPS)
    return {"command": " ".join(command[:-4] + ["-S", "data.url=...", "-S", "data.md5=..."]), "seconds": seconds,
            "stages": stages, "dvc_seconds": seconds - in_stages, "steps_seconds": steps,
            "ratio_to_steps": seconds / steps}  # fmt: skip


def table(result: dict) -> str:
    stages = result["stages"]
    phases = list(dict.fromkeys(p for r in stages.values() for p in r["phases"]))
    lines = [
        f"`make quick` on {result['device']}, at {result['commit']}: {result['seconds']:.1f} s, "
        f"{result['ratio_to_steps']:.2f}x its steps ({result['steps_seconds']:.1f} s)",
        "",
        "| seconds | " + " | ".join(stages) + " | all |",
        "|---" * (len(stages) + 2) + "|",
    ]
    for phase in [*phases, "other (in the stage, outside these phases)"]:
        if phase.startswith("other"):
            cells = [r["seconds"] - sum(r["phases"].values()) for r in stages.values()]
        else:
            cells = [r["phases"].get(phase, 0.0) for r in stages.values()]
        lines.append(f"| {phase} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {sum(cells):.2f} |")
    totals = [r["seconds"] for r in stages.values()]
    lines.append("| **the stage's process** | " + " | ".join(f"{c:.2f}" for c in totals) + f" | {sum(totals):.2f} |")
    blank = " | " * len(stages)
    lines.append(f"| DVC's own (`dvc exp run` less the stages){blank}{result['dvc_seconds']:.2f} |")
    lines.append(f"| **`make quick`**{blank}{result['seconds']:.2f} |")
    return "\n".join(lines)


@tool_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, required=True, help="a local copy of the CIFAR-10 binary archive")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "quick_profile.json")
    parser.add_argument("-S", dest="set", action="append", default=[], metavar="KEY=VALUE", help="another override")
    args = parser.parse_args()
    if not args.archive.is_file():
        raise UserError(f"--archive {args.archive}: no such file")
    import torch

    from scripts.measure import device_name

    with tempfile.TemporaryDirectory() as tmp:
        result = profile(args.archive, Path(tmp), args.set)
    found = git_commit(ROOT)
    result |= {"device": device_name(torch.device("cpu")), "commit": found["commit"][:7]}
    result["commit"] += "+uncommitted" if found.get("uncommitted_changes") else ""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
