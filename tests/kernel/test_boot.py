"""The Debian package under a real systemd: `make deb`, `apt-get install ./ksbpf_*.deb` into
a Debian 12 root, the units enabled with a policy whose tunnel is absent, and that root
booted with systemd as PID 1 (systemd-nspawn) in a network namespace wired to a counting
"ISP" namespace. In file order (one booted container shared by the module; the tests build
on each other, so they must not be reordered):

1. from the first packet of a unit ordered after network-pre.target, through ksbpfd's
   READY and after it, nothing arrives at the ISP outside the tunnel;
2. the daemon runs with its STATUS line; reload applies a changed policy and refuses a
   broken one; `ksctl exempt` and `ksctl status` work through it; metrics answer;
3. `ksctl status` agrees with the kernel: all three layers engaged; a stand-in tunnel
   carries the traffic while it is up; an upgrade restarts ksbpfd without a gap;
4. a reboot comes up enforcing (lockdown, then ksbpfd) and the admin exemption answers
   during the lockdown and after;
5. `apt-get purge ksbpf` leaves nothing in the kernel (BPF queried from the host) or on disk.

The root is cached in /var/cache/ksbpf-tests (first build: about a minute with the
network); later runs need no network. See debian_root.py.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.kernel.debian_root import (
    BOOT_ASSETS,
    BootCgroup,
    Container,
    OverlayRoot,
    Wire,
    archives_dir,
    base_root,
    ksbpf_programs,
    nspawn_run,
    package_deb,
    skip_reason,
)
from tests.kernel.debian_root import run as run_host

_reason = skip_reason()
pytestmark = [pytest.mark.kernel] + ([pytest.mark.skip(reason=_reason)] if _reason is not None else [])

TEST_UNITS = ("leak-probe.service", "exempt-probe.service", "fake-sshd.service")
EXEMPT_UNIT = "system.slice/exempt-probe.service"
RELEASE = "/run/ksbpf-boot-test-release"
HOLD_DROPIN = "/etc/systemd/system/ksbpf.service.d/boot-test-hold.conf"


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 60, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class Boot:
    wire: Wire
    ct: Container
    root: Path
    deb: Path
    install: str
    enabled_by_install: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    snapshot: dict[str, str] = field(default_factory=dict)  # the namespace before this boot

    def diag(self) -> str:
        """What to read when a check fails: the daemon's and the lockdown's journal."""
        try:
            return ("\n--- journalctl -u ksbpf -u ksbpf-lockdown (inside):\n" + self.ct.journal("ksbpf", "ksbpf-lockdown")
                    + "\n--- failed units: " + self.ct.failed_units())
        except Exception as e:  # the container may be gone
            return f"\n(no journal: {e})"

    def probe(self) -> dict[str, Any]:
        text = self.ct.run("cat", "/run/leak-probe.json").stdout
        return json.loads(text) if text else {}

    def mono(self, unit: str, prop: str = "ActiveEnterTimestampMonotonic") -> float:
        value = self.ct.show(unit, prop)
        return int(value) / 1e6 if value.isdigit() else 0.0

    def nft_tables(self) -> str:
        return self.ct.run("nft", "list", "tables").stdout

    def ksbpf_ruleset(self) -> str:
        """The daemon's table without counter values (-s): changes only when the rules do."""
        return self.ct.run("nft", "-s", "list", "table", "inet", "ksbpf").stdout

    def status_json(self) -> dict[str, Any]:
        r = self.ct.run("ksctl", "status", "--json")
        assert r.returncode == 0, f"ksctl status --json exited {r.returncode}: {r.stdout}{r.stderr}{self.diag()}"
        status: dict[str, Any] = json.loads(r.stdout)
        return status

    def assert_no_leak(self, when: str) -> None:
        leaks = self.wire.counters().get("leak", -1)
        assert leaks == 0, f"{when}: {leaks} packets reached the ISP outside the tunnel. {self.wire.leak_report()}{self.diag()}"


def _prepare_root(root: Path, deb: Path, cgroup: BootCgroup) -> tuple[str, list[str]]:
    """apt-get install ./ksbpf_*.deb into the root, offline: its Depends (only those) come
    from the cached .debs; then the admin's steps (policy, enable) and the test's units."""
    binds = (f"{archives_dir()}:/var/cache/apt/archives",)
    shutil.copy(deb, root / "root" / deb.name)
    target = f"/root/{deb.name}"
    # With the network only to fill the cache; nothing is downloaded once it holds everything.
    fetch = nspawn_run(root, cgroup, ["apt-get", "install", "-y", "-q", "--download-only", target], binds=binds,
                       network=True)
    if fetch.returncode != 0:
        # The cached root's package lists may name versions the mirror no longer has.
        nspawn_run(root, cgroup, ["apt-get", "update", "-q"], network=True)
        fetch = nspawn_run(root, cgroup, ["apt-get", "install", "-y", "-q", "--download-only", target], binds=binds,
                           network=True)
    assert fetch.returncode == 0, f"downloading ksbpf's dependencies failed:\n{fetch.stdout}{fetch.stderr}"
    install = nspawn_run(root, cgroup, ["apt-get", "install", "-y", "-q", target], binds=binds, network=False)
    assert install.returncode == 0, (
        f"apt-get install ./{deb.name} failed offline (its Depends did not resolve from the cache):\n"
        f"{install.stdout}{install.stderr}")
    # Installing enables nothing: no unit links yet (the admin's `systemctl enable` below).
    enabled = sorted(str(p.relative_to(root)) for p in (root / "etc/systemd/system").rglob("ksbpf*"))
    (root / "etc/ksbpf/policy.toml").write_text((BOOT_ASSETS / "policy.toml").read_text())
    (root / "etc/ksbpf/policy.toml").chmod(0o600)
    lib = root / "usr/local/lib/ksbpf-boot-test"
    lib.mkdir(parents=True, exist_ok=True)
    for script in ("leak_probe.py", "exempt_probe.py", "fake_sshd.py"):
        shutil.copy(BOOT_ASSETS / script, lib / script)
    for unit in TEST_UNITS:
        shutil.copy(BOOT_ASSETS / unit, root / "etc/systemd/system" / unit)
    dropins = root / Path(HOLD_DROPIN).parent.relative_to("/")
    dropins.mkdir(parents=True, exist_ok=True)
    shutil.copy(BOOT_ASSETS / "boot-test-order.conf", dropins / "boot-test-order.conf")
    enable = nspawn_run(root, cgroup, ["systemctl", "enable", "ksbpf-lockdown.service", "ksbpf.service", *TEST_UNITS],
                        network=False)
    assert enable.returncode == 0, f"systemctl enable failed:\n{enable.stdout}{enable.stderr}"
    return install.stdout + install.stderr, enabled


@pytest.fixture(scope="module")
def boot() -> Iterator[Boot]:
    tag = secrets.token_hex(3)
    cgroup = BootCgroup(f"ksbpf-boot-{tag}")
    overlay: OverlayRoot | None = None
    wire: Wire | None = None
    ct: Container | None = None
    try:
        started = time.monotonic()
        lower = base_root()
        deb = package_deb()
        overlay = OverlayRoot(lower)
        install, enabled = _prepare_root(overlay.path, deb, cgroup)
        prepared = time.monotonic()
        wire = Wire(tag)
        ct = Container(overlay.path, wire, cgroup, f"ksbpf-boot-{tag}", overlay.dir / "nspawn.log")
        b = Boot(wire, ct, overlay.path, deb, install, enabled, snapshot=wire.kernel_snapshot())
        b.timings["prepare_s"] = prepared - started
        ct.boot()
        state = ct.wait_running()
        b.timings["boot_s"] = time.monotonic() - prepared
        failed = f"; failed units: {ct.failed_units()}" if state != "running" else ""
        print(f"boot test: root ready in {b.timings['prepare_s']:.0f} s, booted ({state}{failed}) in {b.timings['boot_s']:.0f} s")
        yield b
    finally:
        # Each step on its own: one failing must not leave the others' namespaces, cgroups
        # or mounts behind.
        steps = [ct.stop, ct.kill] if ct is not None else []
        steps += [wire.cleanup] if wire is not None else []
        steps += [cgroup.cleanup] + ([overlay.cleanup] if overlay is not None else [])
        for step in steps:
            try:
                step()
            except Exception as e:
                print(f"boot test cleanup: {step.__qualname__} failed: {e}")


