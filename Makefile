# mmfusion: `make demo` and `make test` each create .venv on first use, then do their job.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
DEMO   ?= runs/demo
PORT   ?= 8000

.PHONY: install demo test test-all lint bench bench-index bench-hf bench-fusion bench-video bench-serve bench-generate clean

install: $(STAMP)

# torch==2.13.0 goes in first when no torch is there: an unpinned torch would pull
# several GB of CUDA packages, and the pinned CPU build satisfies the package's range.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

# data, the three models (CLIP, captioner, VQA), reports and index are reused from the last run (about 12 minutes
# the first time on 2 cores, seconds after); serves until Ctrl-C
demo: $(STAMP)
	$(VENV)/bin/mmfusion demo --out $(DEMO) --port $(PORT)

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

# about 25 minutes on 2 cores: speed side by side with transformers' CLIPModel, then quality over 3 seeds
bench: $(STAMP)
	mkdir -p runs
	$(PY) benchmarks/bench_clip_speed.py --json runs/bench-speed.json
	$(PY) benchmarks/bench_clip_quality.py --budget 3m --seeds 0 1 2 --folder --json runs/bench-quality.json

# about 10 minutes and 8 GiB of RAM: 1M-vector search latency, then indexing 2,000 generated 3000x2000 photos
bench-index: $(STAMP)
	mkdir -p runs
	$(PY) benchmarks/bench_index_search.py --json runs/bench-index-search.json
	$(PY) benchmarks/bench_index_build.py --json runs/bench-index-build.json

# about 12 minutes: every fusion strategy and the unimodal baselines on ShapesWorld image + sound, 2 seeds
bench-fusion: $(STAMP)
	mkdir -p runs
	$(VENV)/bin/mmfusion bench fusion --out runs/bench-fusion

# about 3 minutes: CLIP ViT-B/32 embeddings through mmfusion's adapter vs transformers directly, fp32 and int8
bench-hf: $(STAMP)
	mkdir -p runs
	$(PY) benchmarks/bench_hf_embed.py --repeats 9 --json runs/bench-hf-embed.json

# about 15 minutes: TimeSformer vs joint attention vs frame pooling on ShapesWorld actions, FLOPs and time per clip,
# batched divided attention vs its frame-by-frame loop
bench-video: $(STAMP)
	mkdir -p runs
	$(PY) benchmarks/bench_video.py --json runs/bench-video.json

# about 4 minutes: the service on loopback under 32 concurrent clients, dynamic batching vs none, 60 s each
bench-serve: $(STAMP)
	mkdir -p runs
	$(PY) benchmarks/bench_serve_load.py --preset vit-b-32 --seconds 60 --json runs/bench-serve-load.json

# about 66 minutes: CLIP 3 min -> captioner 7 min -> VQA fine-tune 10 min, three seeds; and the key-value cache
bench-generate: $(STAMP)
	mkdir -p runs
	$(PY) benchmarks/bench_generate_quality.py --seeds 0 1 2 --json runs/bench-generate.json
	$(PY) benchmarks/bench_caption_cache.py --repeats 5 --json runs/bench-caption-cache.json

clean:
	rm -rf $(VENV) runs .pytest_cache
