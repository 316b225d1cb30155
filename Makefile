# The two commands a user runs on a fresh Debian 12 machine, as root: `make demo`, `make test`.
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.ksbpf-setup
APT_PKGS  := nftables python3-nftables python3-bpfcc libbpfcc bpftool linux-headers-amd64 \
             wireguard-go wireguard-tools python3-pyroute2 python3-systemd \
             python3-prometheus-client python3-venv iproute2 iperf3 systemd
HEADERS   := /var/lib/ksbpf/kernel-headers

.PHONY: setup demo test lint unit kernel bench clean headers

setup: $(STAMP)

$(STAMP): pyproject.toml
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

lint: setup
	$(VENV)/bin/ruff check ksbpf tests $(wildcard bench)
	$(VENV)/bin/mypy ksbpf

unit: setup
	$(VENV)/bin/pytest -q tests/unit

kernel: setup
	$(VENV)/bin/pytest -q tests/kernel

test: setup lint
	$(VENV)/bin/pytest -q tests

# The benchmark also needs a C compiler (its UDP sender), perf (where the time goes) and
# matplotlib (the plots); without perf or matplotlib it says so and leaves those parts out.
BENCH_PKGS := gcc libc6-dev linux-perf python3-matplotlib

bench: setup
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(BENCH_PKGS)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info