def test_package_installs_with_its_dependencies_and_no_kernel_image(boot: Boot) -> None:
    r = boot.ct.run("dpkg-query", "-W", "-f", "${Package} ${Status}\n")
    installed = {line.split()[0] for line in r.stdout.splitlines() if line.endswith("installed")}
    assert "ksbpf" in installed, f"ksbpf is not installed: {r.stdout}"
    assert not boot.enabled_by_install, f"installing ksbpf enabled units by itself: {boot.enabled_by_install}"
    images = sorted(p for p in installed if p.startswith("linux-image"))
    assert not images, f"installing ksbpf pulled in a kernel image: {images}\n{boot.install}"
    for module in ("bcc", "nftables", "pyroute2", "systemd.daemon", "prometheus_client"):
        r = boot.ct.run("python3", "-c", f"import {module}")
        assert r.returncode == 0, f"python3 -c 'import {module}' fails after installing ksbpf: {r.stderr}"


def test_no_packet_leaves_from_network_pre_through_ready(boot: Boot) -> None:
    ct = boot.ct
    assert ct.show("ksbpf-lockdown.service", "ActiveState") == "active", f"the lockdown unit is not active{boot.diag()}"
    assert ct.show("ksbpf.service", "ActiveState") == "active", f"ksbpf.service is not active{boot.diag()}"
    lockdown_at = boot.mono("ksbpf-lockdown.service")
    ready_at = boot.mono("ksbpf.service")
    probe_unit_at = boot.mono("leak-probe.service", "ExecMainStartTimestampMonotonic")
    probe = wait_for(boot.probe, "the leak probe's state file")
    assert isinstance(probe, dict)
    first = float(probe["first_monotonic"])
    assert 0 < lockdown_at <= probe_unit_at <= first, (
        f"the lockdown ({lockdown_at}) must be in before the probe unit ({probe_unit_at}) sends ({first})")
    assert first < ready_at, (
        f"the probe must send before ksbpfd is READY: first packet at {first:.3f}, READY at {ready_at:.3f}{boot.diag()}")
    rounds_then = int(probe["rounds"])
    wait_for(lambda: int(boot.probe()["rounds"]) > rounds_then + 5, "more probe rounds after READY")
    print(f"leak probe: first round {ready_at - first:.2f} s before READY; errors {probe['errors']}")
    boot.assert_no_leak("from network-pre.target through READY and after")
    assert boot.wire.counters()["exempt"] == 0, (
        f"the exempt probe's packets reached the ISP before any exemption: {boot.wire.leak_report()}")


def test_daemon_active_with_status_line(boot: Boot) -> None:
    assert boot.ct.run("systemctl", "is-active", "ksbpf").stdout.strip() == "active", boot.diag()
    status = boot.ct.show("ksbpf.service", "StatusText")
    assert status.startswith("enforcing"), f"ksbpf's STATUS line is {status!r}{boot.diag()}"
    assert "tunnel down" in status, f"the STATUS line does not say the tunnel is down: {status!r}"
    journal = boot.ct.journal("ksbpf", lines=500)
    for bad in ("Traceback", "Operation not permitted", "Bad system call"):
        assert bad not in journal, f"{bad!r} in ksbpf's journal:\n{journal}"
    # --man=no: a minimal Debian has no man(1) to look the Documentation= pages up with.
    r = boot.ct.run("systemd-analyze", "verify", "--man=no", "ksbpf.service", "ksbpf-lockdown.service")
    assert r.returncode == 0, f"systemd-analyze verify on the installed units: {r.stdout}{r.stderr}"


