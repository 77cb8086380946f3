# Thin wrappers over the `finetune` and `simfluence` CLIs. `make help` lists the targets.
#   make runs CONFIG=runs/<name>      training runs        -> $(EXP) (default runs/<name>/output)
#   make tracin CONFIG=runs/<name>    TracIn-CP dots       -> $(EXP)/run_XXX/tracin.npz
#   make simulate CONFIG=runs/<name>  every simulator      -> $(EXP)/results.json, sim_<variant>.npz
#   make features CONFIG=runs/<name>  example features     -> $(EXP)/features/<kind>.npz
#   make unseen CONFIG=runs/<name>    four settings        -> $(EXP)/results_unseen.{json,md}
#   make counterfactual CONFIG=...    train proposals      -> $(EXP)/counterfactual/report.md
#   make figures CONFIG=runs/<name>   plots + influences   -> $(EXP)/figures/
#   make table                        every results.json   -> results/table.md (+ table.json)
# `runs` and `tracin` skip finished work and complete unfinished work (run them again after a
# kill); `simulate`, `figures` and `table` redo their evaluation (seconds to a minute).
# Install level per target: `simulate`, `figures` and `table` need only the simulator half
# (`install-sim`: pip install -e .); the others the whole stack (`install`: ".[finetune,test]").
SHELL := /bin/bash
comma := ,
PY_BOOT ?= python3
VENV ?= .venv
PYTHON ?= $(VENV)/bin/python
SHARED ?= $(abspath ../shared)
# Offline defaults for the data and the T5 vocabulary, when ../shared is beside the checkout.
ifneq ($(wildcard $(SHARED)/data),)
export SIMFLUENCE_DATA_DIR ?= $(SHARED)/data
endif
ifneq ($(wildcard $(SHARED)/tokenizers/t5/spiece.model),)
export SIMFLUENCE_TOKENIZER ?= $(SHARED)/tokenizers/t5
endif
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

