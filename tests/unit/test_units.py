"""The systemd units and the boot lockdown ruleset.

`systemd-analyze verify` checks that every Exec*= binary exists. The units name
their installed paths (/usr/bin/ksbpfd, /usr/bin/ksctl, /usr/share/ksbpf/lockdown.nft), which
a development checkout does not have: the units are verified as shipped (the only findings
allowed are a missing /usr/bin/ksbpfd or /usr/bin/ksctl, and only when indeed missing), and
again with those paths pointed at this checkout, where nothing at all may be reported. The
units as the Debian package installs them are verified in tests/integration/test_package.py.

The shell steps of the units (the lockdown's generated-or-static choice, the bpffs mount in
the initial mount namespace) are run for real here, in a network namespace and a mount
namespace of the test's own.
"""

from __future__ import annotations

import configparser
import importlib.resources
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "units"
DAEMON, LOCKDOWN = UNITS / "ksbpf.service", UNITS / "ksbpf-lockdown.service"
LOCKDOWN_NFT = REPO / "nft" / "lockdown.nft"
INSTALLED_KSBPFD = "/usr/bin/ksbpfd"
INSTALLED_KSCTL = "/usr/bin/ksctl"
INSTALLED_LOCKDOWN = "/usr/share/ksbpf/lockdown.nft"
GENERATED_LOCKDOWN = "/var/lib/ksbpf/lockdown.nft"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


def unit(path: Path) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def verify(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, paths)], capture_output=True, text=True, timeout=60)


def local_exe(name: str) -> str:
    exe = str(Path(sys.executable).with_name(name))
    if not os.access(exe, os.X_OK):
        exe = shutil.which(name) or exe
    if not os.access(exe, os.X_OK):
        pytest.skip(f"no {name} entry point installed (pip install -e .)")
    return exe


def local_units(tmp_path: Path) -> tuple[Path, Path]:
    """The units with their installed paths pointed at this checkout."""
    daemon = DAEMON.read_text().replace(INSTALLED_KSBPFD, local_exe("ksbpfd")).replace(INSTALLED_KSCTL, local_exe("ksctl"))
    (tmp_path / DAEMON.name).write_text(daemon)
    (tmp_path / LOCKDOWN.name).write_text(LOCKDOWN.read_text().replace(INSTALLED_LOCKDOWN, str(LOCKDOWN_NFT)))
    return tmp_path / DAEMON.name, tmp_path / LOCKDOWN.name


@needs_analyze
def test_units_verify_with_this_checkouts_paths(tmp_path: Path) -> None:
    r = verify(*local_units(tmp_path))
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


@needs_analyze
def test_units_verify_as_shipped() -> None:
    r = verify(DAEMON, LOCKDOWN)
    findings = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    missing = [exe for exe in (INSTALLED_KSBPFD, INSTALLED_KSCTL) if not os.access(exe, os.X_OK)]
    assert findings == [f"ksbpf.service: Command {exe} is not executable: No such file or directory" for exe in missing]
    assert (r.returncode == 0) == (not missing)


