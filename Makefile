# Two entry points: `make demo` (main job) and `make test` (test suite).
# Each creates the virtual environment when it is missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean risky-arm

$(BIN)/pplrl-installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch is pinned so that pip takes the local CPU build, never a CUDA one.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/pplrl-installed

# Main job: SAC (an ELBO-trained actor) on Pendulum-v1 with the defaults, 10k steps,
# then ArviZ diagnostics of its ELBO terms and returns. Each run gets a new folder.
DEMO_OUT ?= runs/demo-sac-$(shell date +%Y%m%d-%H%M%S)
demo: venv
	MPLBACKEND=Agg $(BIN)/pplrl train sac --env Pendulum-v1 --steps 10000 --seed 0 --out $(DEMO_OUT)
	MPLBACKEND=Agg $(BIN)/pplrl diagnose $(DEMO_OUT)

risky-arm: venv
	MPLBACKEND=Agg $(BIN)/python experiments/risky_arm.py --out runs/risky_arm

# Lint (ruff: pyflakes, pycodestyle, import order; configured in pyproject.toml), then the tests.
test: venv
	$(BIN)/ruff check .
	MPLBACKEND=Agg $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
