"""dvc.yaml's deps cannot go stale: each stage lists every library module its script runs, and the range test
every train key its sweep reads. (tests/test_pipeline.py checks with the real `dvc status` that they rerun it.)"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from onecycle import lr_finder
from scripts.pipeline_repo import stage_names

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "src" / "onecycle"


def onecycle_imports(path: Path) -> set[str]:
    """The onecycle modules a file imports anywhere in it (functions included): `from onecycle import a, b`,
    `from onecycle.c import x`, `import onecycle.d`, and relative imports inside the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # `from . import a` / `from .b import x`, inside src/onecycle
                module = "onecycle" + (f".{module}" if module else "")
            if module == "onecycle":
                found |= {alias.name for alias in node.names}
            elif module.startswith("onecycle."):
                found.add(module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("onecycle.")}
    return found


def modules_run_by(script: Path) -> set[str]:
    """Every onecycle module `script` imports, directly or through another onecycle module."""
    todo, seen = onecycle_imports(script), set()
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo |= onecycle_imports(LIBRARY / f"{module}.py")
    return seen


def test_each_stage_lists_every_library_module_its_script_imports_and_no_other():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    scripts = {name: script for script, name in stage_names().items()}
    assert sorted(scripts) == sorted(stages)
    for name, stage in stages.items():
        assert scripts[name] in stage["deps"], name
        listed = sorted(d for d in stage["deps"] if d.startswith("src/"))
        wanted = sorted(f"src/onecycle/{m}.py" for m in modules_run_by(ROOT / scripts[name]))
        assert listed == wanted, f"dvc.yaml, stage {name}: list exactly the library modules that {scripts[name]} runs"
    # what the issue found stale: plot_reports evaluates the model with training.evaluate
    assert "src/onecycle/training.py" in stages["plot_reports"]["deps"]


def test_the_import_walk_sees_indirect_and_function_level_imports(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text("def main():\n    from onecycle.plots import draw\n")
    assert {"plots", "schedules", "outputs", "config", "errors"} <= modules_run_by(script)  # via plots.py


def test_the_range_test_stage_lists_exactly_the_train_keys_the_sweep_and_the_pick_read():
    params = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["lr_range_test"]["params"]
    train_keys = [p for p in params if isinstance(p, str) and p.startswith("train")]
    read = lr_finder.SWEEP_TRAIN_KEYS + lr_finder.PICK_TRAIN_KEYS
    assert sorted(train_keys) == sorted(read) and len(set(train_keys)) == len(train_keys)
    assert not set(lr_finder.SWEEP_TRAIN_KEYS) & set(lr_finder.PICK_KEYS), "a key the sweep reads is no pick key"
