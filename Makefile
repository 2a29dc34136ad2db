# swin-triton: timm Swin -> ONNX -> Triton model repository.
# `make repo` and `make test` set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# What `make repo` builds (see `python -m builder repo --help`). Empty means the builder's own default (from its
# settings, listed in the README); only what you set is passed.
MODEL ?=
NAME ?=
WEIGHTS ?= random
# A text file of class names, one per line in class order (a fine-tuned model's own); empty: ImageNet's or class_<i>.
LABELS ?=
# Empty: container for a new repository; ADD_VERSION keeps the repository's own flavor.
FLAVOR ?=
MAX_BATCH ?=
PREFERRED ?=
QUEUE_DELAY_US ?=
MAX_QUEUE ?=
QUEUE_TIMEOUT_US ?=
INSTANCES ?=
# Instances of the preprocess model (the photo path with PREPROCESS=gpu); empty: 2.
PREPROCESS_INSTANCES ?=
# Largest batch of the preprocess model (the photo path with PREPROCESS=gpu); empty: MAX_BATCH.
PREPROCESS_MAX_BATCH ?=
# The GPU photo path's design: auto (inductor engine: fused, hybrid from 6 PREPROCESS_INSTANCES; else bls)
#   | fused | bls | hybrid
GPU_PHOTO_PATH ?=
# hybrid: the largest batch (images) the photo path classifies in its own process; empty: 8.
HYBRID_LOCAL_BATCH ?=
# PREPROCESS=gpu: measure (empty: on a GPU build host, time the photo path's processes, batch limit and MPS and
# write the fastest) | fixed (the hand-measured setup)
PHOTO_SETUP ?=
# exact | draft (large JPEGs decoded at a reduced scale, parity-gated) | gpu (batched GPU JPEG decode and resize, parity-gated)
PREPROCESS ?=
# auto (on a GPU host: the fastest candidate by measurement; else onnxruntime) | onnxruntime | inductor |
# tensorrt (with PLAN_ARGS="--plan ...");  TORCH_COMPILE (inductor): none | default | reduce-overhead (default)
ENGINE ?=
TORCH_COMPILE ?=
MODEL_KWARGS ?=
REPO ?= model_repository
VERSION_POLICY ?=
ADD_VERSION ?=
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002
# none | poll | explicit (`perf tune` needs explicit).
MODEL_CONTROL ?= none
# MPS=1: `make serve` starts a CUDA MPS daemon of its own (GPU instances share each GPU at once); MPS=0: never;
# empty: as the build chose (a GPU photo path of several instances is served under MPS).
MPS ?=
# counters | summaries | off: what the metrics port exports (empty: counters, Triton's default).
METRICS ?=
PYTEST_ARGS ?=

# A value as one shell word, whatever it holds (spaces, quotes, JSON): `$(call q,$(REPO))`.
q = '$(subst ','\'',$(1))'
# `--flag 'value'` when the value is set, nothing when it is empty: `$(call opt,--model,$(MODEL))`.
opt = $(if $(2),$(1) $(call q,$(2)))

ifeq ($(WEIGHTS),pretrained)
WEIGHT_ARGS := --pretrained
else ifeq ($(WEIGHTS),random)
WEIGHT_ARGS :=
else
WEIGHT_ARGS := --checkpoint $(call q,$(WEIGHTS))
endif

.PHONY: help venv repo check serve stop test test-gpu clean analyzer analyze
help:
	@echo "make repo      export the model and write REPO ($(REPO)); takes MODEL NAME WEIGHTS=random|pretrained|PATH LABELS"
	@echo "               FLAVOR=container|local ENGINE TORCH_COMPILE PLAN_ARGS PREPROCESS PREPROCESS_INSTANCES"
	@echo "               PREPROCESS_MAX_BATCH GPU_PHOTO_PATH HYBRID_LOCAL_BATCH PHOTO_SETUP MAX_BATCH PREFERRED QUEUE_DELAY_US"
	@echo "               MAX_QUEUE QUEUE_TIMEOUT_US INSTANCES MODEL_KWARGS VERSION_POLICY ADD_VERSION=1"
	@echo "make check     report what tritonserver would reject in REPO"
	@echo "make serve     start the local tritonserver on REPO in the background; takes HTTP_PORT GRPC_PORT"
	@echo "               METRICS_PORT MODEL_CONTROL=none|poll|explicit MPS=1|0 (empty: as the build chose)"
	@echo "               METRICS=counters|summaries|off"
	@echo "make stop      stop the server that make serve started"
	@echo "make test      the test suite (real export, ONNX Runtime, tritonserver, perf_analyzer); PYTEST_ARGS"
	@echo "make test-gpu  the GPU code paths on this host's GPU (skipped without one); GPU_PYTHON PYTEST_ARGS"
	@echo "make analyze   Triton's Model Analyzer on REPO; ANALYZE_MODELS=classifier|preprocess|ensemble"
	@echo "make clean     stop the server, remove REPO, its monitoring/, .server and build"
	@echo "make docker-files | plan-docker | serve-docker   NVIDIA's containers (a GPU host with Docker)"

