# `make help` lists the targets. Every target creates the virtual environment when it is missing.
# Offline machines read data from a local mirror: DATA_MIRROR=/path/to/mirror make <target>.
VENV ?= .venv
PY := $(VENV)/bin/python
SCALE ?= cpu
export DATA_MIRROR

.PHONY: help setup train test test-slow reproduce-table1 reproduce-table2 reproduce-table3 reproduce-table4 table1 table2 table3 table4 bench nlg-cost clean-runs

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_% -]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-50s %s\n", $$1, $$2}'

setup: $(VENV)/.installed ## create .venv and install the pinned requirements and this package

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt
	$(VENV)/bin/pip install -q --no-deps -r requirements-nodeps.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

train: setup ## one GLUE run on the default config (MRPC, ResLoRA_bs, MiniLM-L6, cpu scale)
	$(PY) experiments/train.py

test: setup ## the fast test suite (slow end-to-end checks: make test-slow)
	$(PY) -m pytest -q

test-slow: setup ## end-to-end checks marked slow
	$(PY) -m pytest -q -m slow

reproduce-table2 reproduce-table3 reproduce-table4: reproduce-table%: setup ## a paper table (2: GLUE, 3: merge, 4: pre_num + Figs. 4, 5, gradient flow) at SCALE=smoke|cpu|paper; reruns only missing cells
	$(PY) experiments/train.py -m experiment=table$* scale=$(SCALE) hydra/launcher=joblib_cpu
	$(MAKE) table$* SCALE=$(SCALE)

# Table 1 (NLG) has its own scales (smoke_nlg, cpu_nlg, paper_nlg). The main grid (LoRA r=4 and the ResLoRA
# rows) runs 3 seeds; the other rows and the zero-shot reference run one seed below paper scale (budget).
comma := ,
TABLE1_SEEDS = $(if $(filter paper,$(SCALE)),0$(comma)1$(comma)2,0)
reproduce-table1: setup ## the paper's Table 1 (NLG: GSM8K, SVAMP, MathQA) at SCALE=smoke|cpu|paper; reruns only missing cells
	$(PY) experiments/train.py -m experiment=table1 scale=$(SCALE)_nlg hydra/launcher=joblib_cpu
	$(PY) experiments/train.py -m experiment=table1 scale=$(SCALE)_nlg hydra/launcher=joblib_cpu \
		method=lora_r16,adalora,loha,lokr seed=$(TABLE1_SEEDS)
	$(PY) experiments/train.py -m experiment=table1 scale=$(SCALE)_nlg hydra/launcher=joblib_cpu method=zero_shot seed=0
	$(MAKE) table1 SCALE=$(SCALE)

nlg-cost: setup ## seconds per training step and per generated batch of SmolLM2-135M -> results/nlg_cost.{json,md}
	$(PY) experiments/nlg_cost.py

table1 table2 table3 table4: table%: setup ## rebuild results/tableN.md and its figures from the run records
	$(PY) experiments/tables.py table$* --scale $(SCALE)

bench: setup ## training/inference cost of every variant vs HF PEFT LoRA -> results/bench.{json,md} (about 15 min)
	$(PY) experiments/bench.py

clean-runs: ## delete run dirs and checkpoints (records under results/ stay)
	rm -rf runs outputs multirun
