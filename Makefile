# Everyday commands. Each creates .venv and installs relayq into it first if needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-unit test-process lint proto up clean bench-smoke browser console-screenshots

# Two distributions, both editable: relayq-client (client/: relayq.client and the generated
# relayq.v1) and relayq (the services), which depends on it.
$(STAMP): pyproject.toml client/pyproject.toml client/setup.py protos/generate.py \
		$(wildcard protos/relayq/v1/*.proto)
	$(PYTHON) -m venv $(VENV)
	rm -rf relayq/v1  # generated there by checkouts from before relayq-client: now stale
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e './client[speedups]' -e '.[dev]'
	touch $@

install: $(STAMP)

# A whole local cluster with demo traffic and a live view, until Ctrl-C: an embedded Postgres
# under .relayq/ (or RELAYQ_DATABASE_URL), ingest, router, admin. Flags: make up ARGS='--help'.
up: install
	$(BIN)/relayq up $(ARGS)

# The whole suite against the Postgres at RELAYQ_TEST_DATABASE_URL
# (default postgresql://postgres@127.0.0.1:5432/postgres), or an embedded one under
# .relayq/test-pgdata when nothing answers there.
test: install
	@echo "make test: the whole suite, usually 8-10 minutes on 2 cores (pytest prints the time at the end)"
	$(BIN)/python -m tools.testdb $(BIN)/pytest

# Debian's Chromium and its driver, for the console's browser tests (tests/integration/test_console.py),
# installed only when missing: nothing is downloaded at test time.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "installing chromium and chromium-driver (Debian) for the browser tests"; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends \
			chromium chromium-driver fonts-liberation >/dev/null; \
	fi

# The console's browser tests, saving their screenshots into docs/console/ (docs/console.md).
# Quantised with pngquant when it is installed (Debian's pngquant), to keep them small.
console-screenshots: install browser
	RELAYQ_CONSOLE_SCREENSHOTS=docs/console $(BIN)/python -m tools.testdb \
		$(BIN)/pytest tests/integration/test_console.py
	@if command -v pngquant >/dev/null; then \
		for f in docs/console/*.png; do \
			pngquant --force --skip-if-larger --quality=70-90 --output "$$f" "$$f" || true; \
		done; \
	fi

# The pure unit tests (tests/unit: no Postgres, no processes), in well under a minute.
test-unit: install
	@echo "make test-unit: the pure unit tests (tests/unit), usually 20-30 seconds"
	$(BIN)/pytest -q tests/unit

# Only the tests that start, kill -9 and restart service processes: tests/process, and the
# few marked `process` among the integration tests.
test-process: install
	$(BIN)/python -m tools.testdb $(BIN)/pytest -m process

# Every benchmark at a size that takes seconds: figures printed, nothing asserted but that
# they run (CI runs this, so a benchmark cannot rot unnoticed).
BENCHES := ingest ingest_pair subscriptions router fanout admin outcomes partitions chaos console events replay http_client
bench-smoke: install
	@for bench in $(BENCHES); do \
		echo "== bench/$$bench.py --smoke"; \
		$(BIN)/python -m bench.$$bench --smoke || exit 1; \
	done

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# Regenerate relayq.v1 (client/src/relayq/v1) from protos/ (installs do it too).
proto: install
	$(BIN)/python protos/generate.py

clean:
	rm -rf $(VENV) build *.egg-info client/build client/src/*.egg-info \
		client/src/relayq/v1/*_pb2* relayq/v1