def test_daemon_unit_contract() -> None:
    s = unit(DAEMON)["Service"]
    assert s["Type"] == "notify" and s["NotifyAccess"] == "main"
    assert s["ExecStart"].split()[0] == INSTALLED_KSBPFD and "--config /etc/ksbpf/policy.toml" in s["ExecStart"]
    # A minimal Debian has no /bin/kill (procps): reload through ksctl, which waits for the answer.
    # '+': outside the sandbox, so that ksctl can mark the existing sockets of newly exempt
    # cgroups (ksbpf.sockmark); the same at start, once READY.
    assert s["ExecReload"] == f"+{INSTALLED_KSCTL} reload"
    assert "kill" not in s["ExecReload"]
    assert s["ExecStartPost"] == f"-+{INSTALLED_KSCTL} mark-sockets"
    assert s["Restart"] == "always" and int(s["WatchdogSec"]) > 0
    # ksbpfd's exit codes for a refused policy and a missing Python dependency: no restart loop.
    assert {"2", "5"} <= set(s["RestartPreventExitStatus"].split())
    # bpffs in the initial mount namespace, tolerated if impossible ('-'). '+' lifts the sandbox
    # but, in systemd 252, still runs in the unit's own mount namespace: hence nsenter into PID 1's.
    prefix, _, cmd = s["ExecStartPre"].partition("/")
    assert set(prefix) == {"+", "-"}
    argv = shlex.split("/" + cmd)
    assert argv[:4] == ["/usr/bin/nsenter", "--target=1", "--mount", "--"], argv
    assert "mount -t bpf" in shell_of(s["ExecStartPre"]) and "/sys/fs/bpf" in shell_of(s["ExecStartPre"])
    caps = set(s["CapabilityBoundingSet"].split())
    assert caps <= {"CAP_NET_ADMIN", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN", "CAP_SYS_RESOURCE"}
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes"
    assert set(s["ReadWritePaths"].split()) == {"/var/lib/ksbpf", "/run/ksbpf", "-/sys/fs/bpf"}  # "-": optional, see the unit
    assert s["StateDirectory"] == "ksbpf" and s["RuntimeDirectory"] == "ksbpf"
    assert "AF_PACKET" not in s["RestrictAddressFamilies"]
    u = unit(DAEMON)["Unit"]
    assert "ksbpf-lockdown.service" in u["Wants"] and "ksbpf-lockdown.service" in u["After"]


def test_lockdown_unit_contract() -> None:
    cp = unit(LOCKDOWN)
    u, s = cp["Unit"], cp["Service"]
    assert u["DefaultDependencies"] == "no"
    assert "network-pre.target" in u["Before"].split() and "network-pre.target" in u["Wants"].split()
    assert s["Type"] == "oneshot" and s["RemainAfterExit"] == "yes"
    # Only binaries of a minimal Debian: sh and nft. The generated ruleset first, the static one
    # as the fallback (test_lockdown_loads_generated_or_falls_back runs this for real).
    assert s["ExecStart"].startswith("/bin/sh -c ")
    assert GENERATED_LOCKDOWN in s["ExecStart"] and f"/usr/sbin/nft -f {INSTALLED_LOCKDOWN}" in s["ExecStart"]
    assert s["ExecStart"].index(GENERATED_LOCKDOWN) < s["ExecStart"].index(INSTALLED_LOCKDOWN)
    # /var may be a mount of its own, and DefaultDependencies=no orders after nothing by itself.
    assert "/var/lib/ksbpf" in u["RequiresMountsFor"].split()
    assert "ExecStop" not in s, "stopping the lockdown must not open the machine"
    assert s["CapabilityBoundingSet"] == "CAP_NET_ADMIN"
    assert cp["Install"]["WantedBy"] == "sysinit.target"


def test_lockdown_ruleset_blocks_all_but_loopback_and_ships_as_package_data() -> None:
    text = LOCKDOWN_NFT.read_text()
    assert (importlib.resources.files("ksbpf.nft") / "lockdown.nft").read_text() == text
    rules = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    chains = re.findall(r"type filter hook (\w+) priority [^;]+; policy (\w+);", text)
    assert sorted(chains) == [("forward", "drop"), ("input", "drop"), ("output", "drop")]
    accepts = [r for r in rules if r.endswith("accept")]
    assert accepts == ['iif "lo" accept', 'oif "lo" accept']
    # The table ksbpfd deletes once it enforces (ksbpf.daemon.LOCKDOWN_TABLE).
    from ksbpf.daemon import LOCKDOWN_TABLE

    assert f"table inet {LOCKDOWN_TABLE} {{" in text


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None, reason="nft -c needs root")
def test_lockdown_ruleset_parses() -> None:
    r = subprocess.run(["nft", "-c", "-f", str(LOCKDOWN_NFT)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


@needs_analyze
def test_security_exposure_is_reported(tmp_path: Path) -> None:
    """`systemd-analyze security` scores the sandbox (0 best, 10 worst). A root daemon with
    CAP_SYS_ADMIN for BCC cannot be perfect; the score must not get worse unnoticed."""
    scores = {}
    for path in local_units(tmp_path):
        name = path.name
        r = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
                           capture_output=True, text=True, timeout=60)
        m = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout + r.stderr)
        if m is None:
            pytest.skip(f"this systemd-analyze cannot score offline: {(r.stderr or r.stdout).strip()[-200:]}")
        scores[name] = float(m.group(1))
    print(f"systemd-analyze security: {scores}")
    assert scores[DAEMON.name] <= 5.0 and scores[LOCKDOWN.name] <= 4.0, scores


