# The two commands a user needs:  `make demo` (the whole life cycle on built-in data) and `make test`.
# Every stage is also a target of its own; each leaves a marker (meta.json / DONE), so a rerun skips what
# is finished and an interrupted stage resumes from its last checkpoint. FORCE=1 redoes every stage.
# Python: the active virtual environment (venv or conda) when there is one; otherwise a project environment in
# .venv, made on first use. A system Python on Debian 12 / Ubuntu 24.04 refuses `pip install` (PEP 668), and a
# project environment keeps the pinned versions away from everything else on the machine.
IN_ENV := $(shell python3 -c 'import os, sys; print(int(sys.prefix != sys.base_prefix or "CONDA_PREFIX" in os.environ))' 2>/dev/null)
ifeq ($(IN_ENV),1)
PY ?= python3
endif
PY ?= .venv/bin/python
ENV_DEP := $(filter .venv/bin/python,$(PY))
PIP ?= $(PY) -m pip
WORKERS ?= 2          # pytest-xdist workers; each uses one thread
FORCE ?=
_force := $(if $(FORCE),FORCE,)

DATA     := data/builtin/meta.json
PRETRAIN := out/pretrain/DONE
SFT      := out/sft/DONE
DPO      := out/dpo/DONE
GRPO     := out/grpo/DONE

.PHONY: setup setup-test demo demo-rl data pretrain sft dpo grpo eval samples test mutate lint gpu-check demo-vlm figures results clean FORCE

setup: $(ENV_DEP) ## the pinned runtime dependencies (CPU torch on these machines)
	$(PIP) install -q -r requirements.txt

.venv/bin/python:  # not inside an environment: make the project's own (Python 3.11-3.13: every pinned wheel exists)
	@echo "make: no active virtual environment; creating one in .venv (activate it with: source .venv/bin/activate)"
	@python3 -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 11) <= v <= (3, 13) else "make: Python 3.11-3.13 needed, python3 is %d.%d" % v)'
	python3 -m venv .venv || { echo "make: python3 -m venv failed; on Debian/Ubuntu: sudo apt-get install python3-venv"; exit 1; }

setup-test: $(ENV_DEP) ## runtime + test-only references (transformers, peft, openai), the test runner, a headless browser
	$(PIP) install -q -r requirements-test.txt
	@# The chat page's browser test needs Chromium + chromedriver from the OS. Installed only as root on Debian/Ubuntu
	@# (apt-get); elsewhere the test skips and says why.
	@if ! command -v chromedriver >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null) \
			|| echo "setup-test: could not install chromium; the browser test will skip"; \
	fi

demo: setup $(DPO) eval samples   ## data -> tokenizer -> pretrain -> SFT (full, Muon) -> DPO (LoRA) -> eval -> samples

data: $(DATA)
$(DATA): $(_force) | setup
	$(PY) prepare_data.py configs/data_builtin.yaml $(if $(FORCE),overwrite=true,)

pretrain: $(PRETRAIN)
$(PRETRAIN): $(DATA) $(_force)
	$(PY) train_pretrain.py configs/pretrain_tiny.yaml $(if $(FORCE),resume=never overwrite=true,)

sft: $(SFT)
$(SFT): $(PRETRAIN) $(_force)
	$(PY) train_sft.py configs/sft_tiny.yaml $(if $(FORCE),resume=never overwrite=true,)

dpo: $(DPO)
$(DPO): $(SFT) $(_force)
	$(PY) train_dpo.py configs/dpo_tiny.yaml $(if $(FORCE),resume=never overwrite=true,)

demo-rl: setup $(GRPO)  ## GRPO (LoRA) on the built-in tasks from the SFT model: held-out accuracy before -> after
	$(PY) eval.py compare=out/sft,out/grpo/merged data= choices=

grpo: $(GRPO)
$(GRPO): $(SFT) $(_force)
	$(PY) train_grpo.py configs/grpo_tiny.yaml $(if $(FORCE),resume=never overwrite=true,)

eval: $(DPO)      ## base -> SFT -> DPO side by side: loss, bits/byte, task accuracy; out/summary.png, out/eval.json
	$(PY) eval.py compare=out/pretrain,out/sft,out/dpo/merged plot=out/summary.png save=out/eval.json

samples: $(DPO)   ## a few answers from each stage
	@for ckpt in out/pretrain out/sft out/dpo/merged; do \
		echo "== $$ckpt"; \
		printf "len('banana') = ?\nsorted([3, 1, 2]) = ?\n'abc'.upper() = ?\n" | \
			$(PY) sample.py checkpoint=$$ckpt chat=true temperature=0 max_new_tokens=16; \
	done

VLM := out/vlm/DONE
demo-vlm: setup $(VLM)  ## ViT + projector + tiny LM on built-in shapes: tower pretraining, both LLaVA stages, VQA accuracy, two answers
	$(PY) eval.py checkpoint=out/vlm data= tasks= choices= vqa=builtin
	$(PY) vlm_data.py out_dir=data/vlm n_caption=1 n_train=1 n_test=4
	$(PY) sample.py checkpoint=out/vlm image=data/vlm/images/test_00000.png prompt="What colour is the shape?" temperature=0 max_new_tokens=8
	$(PY) sample.py checkpoint=out/vlm image=data/vlm/images/test_00000.png prompt="What shape is it?" temperature=0 max_new_tokens=8
$(VLM): $(DATA) $(_force)  # the fresh LM uses the tokenizer that `make data` trains
	$(PY) train_vlm.py configs/vlm_tiny.yaml $(if $(FORCE),resume=never overwrite=true,)

test: setup-test  ## install and run the whole test suite
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(WORKERS) --dist loadfile tests

mutate: setup-test ## realistic bugs, one at a time in a scratch copy: which does the suite catch? (~20 min, not in test)
	$(PY) tests/mutate.py

lint: setup-test
	$(PY) -m ruff format --check . && $(PY) -m ruff check .

results: setup    ## the demo's numbers (out/eval.json, logs, data/builtin/meta.json) into docs/results/demo.json, which the docs quote
	$(PY) docs/make_results.py out_dir=out data_dir=data/builtin

figures: setup    ## re-draw the tutorial's PNGs in docs/img/ (loss curves from out/, skipped when a run is missing)
	$(PY) docs/make_figures.py out_dir=out

gpu-check: setup  ## on a CUDA machine: kernel tests compiled, attention + training benchmarks, a short GPU run
	$(if $(ENV_DEP),PATH=$(CURDIR)/.venv/bin:$$PATH,) bash benchmarks/gpu_check.sh

clean:
	rm -rf data out runs

FORCE:
