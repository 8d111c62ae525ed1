# uringserve: `make run` serves the demo app, `make test` runs everything, `make bench` measures.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SYS_PYTHON ?= python3
PYLIBDIR = $(shell $(PY) -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR') or '')")
CARGO_ENV = PYO3_PYTHON=$(abspath $(PY)) LD_LIBRARY_PATH=$(PYLIBDIR)$${LD_LIBRARY_PATH:+:$$LD_LIBRARY_PATH}
TEST_DEPS = maturin pytest trustme ruff mypy typing_extensions flask django requests
FUZZ_CASES ?= 1000000
NATIVE_SRC = $(wildcard src/*.rs src/**/*.rs) Cargo.toml pyproject.toml

.PHONY: help run capabilities test test-rust test-python fuzz develop lint bench bench-quick bench-limit clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.deps: Makefile
	@command -v cargo >/dev/null || { echo "cargo is required (rustup)"; exit 1; }
	@command -v $(SYS_PYTHON) >/dev/null || { echo "$(SYS_PYTHON) is required"; exit 1; }
	@$(SYS_PYTHON) -c "import venv, ensurepip" 2>/dev/null || \
		{ apt-get update -qq && apt-get install -y python3-venv; }
	@command -v curl >/dev/null || { apt-get update -qq && apt-get install -y curl; }
	test -x $(PY) || $(SYS_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TEST_DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(NATIVE_SRC)
	VIRTUAL_ENV=$(abspath $(VENV)) PATH=$(abspath $(VENV))/bin:$$PATH \
		$(VENV)/bin/maturin develop --release --quiet
	touch $@

develop: $(VENV)/.built ## build the native module and install it into the venv

run: develop ## print the io_uring capability report, then serve the demo app on :8000 (auto)
	$(PY) -m uringserve --capabilities
	$(PY) -m uringserve --port 8000 --io-uring auto

capabilities: develop ## print the io_uring capability report only
	$(PY) -m uringserve --capabilities

test-rust: $(VENV)/.deps ## cargo test
	$(CARGO_ENV) cargo test --quiet

# The same properties also run under `cargo test`, at proptest's default 256 cases each.
fuzz: $(VENV)/.deps ## long property-based fuzz run of the HTTP core (FUZZ_CASES per property)
	PROPTEST_CASES=$(FUZZ_CASES) $(CARGO_ENV) cargo test --profile fuzz --lib http::tests::fuzz

test-python: develop ## pytest over the native core and the policy layer
	$(PY) -m pytest -q

test: develop test-rust test-python ## build, cargo test, pytest

lint: develop ## rustfmt, clippy -D warnings, ruff, mypy, stubtest
	cargo fmt --check
	$(CARGO_ENV) cargo clippy --all-targets -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(PY) -m mypy python/uringserve
	$(PY) -m mypy.stubtest uringserve._uringserve

# The script installs its own tools (apt-get: wrk, perf, strace, gcc, liburing-dev, libev-dev),
# the peers into benches/.venv, and builds the C responder; results go to benches/results/.
bench: develop ## HTTP load: uringserve vs bjoern, granian, gunicorn and the io_uring C limit (~13 min)
	$(PY) benches/http_bench.py $(BENCH_ARGS)

bench-quick: develop ## smoke run of the same benchmark (2 s per run; results in *_quick.*)
	$(PY) benches/http_bench.py --quick $(BENCH_ARGS)

bench-limit: ## build the raw io_uring C responder, benches/limit/uring_limit
	$(SYS_PYTHON) benches/http_bench.py --build-limit

clean: ## remove build products and the venv
	cargo clean
	rm -rf $(VENV) benches/.venv benches/limit/uring_limit
