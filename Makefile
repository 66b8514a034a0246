# The two commands a user needs:  `make demo` (the whole life cycle on built-in data) and `make test`.
# Every stage is also a target of its own; each leaves a marker (meta.json / DONE), so a rerun skips what
# is finished and an interrupted stage resumes from its last checkpoint. FORCE=1 redoes every stage.
PY ?= python3
PIP ?= $(PY) -m pip
WORKERS ?= 2          # pytest-xdist workers; each uses one thread
FORCE ?=
_force := $(if $(FORCE),FORCE,)

DATA     := data/builtin/meta.json
PRETRAIN := out/pretrain/DONE
SFT      := out/sft/DONE
DPO      := out/dpo/DONE
GRPO     := out/grpo/DONE

.PHONY: setup setup-test demo demo-rl data pretrain sft dpo grpo eval samples test lint gpu-check demo-vlm clean FORCE

setup:            ## the pinned runtime dependencies (CPU torch on these machines)
	$(PIP) install -q -r requirements.txt

setup-test:       ## runtime + test-only references (transformers, peft) and the test runner
	$(PIP) install -q -r requirements-test.txt

demo: setup $(DPO) eval samples   ## data -> tokenizer -> pretrain -> SFT (LoRA) -> DPO -> eval -> samples

data: $(DATA)
$(DATA): $(_force)
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
	$(PY) eval.py compare=out/sft/merged,out/grpo/merged data= choices=

grpo: $(GRPO)
$(GRPO): $(SFT) $(_force)
	$(PY) train_grpo.py configs/grpo_tiny.yaml $(if $(FORCE),resume=never overwrite=true,)

eval: $(DPO)      ## base -> SFT -> DPO side by side: loss, bits/byte, task accuracy
	$(PY) eval.py compare=out/pretrain,out/sft/merged,out/dpo/merged

samples: $(DPO)   ## a few answers from each stage
	@for ckpt in out/pretrain out/sft/merged out/dpo/merged; do \
		echo "== $$ckpt"; \
		printf "len('banana') = ?\nsorted([3, 1, 2]) = ?\n'abc'.upper() = ?\n" | \
			$(PY) sample.py checkpoint=$$ckpt chat=true temperature=0 max_new_tokens=16; \
	done

VLM := out/vlm/DONE
demo-vlm: setup $(VLM)  ## ViT + projector + tiny LM on built-in shapes, both LLaVA stages, then VQA accuracy and one answer
	$(PY) eval.py checkpoint=out/vlm data= tasks= choices= vqa=builtin
	$(PY) vlm_data.py out_dir=data/vlm n_caption=1 n_train=1 n_test=4
	$(PY) sample.py checkpoint=out/vlm image=data/vlm/images/test_00000.png prompt="What colour is the shape?" temperature=0 max_new_tokens=8
$(VLM): $(_force)
	$(PY) train_vlm.py configs/vlm_tiny.yaml $(if $(FORCE),resume=never overwrite=true,)

test: setup-test  ## install and run the whole test suite
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(WORKERS) --dist loadfile tests

lint:
	ruff format --check . && ruff check .

gpu-check:        ## on a CUDA machine: kernel tests compiled, attention + training benchmarks, a short GPU run
	bash benchmarks/gpu_check.sh

clean:
	rm -rf data out runs

FORCE:
