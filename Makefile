# Everything from a fresh Debian machine: `make demo` runs a prompt through a real
# daemon, `make test` runs the whole test suite, `make install` installs the service.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := $(CURDIR)/.venv
PY := $(VENV)/bin/python
LLAMA_VERSION := 0.3.36
# Our own cache of the RPC build, never pip's: pip's wheel cache can hand back a
# build made without -DGGML_RPC=ON.
CACHE_HOME ?= $(if $(XDG_CACHE_HOME),$(XDG_CACHE_HOME),$(HOME)/.cache)
# llama.cpp builds for this CPU (-march=native), AMX left out on x86-64: its matrix
# kernels crash the engine (SIGSEGV at ldtilecfg) on Xeons under a hypervisor.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS := -DGGML_RPC=ON $(if $(filter x86_64,$(shell uname -m)),"-DCMAKE_C_FLAGS=$(NO_AMX)" "-DCMAKE_CXX_FLAGS=$(NO_AMX)")
# A build made for another CPU or with other flags is not reused: the key is theirs.
BUILD_KEY := $(shell { echo '$(LLAMA_CMAKE_ARGS)'; grep -m1 -E '^(flags|Features)' /proc/cpuinfo; } | sha256sum | cut -c1-12)
WHEELS := $(CACHE_HOME)/hsmdif/wheels/llama-cpp-python-$(LLAMA_VERSION)-rpc-$(BUILD_KEY)
APT_PACKAGES := python3-venv python3-dev build-essential cmake pkg-config libsystemd-dev libssl-dev iproute2 systemd nftables

.PHONY: help deps venv demo test check lint types unit proto bench bench-quick bench-smoke clean

help:
	@echo "make demo     set up, start a daemon, answer one prompt with the bundled model"
	@echo "make test     set up and run lint, types and the whole test suite"
	@echo "make install  install hsmdifd as a systemd service (root)"
	@echo "make proto    regenerate hsmdif/proto from proto/hsmdif.proto"

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "Installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else \
	  echo "Missing Debian packages: $$missing" >&2; \
	  echo "Install them with: sudo apt-get install $$missing  (or run make as root)" >&2; \
	  exit 1; \
	fi

# The stamp names the llama.cpp build: another CPU or other flags make the venv again.
READY := $(VENV)/.ready-$(BUILD_KEY)

venv: $(READY)

$(READY): pyproject.toml setup.py hsmdifd/engine/relay/_native.c | deps
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "Building llama-cpp-python $(LLAMA_VERSION) with the RPC backend (about 9 minutes on 2 cores)"; \
	  rm -rf $(WHEELS) && mkdir -p $(WHEELS); \
	  CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' $(PY) -m pip wheel -q --no-cache-dir --no-deps \
	    --no-binary llama-cpp-python -w $(WHEELS) llama-cpp-python==$(LLAMA_VERSION); \
	fi
	$(PY) -m pip install -q --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PY) -m pip install -q -e '.[dev]'
	@$(PY) -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_rpc() else 3)' || { \
	  [ $$? != 3 ] || { rm -rf $(WHEELS); \
	    echo "llama-cpp-python was built without RPC: removed $(WHEELS); run make again to rebuild" >&2; }; \
	  exit 1; }
	@rm -f $(VENV)/.ready $(VENV)/.ready-*
	@touch $@

# The main job: a real daemon in the background on a temporary socket, the bundled
# model loaded, one prompt streamed to the terminal, the daemon stopped. The bundled
# Gemma 3 270M is a base model: it continues text, so the prompt is a text to continue.
DEMO_PROMPT ?= The lighthouse keeper climbed the stairs one last time. At the top, she
DEMO_STATE ?= $(CACHE_HOME)/hsmdif/demo-state
demo: venv
	@tmp=$$(mktemp -d /tmp/hsmdif-demo.XXXXXX); ctl="$(VENV)/bin/hsmdifctl --socket $$tmp/control.sock"; \
	$(VENV)/bin/hsmdifd --socket $$tmp/control.sock --state-dir "$(DEMO_STATE)" --no-mdns \
	  --http off 2>$$tmp/hsmdifd.log & pid=$$!; \
	trap 'kill -TERM $$pid 2>/dev/null; wait $$pid; rm -rf $$tmp' EXIT; \
	for i in $$(seq 300); do $$ctl status >/dev/null 2>&1 && break; \
	  kill -0 $$pid 2>/dev/null || { cat $$tmp/hsmdifd.log; exit 1; }; sleep 0.1; done; \
	echo "== hsmdifd is running (pid $$pid, socket $$tmp/control.sock)"; \
	$$ctl load; \
	echo "== hsmdifctl prompt \"$(DEMO_PROMPT)\""; \
	$$ctl prompt "$(DEMO_PROMPT)" --max-tokens 64; \
	echo "== stopping hsmdifd"