def test_status_agrees_with_the_kernel(boot: Boot) -> None:
    st = boot.status_json()
    layers = st["layers"]
    assert isinstance(layers, dict)
    for name in ("nftables", "routing", "bpf"):
        assert layers[name]["engaged"] is True, f"ksctl status: {name} not engaged: {layers[name]}{boot.diag()}"
    tables = boot.nft_tables()
    assert "table inet ksbpf\n" in tables + "\n", f"ksctl status says nftables engaged, the kernel has: {tables}"
    assert "ksbpf_lockdown" not in tables, f"the lockdown table is still there after READY: {tables}"
    rules = boot.ct.run("ip", "rule", "list").stdout
    assert rules != boot.snapshot["ip rule"], f"ksctl status says routing engaged, no ip rule was added: {rules}"
    progs = ksbpf_programs(boot.ct.host_root_cgroup())
    names = {p.split()[0] for p in progs}
    assert {"ks_egress", "ks_sock_create"} <= names, (
        f"ksctl status says bpf engaged; attached below the container's root cgroup (queried from the host): {progs}")
    # Issue 16: bpffs and the pins are in PID 1's mount namespace (nsenter -a enters it), not
    # only inside the daemon's sandbox.
    mnt = boot.ct.run("findmnt", "-rn", "-t", "bpf", "--mountpoint", "/sys/fs/bpf")
    assert mnt.returncode == 0, f"no bpffs at /sys/fs/bpf in PID 1's mount namespace: {mnt.stdout}{mnt.stderr}"
    pins = boot.ct.run("ls", "/sys/fs/bpf/ksbpf")
    assert pins.returncode == 0 and pins.stdout.strip(), f"no pins under /sys/fs/bpf/ksbpf outside the daemon: {pins.stderr}"
    # doctor as a service of the container sees it (nspawn's seccomp filter, its capabilities),
    # which nsenter from the host would not.
    doctor = boot.ct.run("systemd-run", "--wait", "--pipe", "-q", "ksctl", "doctor", "--config", "/etc/ksbpf/policy.toml",
                         timeout=120)
    assert doctor.returncode == 0 and "all three layers can engage here" in doctor.stdout, (
        f"ksctl doctor inside the container (exit {doctor.returncode}):\n{doctor.stdout}{doctor.stderr}")
    text = boot.ct.run("ksctl", "status")
    assert text.returncode == 0, f"ksctl status exited {text.returncode}: {text.stdout}{text.stderr}"


def test_metrics_answer_inside(boot: Boot) -> None:
    code = ("import urllib.request\n"
            "from prometheus_client.parser import text_string_to_metric_families\n"
            "text = urllib.request.urlopen('http://127.0.0.1:9477/metrics', timeout=10).read().decode()\n"
            "for f in text_string_to_metric_families(text):\n"
            "    for s in f.samples:\n"
            "        print(s.name, dict(sorted(s.labels.items())), s.value)\n")
    r = boot.ct.run("python3", "-c", code)
    assert r.returncode == 0, f"scraping 127.0.0.1:9477/metrics inside failed: {r.stderr}{boot.diag()}"
    lines = r.stdout.splitlines()
    assert "ksbpf_enforcing {} 1.0" in lines, f"no ksbpf_enforcing 1 in the scrape: {lines[:40]}"
    for layer in ("nftables", "routing", "bpf"):
        assert f"ksbpf_layer_engaged {{'layer': '{layer}'}} 1.0" in lines, f"metrics: {layer} not engaged: {lines[:40]}"