CONFIG ?= runs/demo
OUT ?=
# CONFIG may name the folder or its config.py.
CONFIG_DIR = $(patsubst %/config.py,%,$(patsubst %/,%,$(CONFIG)))
EXP = $(if $(OUT),$(OUT),$(CONFIG_DIR)/output)
DEMO_EXP = $(if $(OUT),$(OUT),runs/demo/output)
# Empty: `simfluence evaluate` and `counterfactual propose` take the split experiment.json
# records (the config's extra.split), else 20,2,10. Set it to pass --split FIT,VALID,TEST.
SPLIT ?=
# Fitting and validation runs of the featurized simulator files (sim_linear-feat.npz, ...).
FEAT_FIT_RUNS ?= 0-19
FEAT_VALID_RUNS ?= 20-21
PLOT_RUN ?= 22
TESTS ?= 0,1,2,3
# Flags of the training commands (finetune run, finetune counterfactual), e.g. --no-progress.
TRAIN_ARGS ?=
# Simulators `make figures` draws beside sim_linear.npz (spaces or commas), where their files
# exist; a missing file is skipped with a line on stderr.
comma := ,
FIGURE_EXTRA_SIMS ?= tracin-cp-rescaled linear-lr-momentum
# Extra flags of `simfluence counterfactual propose` (e.g. --targets 20 --k 16 --base-runs 22-31).
CF_ARGS ?=
# Featurized Simfluence (issue 19): feature kinds to compute, the kinds and unseen test
# examples of `make unseen`.
FEATURE_KINDS ?= hidden,tracin
UNSEEN_FEATURES ?= tracin
UNSEEN_TESTS ?= 25-49
# The demo's proposals: every kind; flip needs EXP/sim_linear_margin.npz (fitted by `simulate`),
# swap-in the held-out pool examples of the demo config.
DEMO_CF_ARGS ?= --kinds remove-top,remove-bottom,remove-random,reorder,optimize,flip,flip-random,swap-in
TABLE_INPUTS ?= $(wildcard runs/*/output/results.json)
TABLE_OUT ?= results/table.md
# Tests run the targets with INSTALL_DEP= and PYTHON=<their interpreter>; INSTALL_DEP= skips
# both install levels.
INSTALL_DEP ?= install
INSTALL_SIM_DEP = $(if $(strip $(INSTALL_DEP)),install-sim)
SPLIT_FLAG = $(if $(strip $(SPLIT)),--split $(strip $(SPLIT)))
TRAIN_FLAGS = $(if $(strip $(TRAIN_ARGS)), $(strip $(TRAIN_ARGS)))
FINETUNE = $(PYTHON) -m finetune.cli
SIMFLUENCE = $(PYTHON) -m simfluence.cli

.PHONY: help install install-sim test test-all demo runs tracin simulate counterfactual table \
  figures bench lint tpu-submit features unseen

# `make help` prints these with their current values (VAR=value on the command line sets one).
HELP_VARS := CONFIG OUT SPLIT PLOT_RUN TESTS FIGURE_EXTRA_SIMS TRAIN_ARGS CF_ARGS DEMO_CF_ARGS \
  FEATURE_KINDS UNSEEN_FEATURES UNSEEN_TESTS FEAT_FIT_RUNS FEAT_VALID_RUNS TABLE_INPUTS TABLE_OUT VENV PY_BOOT PYTHON \
  INSTALL_DEP SHARED
HELP_CONFIG := experiment config: runs/<name> or runs/<name>/config.py
HELP_OUT := output folder (empty: <CONFIG>/output)
HELP_SPLIT := FIT,VALID,TEST runs of simulate and counterfactual (empty: experiment.json's)
HELP_PLOT_RUN := held-out run `make figures` plots
HELP_TESTS := test examples `make figures` plots
HELP_TRAIN_ARGS := flags of finetune run and finetune counterfactual (--no-progress for batch logs)
HELP_FIGURE_EXTRA_SIMS := variants `make figures` draws beside linear (their sim_<variant>.npz)
HELP_CF_ARGS := extra flags of `simfluence counterfactual propose`
HELP_DEMO_CF_ARGS := the proposal flags `make demo` passes as CF_ARGS
HELP_FEATURE_KINDS := feature kinds of `make features` (hidden,tracin)
HELP_UNSEEN_FEATURES := feature kinds of the featurized simulators (simulate, unseen)
HELP_UNSEEN_TESTS := test examples `make unseen` holds out of fitting
HELP_FEAT_FIT_RUNS := fitting runs of sim_linear-feat.npz and sim_additive-feat.npz
HELP_FEAT_VALID_RUNS := validation runs of the featurized simulator files
HELP_TABLE_INPUTS := results.json files of `make table`
HELP_TABLE_OUT := where `make table` writes (.md, .csv or .tex)
HELP_VENV := virtual environment the install targets create
HELP_PY_BOOT := interpreter that creates VENV
HELP_PYTHON := interpreter every target runs
HELP_INSTALL_DEP := `install` (default) installs what a target needs first; empty: never
HELP_SHARED := offline data and T5 vocabulary (../shared)

# One shell word, single-quoted.
shq = '$(subst ','\'',$(1))'

help:  ## List the targets and the variables.
	@echo "Targets (make TARGET VAR=value ...):"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'
	@echo "Variables (current value in brackets):"
	@$(foreach v,$(HELP_VARS),printf '  %-18s %s [%s]\n' $(v) $(call shq,$(HELP_$(v))) \
	  $(call shq,$(strip $($(v))));)

# Two install levels, each with its stamp in $(VENV); the full one includes the simulator's.
$(VENV)/.installed-sim: pyproject.toml
	test -x $(VENV)/bin/python || $(PY_BOOT) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e .
	touch $@

$(VENV)/.installed: pyproject.toml
	test -x $(VENV)/bin/python || $(PY_BOOT) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[finetune,test]"
	touch $@ $(VENV)/.installed-sim

install: $(VENV)/.installed  ## Create .venv with the whole stack: the finetune and test extras (torch too).
install-sim: $(if $(wildcard $(VENV)/.installed),$(VENV)/.installed,$(VENV)/.installed-sim)  ## Only the simulator half (pip install -e .): enough for simulate, figures and table.

test: install  ## The default test suite (CPU, no network, two test processes, about 7 min on 2 cores).
	$(PYTHON) -m pytest -q -n 2 --dist loadfile tests

test-all: install  ## Every test, the slow ones too.
	$(PYTHON) -m pytest -q -n 2 --dist loadfile -m "slow or not slow" tests

demo: $(INSTALL_DEP)  ## The embedded default end to end on CPU (runs, TracIn-CP, simulators, table, plots, counterfactual check).
	$(MAKE) --no-print-directory runs tracin features simulate figures unseen counterfactual \
	  CONFIG=runs/demo OUT=$(DEMO_EXP) INSTALL_DEP=$(INSTALL_DEP) PYTHON=$(PYTHON) \
	  CF_ARGS="$(DEMO_CF_ARGS)" FEATURE_KINDS=tracin
	$(SIMFLUENCE) table $(DEMO_EXP)/results.json --out $(DEMO_EXP)/table.md
	@echo "demo outputs in $(DEMO_EXP): results.json, table.md, results_unseen.md, figures/, counterfactual/report.md"

runs: $(INSTALL_DEP)  ## Training runs of CONFIG=runs/<name> (resumes an interrupted experiment).
	$(FINETUNE) run $(CONFIG) --out $(EXP)$(TRAIN_FLAGS)

tracin: $(INSTALL_DEP)  ## TracIn-CP dot products at every checkpoint of the runs in $(EXP).
	$(FINETUNE) tracin $(EXP)

simulate: $(INSTALL_SIM_DEP)  ## `simfluence evaluate` with every variant on $(EXP); saves each to $(EXP)/sim_<variant>.npz (+ sim_linear_margin.npz, featurized ones).
	$(SIMFLUENCE) evaluate $(EXP) $(SPLIT_FLAG) --out $(EXP)/results.json --save-simulators $(EXP)
	if compgen -G "$(EXP)/run_*/choice_losses.npy" > /dev/null; then \
	  $(SIMFLUENCE) evaluate $(EXP) $(SPLIT_FLAG) --metric margin --variants linear \
	    --out $(EXP)/results_margin.json --save-simulators $(EXP) > /dev/null || exit; \
	fi
	if [ -f "$(EXP)/features/$(firstword $(subst $(comma), ,$(UNSEEN_FEATURES))).npz" ]; then \
	  for v in linear-feat additive-feat; do \
	    $(SIMFLUENCE) fit $(EXP) --runs $(FEAT_FIT_RUNS) --valid-runs $(FEAT_VALID_RUNS) --variant $$v \
	      --features $(firstword $(subst $(comma), ,$(UNSEEN_FEATURES))) \
	      --out $(EXP)/sim_$$v.npz || exit; done; \
	fi

features: $(INSTALL_DEP)  ## Example features from the starting model (hidden states, step-0 TracIn gradient) -> $(EXP)/features/.
	$(FINETUNE) features $(EXP) --kind $(FEATURE_KINDS)

unseen: $(INSTALL_SIM_DEP)  ## Featurized Simfluence on examples never seen: four settings -> $(EXP)/results_unseen.{json,md}.
	$(SIMFLUENCE) evaluate $(EXP) $(SPLIT_FLAG) --test-examples $(UNSEEN_TESTS) \
	  --features $(UNSEEN_FEATURES) --out $(EXP)/results_unseen.json > $(EXP)/.results_unseen.md
	mv $(EXP)/.results_unseen.md $(EXP)/results_unseen.md && cat $(EXP)/results_unseen.md

counterfactual: $(INSTALL_DEP)  ## After simulate: propose curricula, train them (finetune), score every simulator.
	$(SIMFLUENCE) counterfactual propose $(EXP) $(SPLIT_FLAG) $(CF_ARGS)
	$(FINETUNE) counterfactual $(EXP)$(TRAIN_FLAGS)
	$(SIMFLUENCE) counterfactual score $(EXP)

figures: $(INSTALL_SIM_DEP)  ## Trajectories, A/B, LDS, metric bars, lambda curve (PNG + PDF) and top influences for $(EXP).
	$(SIMFLUENCE) figures $(EXP) --runs $(PLOT_RUN) --tests $(TESTS) --out $(EXP)/figures \
	  --sim $(EXP)/sim_linear.npz$$(for v in $(subst $(comma), ,$(FIGURE_EXTRA_SIMS)); do \
	    if test -f $(EXP)/sim_$$v.npz; then printf ,$(EXP)/sim_$$v.npz; else \
	    echo "make figures: skipped FIGURE_EXTRA_SIMS variant $$v: no $(EXP)/sim_$$v.npz" >&2; fi; done)

table: $(INSTALL_SIM_DEP)  ## All finished experiments (runs/*/output) into results/table.md and .json.
	@if [ -z "$(strip $(TABLE_INPUTS))" ]; then \
	  echo "make table: no runs/*/output/results.json yet; run make simulate first" >&2; exit 2; fi
	mkdir -p $(dir $(TABLE_OUT)) && $(SIMFLUENCE) table $(TABLE_INPUTS) --out $(TABLE_OUT)

bench: $(INSTALL_DEP)  ## Every benchmark script that fits this machine (CPU sizes).
	$(PYTHON) scripts/bench_fit.py
	$(PYTHON) scripts/bench_model.py
	$(PYTHON) scripts/bench_runs.py --synthetic
	$(PYTHON) scripts/bench_tracin.py

lint: $(INSTALL_DEP)  ## ruff format --check and ruff check.
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

TPU_TARGET ?= runs
ACCELERATOR ?= v4-8
TPU_VERSION ?= tpu-ubuntu2204-base
tpu-submit:  ## make TPU_TARGET (runs) for CONFIG on every worker of TPU VM TPU in ZONE; OUT=gs://... CREATE=1 DRY_RUN=1
	scripts/tpu/submit.sh --tpu "$(TPU)" --zone "$(ZONE)" --config "$(CONFIG)" --out "$(OUT)" \
	  --target "$(TPU_TARGET)" --accelerator-type "$(ACCELERATOR)" --version "$(TPU_VERSION)" \
	  $(if $(PROJECT),--project "$(PROJECT)") $(if $(CREATE),--create) \
	  $(if $(DETACH),--detach) $(if $(DRY_RUN),--dry-run)

# Deviceless H200 compile of the train step (scripts/aot_gpu_report.py) in its own venv: jax is
# pinned to the CUDA plugin's version there. Two pip steps, split at "# >>> no-deps" in the file.
AOT_VENV ?= .venv-aot
AOT_REQ := scripts/aot_gpu_requirements.txt
AOT_ARGS ?= --size small --batch 32 --layers unroll
.PHONY: aot-report
$(AOT_VENV)/.installed: $(AOT_REQ)
	$(PY_BOOT) -m venv $(AOT_VENV)
	$(AOT_VENV)/bin/python -m pip install -q --upgrade pip
	$(AOT_VENV)/bin/python -m pip install -q -r <(sed '/^# >>> no-deps/,$$d' $(AOT_REQ))
	$(AOT_VENV)/bin/python -m pip install -q --no-deps -r <(sed -n '/^# >>> no-deps/,$$p' $(AOT_REQ))
	touch $@

aot-report: $(AOT_VENV)/.installed  ## Kernels, GEMMs, roofline ms of the train step compiled for an H200, no GPU; AOT_ARGS="--size large"
	JAX_PLATFORMS=cpu $(AOT_VENV)/bin/python scripts/aot_gpu_report.py $(AOT_ARGS)
