# The two commands a user runs on a fresh Debian 12 machine, as root: `make demo`, `make test`.
#
# The developer's loop, fastest first. `make test` (and so .ci/run) runs all three: check, and
# when it passes, integration and kernel together:
#   make check        ruff, mypy (ksbpf strict; tests and bench type-checked) and tests/unit:
#                     pure and fast (under 20 s). No root, no apt: only the venv `make setup` made.
#                     `make lint` and `make unit` are its two halves.
#   make integration  tests/integration: the macOS/Windows adapters against stand-in programs,
#                     the Debian package (dpkg-buildpackage, lintian; apt's resolver as root),
#                     threads on a real clock, the exhaustive renderer-vs-verdict comparisons.
#   make kernel       tests/kernel: as root, in network namespaces and cgroups the tests make.
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.ksbpf-setup
# What `make deb` needs (the boot test also needs mmdebstrap and systemd-container, below).
DEB_PKGS  := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools \
             lintian fakeroot
# prometheus: its promtool checks and unit-tests monitoring/ (tests/unit/test_monitoring.py).
APT_PKGS  := nftables python3-nftables python3-bpfcc libbpfcc libbpf1 bpftool linux-headers-amd64 \
             wireguard-go wireguard-tools python3-pyroute2 python3-systemd \
             python3-prometheus-client python3-venv iproute2 iperf3 systemd \
             $(DEB_PKGS) mmdebstrap systemd-container prometheus
HEADERS   := /var/lib/ksbpf/kernel-headers
VERSION   := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
# `make deb DEB_VERSION=0.1.0+t1` builds the same tree as another package version (an upgrade
# to test); the tree's debian/changelog is left as it is.
DEB_VERSION ?= $(VERSION)
DEB       := dist/ksbpf_$(DEB_VERSION)_all.deb

.PHONY: setup demo test check lint unit integration kernel bench clean headers deb

setup: $(STAMP)

# What check, lint and unit need instead of `setup` (which installs packages as root).
$(PY):
	@echo "no $(VENV): run make setup as root first"; exit 1

# The Makefile too: a package added to APT_PKGS is installed on the next run.
$(STAMP): pyproject.toml Makefile
	@test "$$(id -u)" = 0 || { echo "run as root: ksbpf installs packages and drives the kernel"; exit 1; }
	DEBIAN_FRONTEND=noninteractive apt-get update -q
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(APT_PKGS)
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# An editable install leaves bytecode to the first import, which PYTHONDONTWRITEBYTECODE
	# forbids: every ksctl would compile the package again.
	$(PY) -m compileall -q ksbpf
	$(VENV)/bin/ksctl doctor --prepare-headers $(HEADERS) || true
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ksctl lab demo

check: lint unit

# How strict mypy is, per module, is pyproject.toml's [tool.mypy].
lint: $(PY)
	$(VENV)/bin/ruff check ksbpf tests $(wildcard bench)
	$(VENV)/bin/mypy ksbpf tests $(wildcard bench)

# On every core when the venv has pytest-xdist (`make setup` installs it), else on one.
unit: $(PY)
	@if $(PY) -c 'import xdist' 2>/dev/null; then n="-n auto"; else n=""; \
	  echo "no pytest-xdist in $(VENV) (make setup installs it): the unit tests run on one core"; fi; \
	  echo "$(VENV)/bin/pytest -q $$n tests/unit"; $(VENV)/bin/pytest -q $$n tests/unit

integration: setup
	$(VENV)/bin/pytest -q tests/integration

kernel: setup
	$(VENV)/bin/pytest -q tests/kernel

# check first (a sub-make: it runs after setup made the venv); then the two slow stages in
# one pytest run, so one failure does not hide the others.
test: setup
	$(MAKE) --no-print-directory check
	$(VENV)/bin/pytest -q tests/integration tests/kernel

# The benchmark also needs a C compiler (its UDP sender), perf (where the time goes) and
# matplotlib (the plots); without perf or matplotlib it says so and leaves those parts out.
BENCH_PKGS := gcc libc6-dev linux-perf python3-matplotlib

bench: setup
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BENCH_PKGS)
	$(PY) -m bench.run

# The Debian package, built in a copy of the tree (tracked and untracked-but-not-ignored
# files, as they are now) so nothing is written here but $(DEB); dpkg-buildpackage -b -us -uc
# also works in the tree itself.
deb:
	@test -n "$(VERSION)" || { echo "no version in pyproject.toml"; exit 1; }
	@cv=$$(dpkg-parsechangelog -l debian/changelog -S Version 2>/dev/null); \
	  test "$$cv" = "$(VERSION)" || { echo "debian/changelog says $$cv, pyproject.toml $(VERSION): make them agree"; exit 1; }
	@missing=; for p in $(DEB_PKGS); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	  done; \
	  if [ -n "$$missing" ]; then \
	    test "$$(id -u)" = 0 || { echo "make deb needs:$$missing (apt-get install them as root)"; exit 1; }; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	  fi
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; src="$$tmp/ksbpf-$(VERSION)"; mkdir "$$src"; \
	  if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	    git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -C "$$src" -xf -; \
	  else \
	    tar --exclude=./.venv --exclude=./dist --exclude=./build --exclude=./.git --exclude='*.egg-info' \
	      --exclude=__pycache__ -cf - . | tar -C "$$src" -xf -; \
	  fi; \
	  if [ "$(DEB_VERSION)" != "$(VERSION)" ]; then \
	    sed -i '1s/^ksbpf ([^)]*)/ksbpf ($(DEB_VERSION))/' "$$src/debian/changelog"; \
	  fi; \
	  (cd "$$src" && dpkg-buildpackage -b -us -uc >"$$tmp/build.log" 2>&1) || { tail -n 60 "$$tmp/build.log"; exit 1; }; \
	  mkdir -p dist; rm -f dist/ksbpf_*_all.deb; cp "$$tmp/ksbpf_$(DEB_VERSION)_all.deb" $(DEB)
	@echo "built $(DEB)"

clean:
	rm -rf $(VENV) build *.egg-info dist
