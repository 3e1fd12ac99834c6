# Set-up and every command of vae-dist. `make demo` and `make test` set everything up themselves.
PYTHON  ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.14.1 torchvision==0.29.1
MODEL   ?= conv
CONFIG  ?= configs/$(MODEL).yaml
DATASET ?= fashion-mnist
RUNS    ?= runs
EPOCHS  ?= 3
NPROC   ?= 2
ARGS    ?=
RUN     ?=

.PHONY: setup data train train-ddp demo export verify sample test bench bench-infer clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

# Found already, or installed from Debian's package (as root), or downloaded by torchvision.
data: setup
	@$(BIN)/vae-dist data --dataset $(DATASET) --no-download >/dev/null 2>&1 || { \
	  if [ "$(DATASET)" = fashion-mnist ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist; } || true; \
	  fi; }
	$(BIN)/vae-dist data --dataset $(DATASET)

train: data
	$(BIN)/vae-dist train --config $(CONFIG) --output-dir $(RUNS) $(ARGS)

train-ddp: data
	$(BIN)/accelerate launch --config_file configs/accelerate/cpu_2proc.yaml --num_processes $(NPROC) \
	  vae_dist/train.py --config $(CONFIG) --output-dir $(RUNS) $(ARGS)

demo: data
	$(BIN)/vae-dist train --config configs/linear.yaml --output-dir $(RUNS) --set train.epochs=$(EPOCHS)
	$(BIN)/vae-dist train --config configs/conv.yaml --output-dir $(RUNS) --set train.epochs=$(EPOCHS)
	$(BIN)/vae-dist export --output-dir $(RUNS)
	for kind in linear conv; do \
	  $(MAKE) --no-print-directory sample RUN=$$(ls -td $(RUNS)/$$kind-*/onnx | head -n 1) SAMPLES=$(RUNS)/samples/$$kind || exit 1; \
	done

# RUN: a run folder or name; empty = the latest run of each model.
export: data
	$(BIN)/vae-dist export $(RUN) --output-dir $(RUNS)

verify: data
	$(BIN)/vae-dist verify $(RUN) --output-dir $(RUNS)

# onnxruntime only (no torch): prior samples, test-set reconstructions and an interpolation,
# from the export of RUN (default: the newest verified export under runs/), into SAMPLES.
SAMPLER = $(BIN)/python -m export.sample
TEST_IDX = data/$(if $(filter mnist,$(DATASET)),MNIST,FashionMNIST)/raw/t10k-images-idx3-ubyte
SAMPLES ?= $(RUNS)/samples
sample: data
	mkdir -p $(SAMPLES)
	$(SAMPLER) sample $(if $(RUN),--model-dir $(RUN)) -n 64 --seed 1 --out $(SAMPLES)/prior.png
	$(SAMPLER) reconstruct $(if $(RUN),--model-dir $(RUN)) --idx $(TEST_IDX) -n 16 --out $(SAMPLES)/reconstructions.png
	$(SAMPLER) interpolate $(if $(RUN),--model-dir $(RUN)) --idx $(TEST_IDX) --pair 0 1 --out $(SAMPLES)/interpolation.png

test: data
	$(BIN)/pytest -q

bench: data
	$(BIN)/python -m vae_dist.bench

bench-infer: data
	$(BIN)/python -m export.bench_infer --output-dir $(RUNS)

clean:
	rm -rf $(VENV) bench .pytest_cache
