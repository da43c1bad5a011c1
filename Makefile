# moelab: two commands do everything (see README.md).
#   make reproduce   set up .venv, build the embedded model, run every notebook (full preset)
#   make test        set up .venv, run the package tests and the notebooks' smoke runs
#   make study       the claims matrix across models (notebook 05; not part of reproduce; about 2 hours
#                    on a fresh machine, six model builds included)
# Options: PRESET=full|smoke|paper, NB=<notebook stem> (one notebook alone), P="NAME=VALUE ..." (parameters
#          on top of the preset, e.g. P="MODEL=/ckpt/mixtral DTYPE=bfloat16"; no spaces inside a value:
#          SEEDS=[0,1]), PARAMS=<file.yaml>,
#          PYTHON=<interpreter for the venv>, VENV=<path> (default .venv).

PYTHON ?= python3
VENV   ?= .venv
PRESET ?= full
NB     ?=
P      ?=
PARAMS ?=
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moelab-installed

.PHONY: reproduce study test test-oldest env model lab notebooks benchmark clean-runs help

help:
	@echo "make reproduce   # set up $(VENV), build the embedded model, run all notebooks ($(PRESET) preset)"
	@echo "make test        # set up $(VENV), run pytest (package + notebook smoke runs + nbval + oldest transformers)"
	@echo "make study       # the claims matrix across models: notebook 05 ($(PRESET) preset; not part of reproduce)"
	@echo "make model       # build the embedded model ahead of time"
	@echo "make lab         # open the notebooks in JupyterLab from $(VENV)"

# The environment is (re)installed when pyproject.toml changes. torch is installed first, pinned to
# the CPU wheel 2.13.0, and only when the venv has no torch: a GPU build already there is kept.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[notebooks,test,lmeval]"
	$(PY) -m ipykernel install --sys-prefix --name moelab --display-name "Python (moelab)" >/dev/null
	@touch $(STAMP)

env: $(STAMP)

# Build the embedded model ahead of time (before a class: about a quarter of an hour on two cores, once).
model: $(STAMP)
	$(PY) -c "from moelab import zoo; print(zoo.build())"

# Open the notebooks in JupyterLab from the venv (its kernel is the venv's Python).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks

reproduce: $(STAMP)
	$(PY) -m moelab.runner --preset $(PRESET) $(if $(NB),--notebook $(NB),) $(if $(PARAMS),--params $(PARAMS),) \
		$(foreach p,$(P),-p '$(p)')

notebooks: reproduce

# The claims matrix across models (notebooks/05_claims_across_models.ipynb): three seeds of the embedded
# recipe and of its upcycled twin, each built first when not cached. Same options as reproduce but NB.
study: $(STAMP)
	$(PY) -m moelab.runner --preset $(PRESET) --notebook 05 $(if $(PARAMS),--params $(PARAMS),) \
		$(foreach p,$(P),-p '$(p)')

# Tests keep their zoo cache in the repository (.cache/moelab): hermetic, and built once per clone.
TEST_CACHE ?= $(CURDIR)/.cache/moelab

test: $(STAMP)
	MOELAB_CACHE=$(TEST_CACHE) $(PY) -m pytest -q tests
	MOELAB_CACHE=$(TEST_CACHE) $(PY) -m pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider runs/smoke/notebooks
	$(MAKE) --no-print-directory test-oldest

# The oldest transformers pyproject.toml allows (the venv has the newest): the tests of the adapters,
# observation, editing, saving and evaluation run again with it placed ahead of the venv's own.
OLDEST_TRANSFORMERS := "transformers==5.17.0" "huggingface-hub>=1.5,<2"
OLDEST_DIR := $(VENV)/oldest-transformers
OLDEST_TESTS := tests/test_models.py tests/test_real_checkpoints.py tests/test_io.py tests/test_observe.py \
	tests/test_evaluate.py tests/test_compress.py tests/test_merge.py tests/test_mcsmoe.py

$(OLDEST_DIR)/.installed: Makefile
	rm -rf $(OLDEST_DIR)
	$(PY) -m pip install --quiet --no-deps --target $(OLDEST_DIR) $(OLDEST_TRANSFORMERS)
	@touch $@

test-oldest: $(STAMP) $(OLDEST_DIR)/.installed
	PYTHONPATH=$(OLDEST_DIR) MOELAB_CACHE=$(TEST_CACHE) $(PY) -c "import transformers as t; print('transformers', t.__version__)"
	PYTHONPATH=$(OLDEST_DIR) MOELAB_CACHE=$(TEST_CACHE) $(PY) -m pytest -q -p no:cacheprovider $(OLDEST_TESTS)

benchmark: $(STAMP)
	$(PY) benchmarks/observe.py

clean-runs:
	rm -rf runs