def test_reload_applies_a_changed_policy(boot: Boot) -> None:
    before = boot.ksbpf_ruleset()
    assert "192.168.77.0" not in before
    policy = (BOOT_ASSETS / "policy.toml").read_text() + '\n[lan]\nallow = true\nnetworks = ["192.168.77.0/24"]\n'
    boot.ct.run("sh", "-c", "cat > /etc/ksbpf/policy.toml", input=policy)
    r = boot.ct.run("systemctl", "reload", "ksbpf", timeout=120)
    assert r.returncode == 0, f"systemctl reload ksbpf failed: {r.stderr}{boot.diag()}"
    after = boot.ksbpf_ruleset()
    assert "192.168.77.0/24" in after, f"the reloaded policy's LAN is not in the nft ruleset:\n{after}{boot.diag()}"
    assert boot.ct.run("systemctl", "is-active", "ksbpf").stdout.strip() == "active"
    boot.assert_no_leak("after a reload")


def test_reload_refuses_a_broken_policy_and_keeps_the_old(boot: Boot) -> None:
    before = boot.ksbpf_ruleset()
    good = boot.ct.run("cat", "/etc/ksbpf/policy.toml").stdout
    try:
        boot.ct.run("sh", "-c", "cat > /etc/ksbpf/policy.toml", input=good + "\n[tunnel\ninterfaces = 7\n")
        r = boot.ct.run("systemctl", "reload", "ksbpf", timeout=120)
        assert r.returncode != 0, "systemctl reload ksbpf succeeded with a broken policy file"
        assert boot.ksbpf_ruleset() == before, "a refused reload changed the nft ruleset"
        assert boot.ct.run("systemctl", "is-active", "ksbpf").stdout.strip() == "active", (
            f"ksbpf is not active after a refused reload{boot.diag()}")
        journal = boot.ct.journal("ksbpf", lines=40)
        assert "TOML" in journal or "policy.toml" in journal, f"the journal does not say why the reload was refused:\n{journal}"
        boot.assert_no_leak("after a refused reload")
    finally:
        boot.ct.run("sh", "-c", "cat > /etc/ksbpf/policy.toml", input=good)
        boot.ct.run("systemctl", "reload", "ksbpf", timeout=120)


def test_exempt_through_the_daemon_lets_exactly_that_unit_out(boot: Boot) -> None:
    assert boot.wire.counters()["exempt"] == 0, f"the exempt probe got out before the exemption: {boot.wire.leak_report()}"
    r = boot.ct.run("ksctl", "exempt", "--cgroup", EXEMPT_UNIT, "--allow", "udp/5555", "--to", f"{Wire.ISP4}/32")
    assert r.returncode == 0, f"ksctl exempt failed ({r.returncode}): {r.stdout}{r.stderr}{boot.diag()}"
    st = boot.status_json()
    assert str(st.get("pid")) == boot.ct.show("ksbpf.service", "MainPID"), f"ksctl status did not come from ksbpfd: {st}"
    assert EXEMPT_UNIT in json.dumps(st.get("exemptions")), f"ksctl status does not list the exemption: {st.get('exemptions')}"
    wait_for(lambda: boot.wire.counters()["exempt"] >= 5, "the exempted unit's packets at the ISP", timeout=30)
    time.sleep(2)  # the leak probe keeps sending meanwhile
    boot.assert_no_leak("with a run-time exemption for another unit")


def test_traffic_goes_through_the_tunnel_only_while_it_is_up(boot: Boot) -> None:
    """The tunnel interface appears (a veth named wg0 standing in for WireGuard): ksbpfd
    follows it, the probe's packets go through it and still none on the uplink; it goes
    away: everything is blocked again."""
    ct, wire = boot.ct, boot.wire
    assert wire.counters()["tunnel"] == 0
    wire.tunnel_up()
    try:
        wait_for(lambda: wire.counters()["tunnel"] > 20, "the probe's packets through the tunnel", timeout=30)
        wait_for(lambda: boot.status_json()["tunnels"].get("wg0") is True, "ksctl status: wg0 up", timeout=30)
        wait_for(lambda: ct.show("ksbpf.service", "StatusText").find("tunnel wg0 up") >= 0, "STATUS: tunnel wg0 up",
                 timeout=30)
        boot.assert_no_leak("with the tunnel up")
    finally:
        wire.tunnel_down()
    wait_for(lambda: boot.status_json()["tunnels"].get("wg0") is False, "ksctl status: wg0 down", timeout=30)
    # The probe keeps sending: none of it may fall back to the uplink now.
    rounds = int(boot.probe()["rounds"])
    wait_for(lambda: int(boot.probe()["rounds"]) > rounds + 5, "probe rounds with the tunnel gone")
    boot.assert_no_leak("after the tunnel went away")


