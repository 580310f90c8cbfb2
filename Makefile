# iotbridge: `make demo` runs everything on embedded defaults; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PACKAGES := bridge workers broker simulators config observability gateway
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test check bench bench-gateway services soak clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Real servers for the integration tests (promtool from Debian's prometheus package, and
# faketime for the clock-skew tests, chromium for the web UI tests, wrk for bench/gateway_bench.py):
# installed with apt-get when missing and we are root.
services:
	@missing=""; \
	command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	command -v mosquitto_pub >/dev/null || missing="$$missing mosquitto-clients"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v faketime >/dev/null || missing="$$missing faketime"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "installing:$$missing"; \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else \
			echo "missing:$$missing -- install with: sudo apt-get install$$missing" >&2; exit 1; \
		fi; \
	fi

demo: $(VENV)/.installed
	$(BIN)/iotbridge demo

test: $(VENV)/.installed services
	IOTBRIDGE_REQUIRE_SERVICES=1 $(BIN)/pytest

check: $(VENV)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy $(PACKAGES) bench

# 30 minutes at 500 msg/s with a fault every 2 minutes, then the audit (tests/soak.py); the
# 3-minute version is tests/integration/test_soak.py, part of `make test`.
soak: $(VENV)/.installed services
	$(BIN)/python -m tests.soak --duration-s 1800 --fault-interval-s 120 --rate 500

bench: $(VENV)/.installed services
	$(BIN)/python bench/run.py

# The HTTP gateway against a naive one-XADD-per-request FastAPI ingestor, wrk at 64 connections.
bench-gateway: $(VENV)/.installed services
	$(BIN)/python bench/gateway_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