check: lint types unit

lint: venv
	$(VENV)/bin/ruff check hsmdif hsmdifd hsmdifctl tests bench
	$(VENV)/bin/ruff format --check hsmdif hsmdifd hsmdifctl tests bench

types: venv
	$(VENV)/bin/mypy

unit: venv
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

test: check

proto: venv
	PATH=$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -Ihsmdif/proto=proto \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. hsmdif/proto/hsmdif.proto

# The performance table: bench/results.json, bench/RESULTS.md, bench/results.png (root:
# the cluster benchmarks use network namespaces). bench-quick takes under 10 minutes.
bench: venv
	$(PY) -m bench.run

bench-quick: venv
	$(PY) -m bench.run --quick

# Checks that the benchmark runs to the end, not its figures (CI's machine is shared).
bench-smoke: venv
	$(PY) -m bench.standalone --quick --results /tmp/hsmdif-bench-smoke.json

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# ---- install (service) ----
# `sudo make install` installs hsmdifd as a systemd service: the system user and group
# hsmdif, a venv in $(INSTALL_VENV) with the RPC build of llama-cpp-python and this
# project, hsmdifd and hsmdifctl linked into $(PREFIX)/bin, the unit, and the config
# (an existing one is kept). Build the dev venv first as yourself (`make venv`): the
# wheel is taken from your cache. DESTDIR=DIR only stages the files under DIR.
# `sudo make uninstall` removes all that but keeps the config, the state directory and
# the user; `sudo make uninstall PURGE=1` removes those too.

PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR ?= /etc/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
INSTALL_VENV ?= /opt/hsmdif
# The distribution's Python, not a per-user one (pyenv, conda) the service cannot read.
INSTALL_PYTHON ?= /usr/bin/python3
STATE_DIR := /var/lib/hsmdifd
PURGE ?= 0
IPIP := $(DESTDIR)$(INSTALL_VENV)/bin/python -m pip -q --disable-pip-version-check
# Under sudo, $(WHEELS) points into root's cache; the wheel is in the invoking user's.
SUDO_WHEELS = $(if $(SUDO_USER),$(shell getent passwd '$(SUDO_USER)' | cut -d: -f6)/.cache/hsmdif/wheels/$(notdir $(WHEELS)))
INSTALL_WHEEL = $(firstword $(wildcard $(addsuffix /llama_cpp_python-$(LLAMA_VERSION)-*.whl,$(WHEELS) $(SUDO_WHEELS))))

define need_root
@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" != 0 ]; then \
  echo "make $@ changes the system and needs root: run  sudo make $@" >&2; exit 1; fi
endef

.PHONY: install uninstall