def _newer_version_of(deb: Path, into: Path) -> Path:
    """The same package as version <v>+t1: what an upgrade installs."""
    unpacked = into / "upgrade"
    run_host(["dpkg-deb", "-R", str(deb), str(unpacked)])
    control = unpacked / "DEBIAN/control"
    fields = control.read_text()
    version = next(line.split(":", 1)[1].strip() for line in fields.splitlines() if line.startswith("Version:"))
    control.write_text(fields.replace(f"Version: {version}\n", f"Version: {version}+t1\n"))
    out = into / f"ksbpf_{version}+t1_all.deb"
    run_host(["dpkg-deb", "--root-owner-group", "-b", str(unpacked), str(out)])
    return out


def test_upgrade_restarts_the_daemon_without_a_gap(boot: Boot) -> None:
    """Installing a newer version (prerm upgrade, postinst configure with the old version)
    restarts ksbpfd; the kernel enforces throughout, the run-time exemption survives, and the
    lockdown unit is not started again under the running daemon."""
    ct = boot.ct
    newer = _newer_version_of(boot.deb, boot.root.parent)  # the overlay's temp dir, removed after
    shutil.copy(newer, boot.root / "root" / newer.name)
    pid = ct.show("ksbpf.service", "MainPID")
    lockdown_at = ct.show("ksbpf-lockdown.service", "ActiveEnterTimestampMonotonic")
    exempt_before = boot.wire.counters()["exempt"]
    r = ct.run("apt-get", "install", "-y", "-q", f"/root/{newer.name}", timeout=300)
    assert r.returncode == 0, f"upgrading to {newer.name} failed:\n{r.stdout}{r.stderr}"
    assert "+t1" in ct.run("dpkg-query", "-W", "-f", "${Version}", "ksbpf").stdout, "the upgrade did not install"
    wait_for(lambda: ct.show("ksbpf.service", "ActiveState") == "active", "ksbpf active after the upgrade")
    assert ct.show("ksbpf.service", "MainPID") not in (pid, "0"), "the upgrade did not restart ksbpfd"
    assert ct.show("ksbpf-lockdown.service", "ActiveEnterTimestampMonotonic") == lockdown_at, (
        "the upgrade restarted ksbpf-lockdown.service under the running daemon")
    assert "ksbpf_lockdown" not in boot.nft_tables(), "the upgrade loaded the boot lockdown under the running daemon"
    st = boot.status_json()
    for name, layer in st["layers"].items():
        assert layer["engaged"] is True, f"after the upgrade ksctl status says {name}: {layer}{boot.diag()}"
    assert EXEMPT_UNIT in json.dumps(st.get("exemptions")), f"the run-time exemption did not survive the upgrade: {st}"
    wait_for(lambda: boot.wire.counters()["exempt"] > exempt_before + 3, "the exempted unit's packets after the upgrade")
    boot.assert_no_leak("through the upgrade's daemon restart")


