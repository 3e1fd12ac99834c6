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

# The folders the commands use (vae_dist/paths.py): runs under $(RUNS), data under ./data.
export VAE_DIST_RUNS := $(RUNS)

.PHONY: setup data emoji node browser train train-ddp demo export verify sample web test test-fast lint bench bench-infer \
	bench-web clean

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
	@folder=$$($(BIN)/vae-dist data --dataset $(DATASET)) && echo "$(DATASET) is read from $$folder/"

# A real colour image set for the worked example and the tests: Twemoji's 64x64 PNGs (CC-BY 4.0)
# from the npm package emoji-datasource-twitter (MIT), unpacked into $(EMOJI).
EMOJI         ?= data/emoji-twitter-64
EMOJI_PACKAGE ?= emoji-datasource-twitter@16.0.0
emoji: $(EMOJI)/.complete
$(EMOJI)/.complete:
	@command -v npm >/dev/null || { echo "error: npm is needed to fetch $(EMOJI_PACKAGE) (apt-get install npm)" >&2; exit 2; }
	rm -rf $(EMOJI) $(EMOJI).partial $(EMOJI).images && mkdir -p $(EMOJI).partial
	cd $(EMOJI).partial && npm pack -q $(EMOJI_PACKAGE) >/dev/null && \
	  tar xzf emoji-datasource-twitter-*.tgz package/img/twitter/64 package/LICENSE
	mv $(EMOJI).partial/package/img/twitter/64 $(EMOJI).images && mv $(EMOJI).partial/package/LICENSE $(EMOJI).LICENSE
	rm -rf $(EMOJI).partial && mv $(EMOJI).images $(EMOJI) && touch $@

# Node.js and npm build a browser site (`vae-dist web` installs onnxruntime-web with npm ci); the
# browser tests drive Debian's chromium with playwright. Installed here, as root, when missing.
CHROMIUM ?= /usr/bin/chromium
export VAE_DIST_CHROMIUM := $(CHROMIUM)
APT_INSTALL = apt-get install -y -q $(1) >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q $(1); }
node:
	@command -v npm >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then $(call APT_INSTALL,nodejs npm); \
	  else echo "error: Node.js and npm are needed to build a browser site (apt-get install nodejs npm)" >&2; exit 2; fi; }

browser: setup node
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then $(call APT_INSTALL,chromium); \
	  else echo "error: the browser tests need $(CHROMIUM) (apt-get install chromium)" >&2; exit 2; fi; }
	@$(BIN)/python -c "from export import web; web.runtime_dist()"  # onnxruntime-web, once (npm ci)

train: data
	$(BIN)/vae-dist train --config $(CONFIG) --output-dir $(RUNS) $(ARGS)

train-ddp: data
	$(BIN)/vae-dist train --processes $(NPROC) --config $(CONFIG) --output-dir $(RUNS) $(ARGS)

# Each model: a new run (vae-dist train prints its folder), its export, and samples in RUN/samples/.
demo: data
	set -e; for kind in linear conv; do \
	  run=$$($(BIN)/vae-dist train --config configs/$$kind.yaml --output-dir $(RUNS) --set train.epochs=$(EPOCHS)); \
	  $(BIN)/vae-dist export "$$run"; \
	  $(MAKE) --no-print-directory sample RUN="$$run/onnx" SAMPLES="$$run/samples"; \
	done
	$(MAKE) --no-print-directory web

# RUN: a run folder or name; empty = the latest run of each model.
export: data
	$(BIN)/vae-dist export $(RUN) --output-dir $(RUNS)

verify: data
	$(BIN)/vae-dist verify $(RUN) --output-dir $(RUNS)

# onnxruntime only (no torch): prior samples, test-set reconstructions and an interpolation,
# from the export of RUN (default: the newest verified export under $(RUNS)), into SAMPLES.
# The test images are looked up, not prepared: `make demo` prepares the data once for both models,
# and `make sample` on its own runs `make data` only when they cannot be found.
SAMPLER = $(BIN)/python -m export.sample
SAMPLES ?= $(RUNS)/samples
TEST_IMAGES = $(BIN)/vae-dist data --dataset $(DATASET) --no-download --test-images
sample: setup
	mkdir -p $(SAMPLES)
	@test_idx="$$($(TEST_IMAGES) 2>/dev/null)" || \
	{ $(MAKE) --no-print-directory data >&2 && test_idx="$$($(TEST_IMAGES))"; } && \
	set -x && \
	$(SAMPLER) sample $(if $(RUN),--model-dir $(RUN)) -n 64 --seed 1 --out $(SAMPLES)/prior.png && \
	$(SAMPLER) reconstruct $(if $(RUN),--model-dir $(RUN)) --idx "$$test_idx" -n 16 --out $(SAMPLES)/reconstructions.png && \
	$(SAMPLER) interpolate $(if $(RUN),--model-dir $(RUN)) --idx "$$test_idx" --pair 0 1 --out $(SAMPLES)/interpolation.png

# The browser site of RUN's export (default: the newest verified one) into RUN/web; VARIANT=int8
# for the int8 files, ARGS="--serve" to serve it. It prints how to open it.
web: data node
	$(BIN)/vae-dist web $(RUN) --output-dir $(RUNS) $(if $(VARIANT),--variant $(VARIANT)) $(ARGS)

# Everything, nothing skipped (CI runs this); then the linter.
test: data emoji browser
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# The edit-test loop: leaves out the tests marked slow (accelerate launches, multi-process and
# end-to-end training runs, a package install, the benchmark run).
test-fast: data emoji browser
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .

bench: data emoji
	$(BIN)/python -m vae_dist.bench

bench-infer: data
	$(BIN)/python -m export.bench_infer --output-dir $(RUNS)

# Decode latency in headless Chromium against native onnxruntime, for the newest export of each model.
bench-web: setup node browser
	$(BIN)/python -m export.bench_web --output-dir $(RUNS)

clean:
	rm -rf $(VENV) bench .pytest_cache .ruff_cache
