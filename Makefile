# Two commands on a fresh machine with Python 3.11+:
#   make test   set up .venv with the CPU backends, then run the whole test suite
#   make demo   same set-up, then train a few optimizers on a small real problem
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch 2.13.0 is the pinned test version (its CPU build is on the project machines' disk).
TORCH_PIN := torch==2.13.0
TIMM_PIN := timm==1.0.31

.PHONY: test demo lint conformance bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)" -e ".[test,all]"
	# timm's LARS/LAMB are references; its package needs torchvision, which would replace the
	# pinned torch, so only its source files are installed (the tests load them directly).
	$(BIN)/python -m pip install --quiet --no-deps "$(TIMM_PIN)"
	touch $@

test: $(BIN)/.installed
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q

demo: $(BIN)/.installed
	$(BIN)/python benchmarks/demo.py

lint: $(BIN)/.installed
	$(BIN)/python -m ruff check .

conformance: $(BIN)/.installed
	$(BIN)/python -m agnostic_optim.conformance

# slow measurements, never part of make test: step times against torch.optim / optax, and the
# convergence of every registered optimizer's torch class (with its plot)
bench: $(BIN)/.installed
	$(BIN)/python benchmarks/torch_step.py
	$(BIN)/python benchmarks/jax_step.py
	$(BIN)/python benchmarks/convergence.py --plot benchmarks/convergence.png

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