install: venv
	$(need_root)
	@if [ -z "$(INSTALL_WHEEL)" ]; then \
	  echo "No RPC build of llama-cpp-python $(LLAMA_VERSION) in $(WHEELS) $(SUDO_WHEELS)" >&2; \
	  echo "Run  make venv  as yourself first, or pass WHEELS=DIR" >&2; exit 1; fi
	@if [ -z "$(DESTDIR)" ]; then \
	  if command -v systemd-sysusers >/dev/null; then \
	    systemd-sysusers $(CURDIR)/systemd/hsmdif.sysusers.conf; \
	  elif ! getent passwd hsmdif >/dev/null; then \
	    useradd --system --user-group --home-dir $(STATE_DIR) --no-create-home \
	      --shell /usr/sbin/nologin --comment "HSM-DIF daemon" hsmdif; \
	  fi; \
	fi
	$(INSTALL_PYTHON) -m venv $(DESTDIR)$(INSTALL_VENV)
	$(IPIP) install --root-user-action=ignore --force-reinstall --no-deps $(INSTALL_WHEEL)
	@# From a copy, so that no root-owned build/ or *.egg-info is left in the work tree.
	src=$$(mktemp -d) && trap 'rm -rf "$$src"' EXIT && \
	tar -C $(CURDIR) --exclude=./.venv --exclude=./.git --exclude=./build --exclude='*.egg-info' \
	  --exclude=__pycache__ --exclude='*.so' --exclude=.mypy_cache --exclude=.ruff_cache --exclude=.pytest_cache \
	  -cf - . | tar -C "$$src" -xf - && \
	$(IPIP) install --root-user-action=ignore "$$src"
	@$(DESTDIR)$(INSTALL_VENV)/bin/python -c 'import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_rpc() else 3)' || { \
	  [ $$? != 3 ] || echo "$(INSTALL_WHEEL) was built without RPC: remove it and run make venv again" >&2; \
	  exit 1; }
	@if [ -n "$(DESTDIR)" ]; then \
	  { grep -rlI -e '$(DESTDIR)$(INSTALL_VENV)' $(DESTDIR)$(INSTALL_VENV)/bin \
	      $(DESTDIR)$(INSTALL_VENV)/pyvenv.cfg || true; } | \
	    xargs -r sed -i 's|$(DESTDIR)$(INSTALL_VENV)|$(INSTALL_VENV)|g'; \
	fi
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR)/hsmdif
	ln -sfn $(INSTALL_VENV)/bin/hsmdifd $(DESTDIR)$(PREFIX)/bin/hsmdifd
	ln -sfn $(INSTALL_VENV)/bin/hsmdifctl $(DESTDIR)$(PREFIX)/bin/hsmdifctl
	sed -e 's|/usr/local/bin/|$(PREFIX)/bin/|g' -e 's|/etc/hsmdif/|$(SYSCONFDIR)/hsmdif/|g' \
	  systemd/hsmdifd.service > $(DESTDIR)$(UNITDIR)/hsmdifd.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/hsmdifd.service
	install -D -m 0644 systemd/hsmdif.sysusers.conf $(DESTDIR)$(SYSUSERSDIR)/hsmdif.conf
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/hsmdif/hsmdifd.toml ]; then \
	  echo "Keeping $(SYSCONFDIR)/hsmdif/hsmdifd.toml (the new default is etc/hsmdifd.toml)"; \
	else \
	  echo "install -m 0644 etc/hsmdifd.toml $(DESTDIR)$(SYSCONFDIR)/hsmdif/hsmdifd.toml"; \
	  install -m 0644 etc/hsmdifd.toml $(DESTDIR)$(SYSCONFDIR)/hsmdif/hsmdifd.toml; \
	fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  echo "systemctl daemon-reload"; systemctl daemon-reload; \
	  if systemctl is-active --quiet hsmdifd.service; then \
	    echo "hsmdifd is running the previous version: sudo systemctl restart hsmdifd"; fi; \
	fi
	@echo
	@if [ -n "$(DESTDIR)" ]; then echo "Staged under $(DESTDIR)."; exit 0; fi; \
	echo "hsmdifd is installed. Next:"; \
	echo "  sudo systemctl enable --now hsmdifd    start it now and at every boot"; \
	echo '  sudo usermod -aG hsmdif $$USER         use hsmdifctl without sudo (log in again after)'; \
	echo "  hsmdifctl status"; \
	echo "Configuration: $(SYSCONFDIR)/hsmdif/hsmdifd.toml (then: sudo systemctl reload hsmdifd)"; \
	echo "Logs: journalctl -u hsmdifd"

uninstall:
	$(need_root)
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ] && [ -e $(UNITDIR)/hsmdifd.service ]; then \
	  echo "systemctl disable --now hsmdifd.service"; systemctl disable --now hsmdifd.service; fi
	rm -f $(DESTDIR)$(UNITDIR)/hsmdifd.service $(DESTDIR)$(SYSUSERSDIR)/hsmdif.conf
	@rmdir $(DESTDIR)$(SYSUSERSDIR) 2>/dev/null || true
	@for f in $(DESTDIR)$(PREFIX)/bin/hsmdifd $(DESTDIR)$(PREFIX)/bin/hsmdifctl; do \
	  if [ -L "$$f" ]; then echo "rm -f $$f"; rm -f "$$f"; fi; done
	@# Only a directory that is a venv, whatever INSTALL_VENV says.
	@if [ -f $(DESTDIR)$(INSTALL_VENV)/pyvenv.cfg ]; then \
	  echo "rm -rf $(DESTDIR)$(INSTALL_VENV)"; rm -rf $(DESTDIR)$(INSTALL_VENV); fi
	@if [ "$(PURGE)" = 1 ]; then \
	  echo "rm -rf $(DESTDIR)$(SYSCONFDIR)/hsmdif $(DESTDIR)$(STATE_DIR) $(DESTDIR)$(UNITDIR)/hsmdifd.service.d"; \
	  rm -rf $(DESTDIR)$(SYSCONFDIR)/hsmdif $(DESTDIR)$(STATE_DIR) $(DESTDIR)$(UNITDIR)/hsmdifd.service.d; \
	  if [ -z "$(DESTDIR)" ]; then \
	    if getent passwd hsmdif >/dev/null; then echo "userdel hsmdif"; userdel hsmdif; fi; \
	    if getent group hsmdif >/dev/null; then echo "groupdel hsmdif"; groupdel hsmdif; fi; \
	  fi; \
	else \
	  echo "Kept $(SYSCONFDIR)/hsmdif, $(STATE_DIR) and the user hsmdif: make uninstall PURGE=1 removes them"; \
	fi
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then \
	  echo "systemctl daemon-reload"; systemctl daemon-reload; fi