venv: $(STAMP)
$(STAMP): pyproject.toml requirements-modelopt.txt
	@# System packages: libb64-0d for perf_analyzer; prometheus for promtool and the real Prometheus of the tests.
	@missing=""; ldconfig -p | grep -q libb64.so.0d || missing="libb64-0d"; \
	  command -v promtool >/dev/null || missing="$$missing prometheus"; \
	  if [ -n "$$missing" ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "installing $$missing"; (apt-get install -y -qq $$missing >/dev/null 2>&1 || \
	    (apt-get update -qq >/dev/null && apt-get install -y -qq $$missing >/dev/null)); fi; true
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[builder,dev]'
	$(PY) -m pip install -q --no-deps -r requirements-modelopt.txt
	touch $(STAMP)

repo: $(STAMP)
	$(PY) -m builder repo $(call opt,--model,$(MODEL)) $(call opt,--name,$(NAME)) $(WEIGHT_ARGS) $(call opt,--labels,$(LABELS)) \
	  $(call opt,--flavor,$(FLAVOR)) $(call opt,--max-batch-size,$(MAX_BATCH)) \
	  $(call opt,--preferred-batch-sizes,$(PREFERRED)) $(call opt,--max-queue-delay-us,$(QUEUE_DELAY_US)) \
	  $(call opt,--max-queue-size,$(MAX_QUEUE)) $(call opt,--queue-timeout-us,$(QUEUE_TIMEOUT_US)) \
	  $(call opt,--instance-count,$(INSTANCES)) $(call opt,--preprocess,$(PREPROCESS)) \
	  $(call opt,--preprocess-instances,$(PREPROCESS_INSTANCES)) \
	  $(call opt,--preprocess-max-batch-size,$(PREPROCESS_MAX_BATCH)) \
	  $(call opt,--gpu-photo-path,$(GPU_PHOTO_PATH)) $(call opt,--hybrid-local-batch,$(HYBRID_LOCAL_BATCH)) \
	  $(call opt,--photo-setup,$(PHOTO_SETUP)) \
	  $(call opt,--engine,$(ENGINE)) $(call opt,--torch-compile,$(TORCH_COMPILE)) \
	  $(call opt,--model-kwargs,$(MODEL_KWARGS)) $(call opt,--version-policy,$(VERSION_POLICY)) \
	  $(if $(ADD_VERSION),--add-version) --output $(call q,$(REPO)) $(PLAN_ARGS)

check: $(STAMP)
	$(PY) -m builder check $(call q,$(REPO))

serve: $(STAMP)
	$(PY) -m builder serve --detach --repository $(call q,$(REPO)) --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT) \
	  --model-control $(MODEL_CONTROL) $(if $(filter 1,$(MPS)),--mps) $(if $(filter 0,$(MPS)),--no-mps) \
	  $(call opt,--metrics,$(METRICS))

stop: $(STAMP)
	$(PY) -m builder stop

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The GPU code paths on this host's GPU (skipped without one). GPU_PYTHON: a Python that has torch with CUDA and
# tritonserver's wheel (default: the venv); GPU_TEST_RECORD=path.json writes the run's record (tests/gpu/runs/).
GPU_PYTHON ?=
test-gpu: $(if $(GPU_PYTHON),,$(STAMP))
	$(or $(GPU_PYTHON),$(PY)) -m pytest -m gpu tests/gpu -p no:cacheprovider $(PYTEST_ARGS)

# A server started from .server/ is stopped first: removing its folder under it would leave it running.
clean:
	if [ -x $(PY) ]; then $(PY) -m builder stop; fi
	rm -rf $(call q,$(REPO)) .server build
	@# The monitoring files beside the repository, only where this tool wrote them (its marker file).
	m="$$(dirname $(call q,$(REPO)))/monitoring"; if [ -f "$$m/.generated-by-builder" ]; then rm -rf "$$m"; fi

# Triton's Model Analyzer, in its own environment (it needs a newer tritonclient than the pinned 2.51).
ANALYZER_VENV ?= .venv-analyzer
ANALYZE_MODELS ?= classifier
analyzer: $(ANALYZER_VENV)/bin/model-analyzer
$(ANALYZER_VENV)/bin/model-analyzer:
	test -x $(ANALYZER_VENV)/bin/python || $(PYTHON) -m venv $(ANALYZER_VENV)
	# protobuf <= 6.33.6 (works): Model Analyzer 1.58 reads FieldDescriptor.label, which the newer protobuf of a
	# GPU host's torch environment no longer had.
	$(ANALYZER_VENV)/bin/python -m pip install -q "triton-model-analyzer==1.58.0" "protobuf>=5,<=6.33.6"

analyze: $(STAMP) analyzer
	$(PY) -m perf analyze --repository $(call q,$(REPO)) --models $(ANALYZE_MODELS) --analyzer $(ANALYZER_VENV)/bin/model-analyzer

# --- NVIDIA containers (a GPU host with Docker; release pinned in builder/settings/parts.py) ---
.PHONY: docker-files plan-docker serve-docker
docker-files: $(STAMP)
	$(PY) -m builder docker $(call opt,--model,$(or $(NAME),$(MODEL)))

plan-docker: docker-files
	mkdir -p build
	test -f $(call q,$(REPO)/manifest.json) || $(MAKE) repo
	docker compose -f docker/compose.yaml run --rm plan
	$(MAKE) repo ENGINE=tensorrt PLAN_ARGS="--plan build/model.plan"

# The server image gets torch when the repository needs it (inductor engine, gpu preprocessing).
# It stops when the repository fails its check, before any image is built.
serve-docker: docker-files
	$(PY) -m builder check $(call q,$(REPO))
	torch=$$($(PY) -m builder check $(call q,$(REPO)) --needs-torch) && \
	  WITH_TORCH=$$torch docker compose -f docker/compose.yaml up --build server