# ------------------------------------------------------------------ the units' shell steps, run for real

needs_root_nft = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None or shutil.which("ip") is None,
                                    reason="needs root, nft and ip (a network namespace of the test's own)")


def shell_of(command_line: str) -> str:
    """The script of an `/bin/sh -c '...'` command line (prefixes like '-+' stripped, and a
    `nsenter ... --` in front of the shell)."""
    argv = shlex.split(command_line.lstrip("-+@:!"))
    if argv[0] == "/usr/bin/nsenter":
        argv = argv[argv.index("--") + 1:]
    assert argv[:2] == ["/bin/sh", "-c"] and len(argv) == 3, argv
    return argv[2]


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"ksbpf-units-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def _lockdown_run(netns: str, generated: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    script = shell_of(unit(LOCKDOWN)["Service"]["ExecStart"])
    script = script.replace(GENERATED_LOCKDOWN, str(generated)).replace(INSTALLED_LOCKDOWN, str(LOCKDOWN_NFT))
    r = subprocess.run(["ip", "netns", "exec", netns, "/bin/sh", "-c", script], capture_output=True, text=True, timeout=30)
    listing = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "table", "inet", "ksbpf_lockdown"],
                             capture_output=True, text=True, timeout=30)
    return r, listing.stdout


@needs_root_nft
def test_lockdown_loads_generated_or_falls_back(netns: str, tmp_path: Path) -> None:
    generated = tmp_path / "lockdown.nft"
    # A generated ruleset: the static one plus an admin exemption the static one lacks.
    generated.write_text(LOCKDOWN_NFT.read_text().replace('iif "lo" accept', 'iif "lo" accept\n\t\ttcp dport 22 accept'))

    r, listing = _lockdown_run(netns, generated)
    assert r.returncode == 0, r.stderr
    assert "tcp dport 22 accept" in listing and "policy drop" in listing

    generated.write_text("table inet ksbpf_lockdown {\n\tchain input {\n\t\tthis is not nft\n\t}\n}\n")
    r, listing = _lockdown_run(netns, generated)
    assert r.returncode == 0, r.stderr
    assert "did not load; loading the static lockdown" in r.stderr
    assert "policy drop" in listing and "tcp dport 22" not in listing  # the static ruleset, whole

    generated.unlink()
    r, listing = _lockdown_run(netns, generated)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    assert "policy drop" in listing and "tcp dport 22" not in listing


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_bpffs_step_mounts_once_where_it_runs() -> None:
    """The shell of the daemon's ExecStartPre (without its nsenter into PID 1's namespace: that
    would be this machine's), run in a private mount namespace of the test's own: it mounts
    bpffs at /sys/fs/bpf when that is no bpffs, and a second run mounts nothing more."""
    step = shell_of(unit(DAEMON)["Service"]["ExecStartPre"])
    probe = ("umount /sys/fs/bpf 2>/dev/null; umount /sys/fs/bpf 2>/dev/null; "
             f"{step}; findmnt -rn -o FSTYPE --mountpoint /sys/fs/bpf; echo --; "
             f"{step}; findmnt -rn -o FSTYPE --mountpoint /sys/fs/bpf")
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", probe],
                       capture_output=True, text=True, timeout=30)
    first, _, second = r.stdout.partition("--\n")
    assert first.split() == ["bpf"], (r.stdout, r.stderr)
    assert second.split() == ["bpf"], (r.stdout, r.stderr)  # one mount, not two stacked
