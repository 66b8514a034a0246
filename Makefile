# The two commands a user needs:  `make demo` (the whole pipeline on built-in data) and `make test`.
PY ?= python3
PIP ?= $(PY) -m pip
# Test workers: pytest-xdist spreads test files over the cores; each worker uses one thread.
WORKERS ?= 2

.PHONY: setup setup-test demo data test lint gpu-check clean

setup:            ## install the pinned runtime dependencies (CPU torch on these machines)
	$(PIP) install -q -r requirements.txt

setup-test:       ## runtime + test-only references (transformers, peft) and the test runner
	$(PIP) install -q -r requirements-test.txt

data: setup       ## built-in offline corpus -> tokenizer -> token shards, plus the built-in tasks
	$(PY) prepare_data.py configs/data_builtin.yaml

demo: data        ## the whole life cycle on the built-in data (grows with each stage)

test: setup-test  ## install and run the whole test suite
	OMP_NUM_THREADS=1 $(PY) -m pytest -n $(WORKERS) --dist loadfile tests

lint:
	ruff format --check . && ruff check .

gpu-check:        ## on a CUDA machine: the Triton kernel compiled for real, then the attention benchmark
	bash benchmarks/gpu_check.sh

clean:
	rm -rf data out runs
