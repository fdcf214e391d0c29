# Two commands do all the set-up on a fresh clone:
#   make demo   create .venv, install, run the main job on the shipped defaults
#   make test   create the same .venv and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# On the development machines this takes the CPU wheel already on disk; elsewhere pip
# picks the build for your platform (set TORCH="torch" to accept any recent release).
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test venv clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/multimodal demo

clean:
	rm -rf $(VENV) demo_output .pytest_cache
