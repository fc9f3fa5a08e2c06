# e-PediCare Call. `make demo` and `make test` work on a fresh Debian machine:
# each target installs what it needs (a virtualenv from pinned requirements;
# Debian packages through apt-get when a target needs them).

PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
CONFIG  ?= config.yaml
SESSION ?=
ARGS    ?=
STAMP   := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)

.PHONY: bench-storm bench-browser bench-call patient practitioner bench-deps apt-nodejs setup system-deps turn-deps turn bench-turn browser-deps run-relay test lint demo bench bench-relay screenshots clean

## setup: a virtualenv with the pinned requirements (idempotent)
setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	rm -f $(VENV)/.installed-* && touch $@

# Debian packages that some targets need, installed once (apt-get update first).
APT_STAMP := /var/lib/apt/periodic/.epedicare-apt-updated
define apt_install
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (run as root, or apt-get install them)"; exit 1; fi; \
	  [ -f $(APT_STAMP) ] || { apt-get update -qq && mkdir -p $$(dirname $(APT_STAMP)) && touch $(APT_STAMP); }; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
endef

## system-deps: Debian packages for calls in network namespaces (iproute2, iptables)
system-deps:
	$(call apt_install,iproute2 iptables)

## turn-deps: Debian's coturn (turnserver) for `make turn` and the TURN tests
turn-deps:
	$(call apt_install,coturn)

## browser-deps: Debian's Chromium for the browser tests (Playwright drives it; never `playwright install`)
browser-deps:
	$(call apt_install,chromium)

## run-relay: the signaling relay on ws://127.0.0.1:5001/ws
run-relay: setup
	$(PY) relay.py --config $(CONFIG) $(ARGS)

## test: the whole test suite (what CI runs)
test: setup system-deps turn-deps browser-deps
	$(PY) -m pytest $(ARGS)

## lint: ruff format check, ruff check, mypy --strict
lint: setup
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## demo: relay + two clients, prints what the call achieved, stops everything
demo: setup system-deps
	$(PY) -m peers.demo --config $(CONFIG) $(ARGS)

## patient, practitioner: one seat of a consultation, e.g. `make patient SESSION=test123`
patient practitioner: setup
	$(PY) -m peers.$@ --config $(CONFIG) $(if $(SESSION),--session $(SESSION)) $(ARGS)

## bench: every benchmark
bench: bench-relay bench-storm bench-call bench-browser bench-turn

## turn: a local coturn from the turn: section of $(CONFIG) (Ctrl-C stops it)
turn: setup turn-deps
	$(PY) -m peers.turnserver --config $(CONFIG) $(ARGS)

## bench-turn: first frame and latency, direct vs TURN over UDP and TCP, coturn's CPU (as root)
bench-turn: setup system-deps turn-deps
	$(PY) -m bench.turn $(ARGS)

## bench-call: calls through the relay and the peers' command lines vs two bare aiortc peers (as root)
bench-call: setup system-deps
	$(PY) -m bench.call $(ARGS)

## bench-browser: the browser client vs itself and the aiortc peers (as root)
bench-browser: setup system-deps browser-deps
	$(PY) -m bench.browser $(ARGS)

## bench-relay: relay vs a bare websockets forwarder (see docs/benchmarks.md); valgrind counts instructions
bench-relay: setup bench-deps
	$(call apt_install,valgrind)
	$(PY) -m bench.relay $(ARGS)

## bench-storm: 10,000 clients resume their seats at once after a relay restart (docs/benchmarks.md)
bench-storm: setup
	$(PY) -m bench.relay_storm $(ARGS)

## bench-deps: the Node `ws` load generator (npm ci from the committed lock file)
bench-deps: bench/loadgen/node_modules/.installed
bench/loadgen/node_modules/.installed: bench/loadgen/package-lock.json
	command -v npm >/dev/null || $(MAKE) --no-print-directory apt-nodejs
	cd bench/loadgen && npm ci --no-audit --no-fund
	touch $@

apt-nodejs:
	$(call apt_install,nodejs npm)

## screenshots: docs/screenshot-*.png of the browser client (start, waiting, in call)
screenshots: setup system-deps browser-deps
	$(PY) -m tests.screenshots

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis artifacts
