# The two commands: `make run` (whole pipeline) and `make test` (test suite), each on a fresh machine.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PYTHON ?= python3

# Stop albumentations' update check and DVC's analytics from reaching the network.
export NO_ALBUMENTATIONS_UPDATE := 1
export DVC_NO_ANALYTICS := 1
# Stage commands in dvc.yaml call `python`: the venv's.
export PATH := $(BIN):$(PATH)

.PHONY: run test lint bench quick profile-quick seeds lr-check register browser-check clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/dvc repro

# The suite as two pytest processes at once, one on TEST_FIRST and one on every other file: most of its time goes
# to one-threaded stage processes (Python imports, DVC, MLflow) and waits, so two streams keep two cores busy.
# The second prints as it goes, the first's report follows; each has a temporary folder of its own. One torch
# thread a process: the tests' tiny tensors gain nothing from two, and three busy processes on two cores lose
# CPU to spinning threads (a tiny `dvc repro` took 16% less CPU time with one thread, on a 2-core AMD EPYC).
# PYTEST_ARGS="--durations=25" adds arguments to both (here: the slowest tests of each stream). The split evens
# out the two streams (on a 2-core Xeon the first was 1.5 minutes the longer before test_device_pipeline.py moved
# to the second; docs/results.md has the durations).
TEST_FIRST := tests/test_pipeline.py tests/test_study.py tests/test_lr_bench.py
test: $(VENV)/.installed lint
	@export OMP_NUM_THREADS=1; first=$$(mktemp -d) rest=$$(mktemp -d); trap 'kill $$pid 2>/dev/null; rm -rf $$first $$rest' EXIT; \
	$(BIN)/python -m pytest -q --basetemp=$$first/tmp $(PYTEST_ARGS) $(TEST_FIRST) >$$first/log 2>&1 & pid=$$!; \
	$(BIN)/python -m pytest -q --basetemp=$$rest/tmp $(PYTEST_ARGS) $(addprefix --ignore=,$(TEST_FIRST)); rest_status=$$?; \
	wait $$pid; first_status=$$?; echo "== $(TEST_FIRST)"; cat $$first/log; \
	test $$first_status = 0 && test $$rest_status = 0

# A quick run on a CPU (49 s on an idle 2-core Intel Xeon; the README's "A quick run" gives other CPUs): the first
# 2,000 training and 500 test images, width 16, batch 128, 8 epochs, a 48-step range test.
# ARCHIVE=path/to/cifar-10-binary.tar.gz reads a local copy of the archive (its md5 computed here) instead of
# downloading it; ARGS="-S key=value ..." adds overrides.
QUICK_PARAMS := -S data.train_limit=2000 -S data.test_limit=500 -S model.width=16 -S train.batch_size=128 \
	-S train.epochs=8 -S train.peak_epoch=2 -S lr_finder.num_iter=48

quick: $(VENV)/.installed
ifdef ARCHIVE
	@test -f '$(ARCHIVE)' || { echo "error: ARCHIVE=$(ARCHIVE): no such file" >&2; exit 1; }
	md5=$$($(BIN)/python -c 'import hashlib, sys; print(hashlib.md5(open(sys.argv[1], "rb").read()).hexdigest())' '$(ARCHIVE)') && \
	$(BIN)/dvc exp run $(QUICK_PARAMS) -S 'data.url=$(abspath $(ARCHIVE))' -S "data.md5=$$md5" $(ARGS)
else
	$(BIN)/dvc exp run $(QUICK_PARAMS) $(ARGS)
endif

bench: $(VENV)/.installed
	$(BIN)/python -m scripts.bench

# Where make quick's time goes: its `dvc exp run` in a new repository of this checkout (a fresh clone's first run),
# each stage split into phases (start-up, imports, data, MLflow, the sweep's and training's steps, evaluation,
# plots) and DVC's own share; a table and reports/quick_profile.json. ARCHIVE=path/to/cifar-10-binary.tar.gz.
profile-quick: $(VENV)/.installed
	@test -f '$(ARCHIVE)' || { echo "error: profile-quick needs ARCHIVE=path/to/cifar-10-binary.tar.gz" >&2; exit 1; }
	$(BIN)/python -m scripts.quick_profile --archive '$(ARCHIVE)'

# The current params trained with seeds 0..N-1, each a DVC experiment from the range test on (the workspace is
# left as it is): a table, reports/seeds.json (median, mean, min, max, std of test_acc) and the MLflow runs
# tagged seeds.group. SET="-S key=value ..." adds overrides to every seed (not data.*, not train.seed).
N ?= 5
seeds: $(VENV)/.installed
	$(BIN)/python -m scripts.seeds -n $(N) $(SET)

# Is the found LRMAX the best here? The current params trained from the found range times each of FACTORS, each a
# DVC experiment (the workspace is left as it is): a table, reports/lr_check.json, reports/lr_check.png (accuracy
# against LRMAX, the found pick marked) and the MLflow runs tagged lr_check.group.
FACTORS ?= 0.5,1,2
lr-check: $(VENV)/.installed
	$(BIN)/python -m scripts.lr_check --factors $(FACTORS)

# Register the MLflow model of the run that trained models/model.pt in MLflow's Model Registry (a new version of
# cifar10-custom-resnet; NAME=... another name, RUN=<run id> another training run's model, BEST=1 the logged model
# with the experiment's highest test_acc).
register: $(VENV)/.installed
	$(BIN)/python scripts/register_model.py $(if $(RUN),--run '$(RUN)') $(if $(NAME),--name '$(NAME)') $(if $(BEST),--best)

# What a user sees in `mlflow ui`, in headless Chromium: two quick runs of the real pipeline, then the runs view,
# the charts, one run and the compare page. First the check (tests/test_browser.py, on a small made-up archive),
# then the screenshots in docs/screenshots/ (ARCHIVE=path/to/cifar-10-binary.tar.gz: a local copy; else
# params.yaml's data.url, downloaded). Needs Debian's chromium (installed here when run as root) and the
# `browser` extra (playwright, which drives that chromium: no browser download).
browser-check: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[dev,browser]'
	@test -x /usr/bin/chromium || if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium; \
	else echo "error: the browser check needs Debian's chromium: run 'sudo apt-get install chromium', then make browser-check again" >&2; exit 1; fi
	$(BIN)/python -m pytest -q -m browser tests/test_browser.py
	$(BIN)/python -m scripts.browser_check --out docs/screenshots $(if $(ARCHIVE),--archive '$(ARCHIVE)')

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
