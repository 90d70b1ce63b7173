# Every target installs what it needs into .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo test bench lint clean sysdeps cbuild man completions

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# compat: the checkout goes on sys.path through a plain .pth, not an import hook (which costs every
	# process of the stack and of the suite ~8 ms of start-up)
	$(PY) -m pip install -q -e ".[test,lint,mount]" --config-settings editable_mode=compat
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m apps.demo configs/demo.toml

# The network tests (tests/net) need iproute2, nftables and ping (the ovpn tunnel), `styx mount` libfuse 3;
# as root, install them if missing.
sysdeps:
	@if [ "$$(id -u)" = 0 ] && ! { command -v nft && command -v ip && command -v fusermount3 && command -v ping; } \
		>/dev/null 2>&1; then \
		(apt-get update -qq && apt-get install -y -qq nftables iproute2 fuse3 iputils-ping) >/dev/null 2>&1 \
		|| echo "warning: could not install nftables/iproute2/fuse3/iputils-ping; the tests needing them will skip"; fi

# C Ouroboros 0.23, for the interop tests and the tests on C's crypto: built once as root (about 2 minutes)
# with ../shared/tools/build-ouroboros-c, which installs its own build packages, into $$OUROBOROS_C. Before the
# suite, so that every test finds it (a test that needs it and finds none says so, or fails as root).
OUROBOROS_C ?= /opt/ouroboros-c-0.23
CBUILD := ../shared/tools/build-ouroboros-c
cbuild:
	@if [ "$$(id -u)" = 0 ] && [ -x $(CBUILD) ]; then $(CBUILD) $(OUROBOROS_C) >/dev/null \
		|| echo "warning: C Ouroboros 0.23 did not build; the tests on it will fail"; fi

# Bytecode is cached first, whether or not PYTHONDONTWRITEBYTECODE is set: the project's for every process
# of the suite, and the test modules as pytest rewrites them (by one collection, not one per worker).
test: $(STAMP) sysdeps cbuild
	$(PY) -m compileall -q -j 0 proto irmd ipcp flowlib transports apps tests >/dev/null
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -q --collect-only -n 0 -p no:cacheprovider >/dev/null || true
	$(PY) tests/third_party.py  # the 9P clients' venvs, made once, outside any test's timeout
	$(PY) -m pytest -q

# Manual pages and shell completion, made from the tools' own parsers (apps/manuals.py).
man: $(STAMP)
	$(PY) -m apps.manuals man build/man

completions: $(STAMP)
	$(PY) -m apps.manuals completions build/completions

bench: $(STAMP)
	$(PY) -m bench

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) build bench/results.json .pytest_cache .mypy_cache
