# e-PediCare Call. `make demo` and `make test` work on a fresh Debian machine:
# each target installs what it needs (a virtualenv from pinned requirements;
# Debian packages through apt-get when a target needs them).

PYTHON  ?= python3
VENV    ?= .venv
CONFIG  ?= config.yaml
SESSION ?=
ARGS    ?=
STAMP   := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

# Every variable a recipe passes on is quoted for the shell: q wraps one value
# in single quotes ('\'' for a quote inside), and is given the variable's raw
# text ($(value X)), so that neither the shell nor make evaluates what a
# caller typed: SESSION='x;touch /tmp/pwned' is one odd session id, refused by
# the peers with their one-line error. ARGS is split on blanks and each word
# quoted (ARGS="-k relay" works; quotes inside ARGS are not parsed).
# unexport: make would expand these to put them in the recipes' environment.
q    = '$(subst ','\'',$(1))'
qs   = $(foreach word,$(1),$(call q,$(word)))
unexport SESSION ARGS CONFIG PYTHON VENV
PY      := $(call q,$(value VENV)/bin/python)
CONFIG_ := $(call q,$(value CONFIG))
ARGS_   := $(call qs,$(value ARGS))

.PHONY: demo-turn help redis-deps haproxy-deps cluster bench-cluster netem-probe bench-storm bench-recovery bench-network bench-rate apt-systemd bench-browser bench-call patient practitioner bench-deps apt-nodejs setup system-deps turn-deps turn bench-turn browser-deps nginx-deps caddy-deps systemd-deps run-relay test lint demo bench bench-relay screenshots clean

## setup: a virtualenv with the pinned requirements, runtime and development (idempotent)
setup: $(STAMP)

# system-deps first: NetfilterQueue (test/bench only) compiles against libnetfilter-queue-dev.
$(STAMP): requirements.txt requirements-dev.txt | system-deps
	test -x $(PY) || $(call q,$(value PYTHON)) -m venv $(call q,$(value VENV))
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	rm -f $(call q,$(value VENV))/.installed-* && touch $(call q,$@)

## help: this list of targets, one line each
help:
	@sed -n 's/^## \([^:]*\): \(.*\)/\1\t\2/p' $(MAKEFILE_LIST) | \
	  awk -F'\t' '{ printf "  %-24s %s\n", $$1, $$2 }'

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

## system-deps: Debian packages for calls in network namespaces (iproute2, iptables),
## libnetfilter-queue-dev, which the link emulator's NetfilterQueue (requirements.txt) builds against,
## and libopus0, which the receiver's Opus decoder (opuslib-next, requirements.txt) loads
system-deps:
	$(call apt_install,iproute2 iptables libnetfilter-queue-dev libopus0)

## turn-deps: Debian's coturn (turnserver) for `make turn` and the TURN tests
turn-deps:
	$(call apt_install,coturn)

## browser-deps: Debian's Chromium for the browser tests (Playwright drives it; never `playwright install`)
browser-deps:
	$(call apt_install,chromium)

## nginx-deps: Debian's nginx, for the test of deploy/nginx (a real reverse proxy in front of the relay)
nginx-deps:
	$(call apt_install,nginx)

## caddy-deps: Debian's Caddy, for the test of deploy/Caddyfile; never left running as a service
# The package enables and starts caddy.service (a server on :80): a temporary
# policy-rc.d (exit 101) stops invoke-rc.d from starting it where none is
# present, and under systemd the unit is disabled and stopped after the install.
caddy-deps:
	@if ! dpkg -s caddy >/dev/null 2>&1; then \
	  if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages: caddy (run as root, or apt-get install it)"; exit 1; fi; \
	  own=""; [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own=1; }; \
	  [ -f $(APT_STAMP) ] || { apt-get update -qq && mkdir -p $$(dirname $(APT_STAMP)) && touch $(APT_STAMP); }; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq caddy >/dev/null; status=$$?; \
	  [ -z "$$own" ] || rm -f /usr/sbin/policy-rc.d; \
	  [ ! -d /run/systemd/system ] || systemctl disable --now caddy.service >/dev/null 2>&1 || true; \
	  exit $$status; \
	fi

## redis-deps: Debian's redis-server, for a cluster of relays (make cluster) and its tests
redis-deps:
	$(call apt_install,redis-server)

## haproxy-deps: Debian's HAProxy, the load balancer of make cluster and its test
haproxy-deps:
	$(call apt_install,haproxy)

## systemd-deps: systemd-analyze, for the test of deploy/*.service (Debian's systemd, if it is missing)
systemd-deps:
	@command -v systemd-analyze >/dev/null || $(MAKE) --no-print-directory apt-systemd

apt-systemd:
	$(call apt_install,systemd)

## run-relay: the signaling relay on ws://127.0.0.1:5001/ws
run-relay: setup
	$(PY) relay.py --config $(CONFIG_) $(ARGS_)

