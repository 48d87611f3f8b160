# moeinf developer commands. `make install` builds .venv; `make test` runs the suite; `make run` the demo.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test lint run clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[serve,test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts

clean:
	rm -rf $(VENV) build src/*.egg-info

# --- demo model (engineer D): `make run` shows moeinf on the packaged demo MoE, offline ----------------
DEMO_PROMPT ?= def parse_args(argv):
DEMO_RAM ?= 25%# expert cache budget: a quarter of the demo model's 192 experts
DEMO_BUILD := build/demo_model
DEMO_DEBS := python3.11-doc bible-kjv bible-kjv-text
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo-model

run: $(STAMP)
	$(BIN)/moeinf pull demo
	$(BIN)/moeinf run demo "$(DEMO_PROMPT)" --max-tokens 64 --ram-mem $(DEMO_RAM) --verbose

# Rebuilds src/moeinf/demo/ from scratch: Debian text packages -> corpus -> tokenizer -> training
# (450 steps: about 8 minutes on an idle 2-core CPU; much longer while the CPU is shared).
demo-model: $(STAMP)
	dpkg -s $(DEMO_DEBS) >/dev/null 2>&1 || ($(SUDO) apt-get update && $(SUDO) apt-get install -y $(DEMO_DEBS))
	$(BIN)/python scripts/demo_model/corpus.py --out $(DEMO_BUILD)/corpus
	$(BIN)/python scripts/demo_model/train_tokenizer.py --corpus $(DEMO_BUILD)/corpus --out $(DEMO_BUILD)/tokenizer
	nice -n 19 $(BIN)/python scripts/demo_model/train.py --corpus $(DEMO_BUILD)/corpus \
		--tokenizer $(DEMO_BUILD)/tokenizer --out $(DEMO_BUILD)/model --state $(DEMO_BUILD)/train_state.pt
	cp $(DEMO_BUILD)/model/*.json $(DEMO_BUILD)/model/model.safetensors src/moeinf/demo/
	$(BIN)/python scripts/demo_model/routing_stats.py --model src/moeinf/demo --corpus $(DEMO_BUILD)/corpus