def test_reboot_comes_up_enforcing_and_the_admin_stays_reachable(boot: Boot) -> None:
    ct, wire = boot.ct, boot.wire
    generated = ct.run("cat", "/var/lib/ksbpf/lockdown.nft").stdout
    assert "ksbpf_lockdown" in generated and "22" in generated, (
        f"no generated lockdown with the admin exemption in /var/lib/ksbpf/lockdown.nft: {generated!r}")
    # Holds ksbpfd back at the next boot until the test has looked at the lockdown alone.
    ct.sh(f"mkdir -p {Path(HOLD_DROPIN).parent} && printf '%s\\n' '[Service]' "
          f"\"ExecStartPre=/bin/sh -c 'while [ ! -e {RELEASE} ]; do sleep 0.2; done'\" > {HOLD_DROPIN}")
    ct.run("systemctl", "reboot", "--no-block")
    code = ct.wait_exit(90)
    assert code is not None, "the container did not go down on systemctl reboot"
    # A real reboot starts with an empty kernel: a fresh network namespace (the cgroups and
    # the bpffs went with the container).
    wire.fresh_container_netns()
    boot.snapshot = wire.kernel_snapshot()
    leaks_before = wire.counters()["leak"]
    ct.pid1 = 0
    ct.boot()
    try:
        wait_for(lambda: ct.show("ksbpf.service", "ActiveState") == "activating", "ksbpf.service held at start",
                 timeout=120)
        wait_for(lambda: ct.show("fake-sshd.service", "ActiveState") == "active", "fake-sshd", timeout=60)
        tables = boot.nft_tables()
        assert "ksbpf_lockdown" in tables and "table inet ksbpf\n" not in tables + "\n", (
            f"during the lockdown the kernel should hold ksbpf_lockdown only: {tables}")
        lockdown_log = ct.journal("ksbpf-lockdown")
        assert "did not load" not in lockdown_log, f"the generated lockdown did not load:\n{lockdown_log}"
        banner = wire.connect_admin()
        assert banner.startswith("SSH-2.0"), f"the admin exemption does not answer during the lockdown: {banner}{boot.diag()}"
        rounds = int(wait_for(lambda: boot.probe().get("rounds"), "the leak probe during the lockdown"))
        wait_for(lambda: int(boot.probe()["rounds"]) > rounds + 5, "more probe rounds during the lockdown")
        assert ct.show("ksbpf.service", "ActiveState") == "activating", "ksbpfd was not held back for the whole check"
        assert wire.counters()["leak"] == leaks_before == 0, f"leak during the boot lockdown: {wire.leak_report()}{boot.diag()}"
    finally:
        ct.run("touch", RELEASE)
        ct.run("rm", "-rf", str(Path(HOLD_DROPIN).parent))
        ct.run("systemctl", "daemon-reload")
    state = ct.wait_running()
    ct.run("rm", "-f", RELEASE)
    assert ct.show("ksbpf.service", "ActiveState") == "active", f"ksbpf did not come up after the reboot ({state}){boot.diag()}"
    assert ct.show("ksbpf.service", "StatusText").startswith("enforcing"), boot.diag()
    assert boot.mono("ksbpf-lockdown.service") < boot.mono("ksbpf.service"), "the lockdown must come before ksbpfd"
    tables = boot.nft_tables()
    assert "ksbpf_lockdown" not in tables and "table inet ksbpf" in tables, f"after READY: {tables}"
    for name, layer in boot.status_json()["layers"].items():
        assert layer["engaged"] is True, f"after the reboot ksctl status says {name}: {layer}{boot.diag()}"
    boot.assert_no_leak("through the reboot")


def test_admin_listener_started_before_ksbpfd_answers(boot: Boot) -> None:
    """boot-findings F3: a listener created before ksbpfd attached its programs has no exempt
    mark from sock_create; `ksctl mark-sockets` (ExecStartPost=) must give it one."""
    since = boot.mono("fake-sshd.service", "ExecMainStartTimestampMonotonic")
    assert 0 < since < boot.mono("ksbpf.service"), "fake-sshd should have started before ksbpfd at this boot"
    banner = boot.wire.connect_admin()
    assert banner.startswith("SSH-2.0"), (
        f"the admin exemption's listener (started during the lockdown) does not answer after ksbpfd is up: {banner}")