## test: the whole test suite (what CI runs)
test: setup system-deps turn-deps browser-deps nginx-deps caddy-deps systemd-deps redis-deps haproxy-deps
	$(PY) -m pytest $(ARGS_)

## lint: ruff format check, ruff check, mypy --strict
lint: setup
	$(call q,$(value VENV)/bin/ruff) format --check .
	$(call q,$(value VENV)/bin/ruff) check .
	$(call q,$(value VENV)/bin/mypy)

## demo: relay + two clients, prints what the call achieved, stops everything
demo: setup system-deps
	$(PY) -m bench.demo --config $(CONFIG_) $(ARGS_)

## demo-turn: the demo through a local coturn, TURN only, in a private namespace (as root)
demo-turn: setup system-deps turn-deps
	$(PY) -m bench.demo --turn --config $(CONFIG_) $(ARGS_)

## cluster: redis-server, two relays sharing it and HAProxy in front, on 127.0.0.1:8080 (Ctrl-C stops all)
cluster: setup redis-deps haproxy-deps
	$(PY) -m bench.cluster $(ARGS_)

## patient, practitioner: one seat of a consultation, e.g. `make patient SESSION=test123`
patient practitioner: setup
	$(PY) -m peers.$@ --config $(CONFIG_) $(if $(value SESSION),--session=$(call q,$(value SESSION))) $(ARGS_)

## bench: every benchmark
bench: bench-relay bench-storm bench-call bench-browser bench-turn bench-recovery bench-network bench-rate netem-probe

## turn: a local coturn from the turn: section of CONFIG (Ctrl-C stops it)
turn: setup turn-deps
	$(PY) -m peers.turnserver --config $(CONFIG_) $(ARGS_)

## bench-turn: first frame and latency, direct vs TURN over UDP and TCP, coturn's CPU (as root)
bench-turn: setup system-deps turn-deps
	$(PY) -m bench.turn $(ARGS_)

## netem-probe: the link emulator (tests/netem.py) measured by its probe, per setting, beside the bare link (as root)
netem-probe: setup system-deps
	$(PY) -m bench.netem $(ARGS_)

## bench-network: issue 13's table: every bad link x aiortc/Chromium pairings, at the practitioner (as root; ARGS="--seconds 10 --runs 1 --links 75 --pairings aiortc")
bench-network: setup system-deps browser-deps
	$(PY) -m bench.network $(ARGS_)

## bench-rate: 300 kbit/s then a clean link, the estimate patched vs aiortc's; ARGS=--chromium: Chromium sending to each estimate; ARGS="--start clean": the first frame to 640x480 with and without the start probe; ARGS=--stalls: 300 kbit/s with the loop stalled 250 ms every 2.5 s, the sender as it was and with its skip and pacer (as root)
bench-rate: setup system-deps
	$(PY) -m bench.rate $(ARGS_)

## bench-call: calls through the relay and the peers' command lines vs two bare aiortc peers (as root)
bench-call: setup system-deps
	$(PY) -m bench.call $(ARGS_)

## bench-recovery: time to the first frame again after a network change and a 3 s outage, every pairing (as root)
bench-recovery: setup system-deps browser-deps
	$(PY) -m bench.recovery $(ARGS_)

## bench-browser: the browser client vs itself and the aiortc peers (as root)
bench-browser: setup system-deps browser-deps
	$(PY) -m bench.browser $(ARGS_)

## bench-relay: relay vs a bare websockets forwarder (see docs/benchmarks.md); valgrind counts instructions
bench-relay: setup bench-deps
	$(call apt_install,valgrind)
	$(PY) -m bench.relay $(ARGS_)

## bench-cluster: one relay in memory, one on Redis, two on Redis with the pairs split (docs/benchmarks.md)
bench-cluster: setup redis-deps
	$(PY) -m bench.relay_cluster $(ARGS_)

## bench-storm: 10,000 clients resume their seats at once after a relay restart (docs/benchmarks.md)
bench-storm: setup
	$(PY) -m bench.relay_storm $(ARGS_)

## bench-deps: the Node `ws` load generator (npm ci from the committed lock file)
bench-deps: bench/loadgen/node_modules/.installed
bench/loadgen/node_modules/.installed: bench/loadgen/package-lock.json
	command -v npm >/dev/null || $(MAKE) --no-print-directory apt-nodejs
	cd bench/loadgen && npm ci --no-audit --no-fund
	touch $@

apt-nodejs:
	$(call apt_install,nodejs npm)

## screenshots: docs/screenshot-*.png of the browser client, phone and desktop sizes
screenshots: setup system-deps browser-deps
	$(PY) -m tests.screenshots

## clean: remove the virtualenv, caches and test artifacts
clean:
	rm -rf $(call q,$(value VENV)) .mypy_cache .ruff_cache .pytest_cache .hypothesis artifacts
