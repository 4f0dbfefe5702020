# Two commands (see README): `make run` and `make test`. Both set up .venv first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
TOPOLOGY ?= topologies/ring.yaml

.PHONY: setup run test bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: setup
	P2PFL_PYTHON=$(PY) scripts/launch.sh $(TOPOLOGY) $(ARGS)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(PY) bench/gossip_throughput.py
	$(PY) bench/compression.py

lint: setup
	$(VENV)/bin/ruff check p2pfl tests bench scripts

clean:
	rm -rf runs .pytest_cache