def test_admin_listener_started_after_ksbpfd_answers(boot: Boot) -> None:
    wait_for(lambda: boot.ct.show("ksbpf.service", "ActiveState") == "active", "ksbpf active", timeout=120)
    r = boot.ct.run("systemctl", "restart", "fake-sshd")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: boot.ct.show("fake-sshd.service", "ActiveState") == "active", "fake-sshd")
    assert boot.mono("fake-sshd.service", "ExecMainStartTimestampMonotonic") > boot.mono("ksbpf.service")
    banner = wait_for(lambda: (b := boot.wire.connect_admin(timeout=2)).startswith("SSH-2.0") and b, "the admin banner",
                      timeout=20, every=0.5)
    assert str(banner).startswith("SSH-2.0")
    boot.assert_no_leak("with the admin exemption answering")


def test_purge_leaves_nothing_in_the_kernel_or_on_disk(boot: Boot) -> None:
    ct, wire = boot.ct, boot.wire
    ct.run("rm", "-rf", str(Path(HOLD_DROPIN).parent), RELEASE)  # the test's own, if the reboot test failed early
    # Without ksbpf the probes would get out: stop them first, and count once more.
    ct.run("systemctl", "stop", *TEST_UNITS)
    boot.assert_no_leak("over the whole run")
    cgroup_root = ct.host_root_cgroup()
    assert ksbpf_programs(cgroup_root), "no ksbpf program attached before the purge: the query below would prove nothing"
    r = ct.run("apt-get", "purge", "-y", "-q", "ksbpf", timeout=180)
    assert r.returncode == 0, f"apt-get purge ksbpf failed:\n{r.stdout}{r.stderr}"
    assert "did not remove everything" not in r.stdout + r.stderr, f"the prerm's ksctl down failed:\n{r.stdout}{r.stderr}"
    left = ksbpf_programs(cgroup_root.parent)
    assert not left, f"after apt-get purge ksbpf, attached in the container's cgroup tree (seen from the host): {left}"
    tables = boot.nft_tables()
    assert "ksbpf" not in tables, f"nft tables left after purge: {tables}"
    now = wire.kernel_snapshot()
    for what, before in boot.snapshot.items():
        assert now[what] == before, f"after purge, `{what}` differs from before ksbpf ran:\nbefore:\n{before}\nafter:\n{now[what]}"
    for path in ("/var/lib/ksbpf", "/sys/fs/bpf/ksbpf", "/run/ksbpf", "/usr/share/ksbpf", "/usr/bin/ksctl",
                 "/usr/lib/python3/dist-packages/ksbpf", "/lib/systemd/system/ksbpf.service"):
        assert ct.run("test", "-e", path).returncode != 0, f"{path} is still there after apt-get purge ksbpf"
    found = ct.sh("find / /run /sys/fs/bpf -xdev -name '*ksbpf*' 2>/dev/null | sort -u").stdout.split()
    # The admin's own policy stays (not the package's file), and this test's files.
    left_files = [p for p in found if p not in ("/etc/ksbpf", "/etc/ksbpf/policy.toml", "/etc/ksbpf-boot-test-root")
                  and not p.startswith(("/usr/local/lib/ksbpf-boot-test", "/proc/", "/root/ksbpf_"))]
    assert not left_files, f"files of ksbpf left after purge: {left_files}"


def test_control_the_leak_counter_sees_the_probe_without_ksbpf(boot: Boot) -> None:
    """With ksbpf purged, the same probe's packets arrive and are counted as leaks: the
    zero counts above are ksbpf's doing, not a counter that cannot count."""
    before = boot.wire.counters()["leak"]
    boot.ct.run("systemctl", "start", "leak-probe.service")
    try:
        wait_for(lambda: boot.wire.counters()["leak"] > before + 10, "the unprotected probe's packets at the ISP", timeout=30)
        flows = " ".join(boot.wire.leaked())
        assert Wire.CT4 in flows and Wire.CT6 in flows, f"the leak set does not show both families: {flows}"
    finally:
        boot.ct.run("systemctl", "stop", "leak-probe.service")
