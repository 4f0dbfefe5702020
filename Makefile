# Two commands (see README): `make run` and `make test`. Both set up .venv first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
TOPOLOGY ?= topologies/ring.yaml

.PHONY: setup run test test-fast bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $@

run: setup
	P2PFL_PYTHON=$(PY) scripts/launch.sh $(TOPOLOGY) $(ARGS)

# Tests run on one pytest-xdist worker per core, at most 4: the multi-process tests idle while
# their peers wait for rounds, and more workers than that would only crowd the cores and memory.
# Tests marked `serial` run afterwards on their own (pytest exits 5 when a selection has none).
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

test: setup
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) -m "not serial" $(PYTEST_ARGS)
	$(PY) -m pytest -q -p no:cacheprovider -m serial $(PYTEST_ARGS); rc=$$?; [ $$rc -eq 5 ] && rc=0; exit $$rc

# The in-process lane: no peer processes (tests marked slow) and no serial measurements.
test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_JOBS) -m "not slow and not serial" $(PYTEST_ARGS)

bench: setup
	$(PY) bench/gossip_throughput.py
	$(PY) bench/compression.py

lint: setup
	$(VENV)/bin/ruff check p2pfl tests bench scripts

clean:
	rm -rf runs .pytest_cache
