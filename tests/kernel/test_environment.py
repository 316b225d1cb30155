"""What a container takes away, made for real in a mount namespace of the test's own:
a read-only /proc/sys/net, a /sys/fs/bpf that is no bpffs and cannot become one. Each
layer the environment refuses is reported NOT ENGAGED with its reason (exit 3, no
traceback) while the others enforce; `status` and the daemon's drift check judge a layer
as `up` does; `doctor` names the cause. And `down` finds ksbpf's programs by asking the
kernel when their pins are gone (as when a bpffs private to ksbpfd's sandbox vanished).

The read-only mounts exist only inside `unshare -m` (propagation private): the host's
mounts are never touched. BPF attaches only to cgroups this test makes.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ksbpf.doctor import socket_mark_check
from ksbpf.linux import libbpf
from ksbpf.linux.bpf.kernel import ATTACH_EGRESS, ATTACH_SOCK_CREATE
from ksbpf.linux.bpf.layer import PIN_ROOT, BpfLayer
from ksbpf.linux.bpf.layout import instance_name
from ksbpf.linux.routing import SRC_VALID_MARK
from tests.kernel.conftest import CgroupFactory, NetnsFactory, sh
from tests.kernel.sender import send_udp
from tests.kernel.uplink import Uplink, build_uplink, ksctl

pytestmark = pytest.mark.kernel

RO_SYSCTL = "mount --bind /proc/sys/net /proc/sys/net && mount -o remount,ro,bind /proc/sys/net"
RO_BPFFS = "mount -t tmpfs -o ro,size=64k ksbpf-test /sys/fs/bpf"


def _bpf_supported() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "needs root"
    return BpfLayer("probe").is_supported()


_BPF = _bpf_supported()
requires_bpf = pytest.mark.skipif(not _BPF[0], reason=f"BPF layer unsupported here: {_BPF[1]}")


def in_private_mounts(setup: str, *args: str, netns: str, state_dir: Path,
                      after: str = "") -> subprocess.CompletedProcess[str]:
    """`ksctl --netns NETNS --state-dir DIR ARGS` in a new mount namespace where `setup`
    ran first; `after` runs there once ksctl exited (its output follows a '---' line)."""
    script = (f"set -e; mount --make-rprivate /; {setup}; set +e; \"$@\"; rc=$?; "
              f"echo ---; {after or 'true'}; exit $rc")
    ksctl_argv = [sys.executable, "-m", "ksbpf.cli", "--netns", netns, "--state-dir", str(state_dir), *args]
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *ksctl_argv],
                          capture_output=True, text=True, timeout=180, cwd=str(Path(__file__).parents[2]))


def layer_line(out: str, layer: str) -> str:
    return next((line for line in out.splitlines() if line.split()[:1] == [layer]), "")


def set_src_valid_mark(netns: str, value: int) -> None:
    sh("sysctl", "-q", "-w", f"net.ipv4.conf.all.src_valid_mark={value}", netns=netns)


def host_mounts() -> list[str]:
    """The host's mounts where the tests make theirs (others come and go: /run/netns)."""
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if line.split()[4].startswith(("/proc", "/sys/fs/bpf"))]


def ks_attached(cg: Path) -> list[tuple[str, int]]:
    """(program name, id) of every program attached to `cg`, ksbpf's or not."""
    out = []
    fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for atype in (ATTACH_EGRESS, ATTACH_SOCK_CREATE):
            for pid in libbpf.prog_query(fd, atype):
                pfd = libbpf.prog_fd_by_id(pid, "test")
                try:
                    out.append((libbpf.prog_info(pfd).name, pid))
                finally:
                    os.close(pfd)
    finally:
        os.close(fd)
    return out


@pytest.fixture
def uplink(make_netns: NetnsFactory) -> Uplink:
    return build_uplink(make_netns)


class World:
    def __init__(self, u: Uplink, cgroups: CgroupFactory, tmp: Path, attach: Path) -> None:
        self.u = u
        self.cgroups = cgroups
        self.state = tmp / "state"
        self.attach = attach
        self.policy = tmp / "policy.toml"
        # Never the default "/": only the cgroup this test made.
        self.policy.write_text(u.policy(f'\n[bpf]\ncgroup = "{cgroups.rel(attach)}"\n'))

    def ksctl(self, *args: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
        return ksctl(*args, netns=self.u.client, state_dir=str(state or self.state))

    def up_here(self, setup: str, after: str = "") -> subprocess.CompletedProcess[str]:
        return in_private_mounts(setup, "up", "--config", str(self.policy), netns=self.u.client,
                                 state_dir=self.state, after=after)

    def has_table(self) -> bool:
        return sh("nft", "list", "table", "inet", "ksbpf", netns=self.u.client, check=False).returncode == 0

    def nft_enforces(self, port: int) -> bool:
        """A datagram to the far side, from outside every test cgroup (so BPF does not
        judge it): nothing arrives while nftables holds."""
        before = self.u.far_count()
        send_udp(self.u.client, "192.0.2.1", port, 3)
        return self.u.far_count() == before


@pytest.fixture
def world(uplink: Uplink, make_cgroup: CgroupFactory, tmp_path: Path) -> Iterator[World]:
    w = World(uplink, make_cgroup, tmp_path, make_cgroup("attach/here"))
    try:
        yield w
    finally:
        if w.ksctl("down").returncode != 0:  # the layer's own reset, before the cgroups go
            BpfLayer(instance_name(uplink.client), netns=uplink.client).reset(cgroup=make_cgroup.rel(w.attach))


# ---------------------------------------------------------------- 15.2 / 15.3 / 15.4


@requires_bpf
def test_read_only_proc_sys_net_leaves_routing_not_engaged_and_status_agrees(world: World) -> None:
    u = world.u
    set_src_valid_mark(u.client, 0)
    mounts = host_mounts()
    r = world.up_here(RO_SYSCTL)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    routing = layer_line(r.stdout, "routing")
    assert "NOT ENGAGED" in routing and f"cannot set {SRC_VALID_MARK}: Read-only file system" in routing, r.stdout
    assert "NOT ENGAGED" not in layer_line(r.stdout, "nftables"), r.stdout
    assert "NOT ENGAGED" not in layer_line(r.stdout, "bpf"), r.stdout
    assert "layers not engaged: routing" in r.stderr
    assert host_mounts() == mounts, "the read-only mount must stay in the test's mount namespace"
    # The others really enforce.
    assert world.has_table() and world.nft_enforces(40001)
    assert {name for name, _ in ks_attached(world.attach)} == {"ks_egress", "ks_sock_create"}

    # status judges routing as up did: there (read-only) and here (the sysctl is still 0).
    for st in (in_private_mounts(RO_SYSCTL, "status", netns=u.client, state_dir=world.state), world.ksctl("status")):
        assert st.returncode == 1, st.stdout + st.stderr
        line = layer_line(st.stdout, "routing")
        assert "NOT ENGAGED" in line and f"{SRC_VALID_MARK} is 0, not 1" in line, st.stdout
        assert "NOT ENGAGED" not in layer_line(st.stdout, "nftables") + layer_line(st.stdout, "bpf"), st.stdout

    # doctor names the cause and the fix.
    d = in_private_mounts(RO_SYSCTL, "doctor", netns=u.client, state_dir=world.state)
    assert d.returncode == 1, d.stdout + d.stderr
    line = layer_line(d.stdout, "FAIL")
    assert "/proc/sys/net" in line and "read-only" in line and "src_valid_mark" in line, d.stdout

    # The value the namespace's manager set is all routing needs: read-only is then fine,
    # and status reads the client namespace's value (the host's stays as it was).
    set_src_valid_mark(u.client, 1)
    r = world.up_here(RO_SYSCTL)
    assert r.returncode == 0, r.stdout + r.stderr
    st = in_private_mounts(RO_SYSCTL, "status", netns=u.client, state_dir=world.state)
    assert st.returncode == 0 and "NOT ENGAGED" not in st.stdout, st.stdout + st.stderr


def test_routing_drift_includes_src_valid_mark(world: World) -> None:
    """The daemon's drift check reads the sysctl as status does, and puts it back."""
    from ksbpf.linux.engine import LinuxEngine, state_dir_for
    from ksbpf.reconcile.reconciler import Reconciler

    eng = LinuxEngine(netns=world.u.client, state_dir=state_dir_for(world.u.client, world.state), bpf=False)
    result = eng.up_file(world.policy)
    assert result.layers["routing"].engaged, result.layers
    rec = Reconciler(eng, bpf=False, settle_s=0.0)
    rec.engaged(eng.effective_policy(eng.applied_snapshot()), result.layers)
    assert rec.routing_drift() is None
    set_src_valid_mark(world.u.client, 0)
    assert not eng.status()["routing"].engaged
    assert "src_valid_mark is 0" in (rec.routing_drift() or "")
    assert "src_valid_mark is 0" in (rec.check_routing() or "")
    assert rec.drift_repairs["routing"] == 1 and rec.layers["routing"]
    assert eng.status()["routing"].engaged
    assert sh("sysctl", "-n", "net.ipv4.conf.all.src_valid_mark", netns=world.u.client).stdout.strip() == "1"


@requires_bpf
def test_no_bpffs_and_none_mountable_leaves_bpf_not_engaged(world: World) -> None:
    """/sys/fs/bpf covered by a read-only tmpfs in a mount namespace that is not the
    host's: ksbpf neither traces back nor mounts a bpffs only there."""
    u = world.u
    mounts = host_mounts()
    r = world.up_here(RO_BPFFS, after="grep ' /sys/fs/bpf ' /proc/self/mountinfo")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    bpf = layer_line(r.stdout, "bpf")
    assert "NOT ENGAGED" in bpf and "bpffs is not mounted at /sys/fs/bpf (tmpfs is mounted there)" in bpf, r.stdout
    assert "will not mount it here" in bpf and "mount -t bpf bpf /sys/fs/bpf" in bpf, r.stdout
    assert "NOT ENGAGED" not in layer_line(r.stdout, "nftables") + layer_line(r.stdout, "routing"), r.stdout
    # Nothing was mounted over the tmpfs in that namespace, nothing changed on the host.
    top = r.stdout.split("---", 1)[1].strip().splitlines()[-1].split()
    assert top[top.index("-", 6) + 1] == "tmpfs", r.stdout
    assert host_mounts() == mounts
    assert world.has_table() and world.nft_enforces(40002)
    assert ks_attached(world.attach) == []

    st = in_private_mounts(RO_BPFFS, "status", netns=u.client, state_dir=world.state)
    assert st.returncode == 1 and "Traceback" not in st.stderr, st.stdout + st.stderr
    assert "NOT ENGAGED" in layer_line(st.stdout, "bpf") and "bpffs is not mounted" in st.stdout, st.stdout
    d = in_private_mounts(RO_BPFFS, "doctor", netns=u.client, state_dir=world.state)
    assert d.returncode == 1, d.stdout + d.stderr
    line = next(line for line in d.stdout.splitlines() if " bpffs " in line)
    assert line.startswith("FAIL") and "not mountable from here" in line, d.stdout


# ---------------------------------------------------------------- 16: down asks the kernel


def pins_of(world: World) -> Path:
    return PIN_ROOT / instance_name(world.u.client)


@requires_bpf
@pytest.mark.parametrize("record", ["applied-policy", "no-policy"])
def test_down_detaches_programs_whose_pins_are_gone(world: World, tmp_path: Path, record: str) -> None:
    r = world.ksctl("up", "--config", str(world.policy))
    assert r.returncode == 0, r.stdout + r.stderr
    attached = ks_attached(world.attach)
    assert {name for name, _ in attached} == {"ks_egress", "ks_sock_create"}
    assert pins_of(world).is_dir()
    shutil.rmtree(pins_of(world))  # as a bpffs private to a vanished mount namespace would leave it
    # Without a policy record, only the kernel knows where they are (a cgroup two levels down).
    state = world.state if record == "applied-policy" else tmp_path / "fresh-state"

    st = world.ksctl("status", state=state)
    line = layer_line(st.stdout, "bpf")
    assert "NOT ENGAGED" in line and "attached without pins:" in line, st.stdout
    for name, pid in attached:
        assert f"{name} #{pid} on {world.attach}" in line, st.stdout

    d = world.ksctl("down", state=state)
    assert d.returncode == 0, d.stdout + d.stderr
    assert ks_attached(world.attach) == []
    assert not world.has_table()  # nftables and routing need no record either
    assert not pins_of(world).exists()


@requires_bpf
def test_down_fails_naming_what_is_left_attached(world: World) -> None:
    """A program of ksbpf that something else holds attached (here a bpf_link this test
    keeps open) cannot be detached by `down`: exit 1, naming it, not "all removed"."""
    r = world.ksctl("up", "--config", str(world.policy))
    assert r.returncode == 0, r.stdout + r.stderr
    prog_fd = libbpf.obj_get(next(pins_of(world).glob("g*")) / "egress")
    cg_fd = os.open(world.attach, os.O_RDONLY | os.O_DIRECTORY)
    link_fd = -1
    try:
        link_fd = libbpf.link_create(prog_fd, cg_fd, ATTACH_EGRESS, "link create")
        egress_id = libbpf.prog_info(prog_fd).id
        assert [pid for name, pid in ks_attached(world.attach) if name == "ks_egress"] == [egress_id, egress_id]

        d = world.ksctl("down")
        assert d.returncode == 1, d.stdout + d.stderr
        assert "Traceback" not in d.stderr
        assert f"still attached after detaching: ks_egress #{egress_id} on {world.attach}" in d.stderr, d.stderr
        assert "all layers removed" not in d.stdout
        assert ks_attached(world.attach) == [("ks_egress", egress_id)]
    finally:
        if link_fd >= 0:
            os.close(link_fd)  # the link goes, and the program with it
        os.close(cg_fd)
        os.close(prog_fd)
    d = world.ksctl("down")
    assert d.returncode == 0, d.stdout + d.stderr
    assert ks_attached(world.attach) == []


DRIFT_UNDER_RO = """
import json, sys
from pathlib import Path
from ksbpf.errors import BackendError
from ksbpf.linux.engine import LinuxEngine, state_dir_for
from ksbpf.reconcile.reconciler import Reconciler
eng = LinuxEngine(netns=sys.argv[1], state_dir=state_dir_for(sys.argv[1], Path(sys.argv[2])), bpf=False)
rec = Reconciler(eng, bpf=False, settle_s=0.0)
status = eng.status()
rec.engaged(eng.applied_policy(), status)
out = {"status": status["routing"].detail, "drift": rec.routing_drift(), "quiet": rec.check_routing(),
       "after_quiet": rec.layers["routing"]}
rec.layers["routing"] = True  # as if it had been engaged until now: the refused repair is raised once
try:
    rec.check_routing()
    out["raised"] = None
except BackendError as e:
    out["raised"] = e.reason
out["after_raise"] = rec.layers["routing"]
print(json.dumps(out))
"""


def test_daemon_drift_check_under_a_read_only_sysctl(world: World) -> None:
    """ksbpfd's drift check judges routing as status does: with src_valid_mark 0 in a
    read-only /proc/sys/net the repair is refused, and the layer stays not engaged."""
    import json

    set_src_valid_mark(world.u.client, 0)
    r = world.up_here(RO_SYSCTL)
    assert r.returncode == 3, r.stdout + r.stderr
    script = (f"set -e; mount --make-rprivate /; {RO_SYSCTL}; "
              f"exec {sys.executable} -c '{DRIFT_UNDER_RO}' {world.u.client} {world.state}")
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True,
                       text=True, timeout=120, cwd=str(Path(__file__).parents[2]))
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert f"{SRC_VALID_MARK} is 0, not 1" in out["status"] and f"{SRC_VALID_MARK} is 0, not 1" in out["drift"]
    assert out["quiet"] is None and out["after_quiet"] is False
    assert f"cannot set {SRC_VALID_MARK}: Read-only file system" in out["raised"] and out["after_raise"] is False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@requires_bpf
def test_daemon_keeps_running_and_reports_what_the_environment_refuses(world: World, tmp_path: Path) -> None:
    """ksbpfd in a mount namespace with a read-only /proc/sys/net (src_valid_mark 0) and no
    bpffs it may mount: it starts, enforces with nftables, reports routing and BPF NOT
    ENGAGED with their reasons (start and reload alike), and never traces back."""
    import signal
    import time

    from ksbpf.control import socket_path

    set_src_valid_mark(world.u.client, 0)
    world.policy.write_text(world.policy.read_text() + f'\n[metrics]\nlisten = "127.0.0.1:{_free_port()}"\n')
    log = tmp_path / "ksbpfd.log"
    script = f"set -e; mount --make-rprivate /; {RO_SYSCTL}; {RO_BPFFS}; exec \"$@\""
    argv = [sys.executable, "-m", "ksbpf.daemon", "--config", str(world.policy), "--netns", world.u.client,
            "--state-dir", str(world.state), "--log-target", "stderr"]
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    with open(log, "w") as f:
        # unshare and sh exec: the pid is the daemon's
        proc = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh", *argv],
                                stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(Path(__file__).parents[2]))
    try:
        sock = socket_path(world.u.client)
        deadline = time.monotonic() + 90
        while not sock.exists() or "ready:" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        st = world.ksctl("status")
        assert st.returncode == 1, st.stdout + st.stderr
        assert "NOT ENGAGED" not in layer_line(st.stdout, "nftables"), st.stdout
        assert f"{SRC_VALID_MARK} is 0, not 1" in layer_line(st.stdout, "routing"), st.stdout
        assert "bpffs is not mounted at /sys/fs/bpf (tmpfs is mounted there)" in layer_line(st.stdout, "bpf"), st.stdout
        assert world.has_table() and world.nft_enforces(40003)
        r = world.ksctl("reload")
        assert r.returncode == 3, r.stdout + r.stderr
        assert "cannot set" in layer_line(r.stdout, "routing") and "will not mount it here" in layer_line(r.stdout, "bpf")
        assert proc.poll() is None, log.read_text()
        text = log.read_text()
        assert "Traceback" not in text, text
        assert "routing NOT ENGAGED: cannot set" in text and "bpf NOT ENGAGED: bpffs is not mounted" in text, text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _refuse_syscall(nr: int) -> Callable[[], None]:
    """A preexec_fn: a seccomp filter that answers system call `nr` with EPERM, as a
    container's filter does (systemd-nspawn's default, docker's default profile)."""
    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    def install() -> None:
        prog = (SockFilter * 4)(
            SockFilter(0x20, 0, 0, 0),  # A = seccomp_data.nr
            SockFilter(0x15, 0, 1, nr),  # A == nr ? next : skip one
            SockFilter(0x06, 0, 0, 0x00050000 | 1),  # SECCOMP_RET_ERRNO | EPERM
            SockFilter(0x06, 0, 0, 0x7FFF0000),  # SECCOMP_RET_ALLOW
        )
        fprog = SockFprog(4, prog)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # NO_NEW_PRIVS, SECCOMP
            raise OSError(ctypes.get_errno(), "seccomp")

    return install


_refuse_bpf_syscall = _refuse_syscall(321)  # bpf(2) on x86_64


def test_doctor_names_a_filter_that_refuses_pidfd_getfd() -> None:
    """ksctl marks the sockets exempt services made before ksbpf engaged with pidfd_getfd(2)
    (boot finding F4): a seccomp filter refusing it is named with the setting that fixes
    it, and the check is not required (such services stay blocked: fail closed)."""
    code = ("from ksbpf.doctor import socket_mark_check; c = socket_mark_check(None); "
            "print(c.ok, c.required, c.detail, sep='|')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       preexec_fn=_refuse_syscall(438),  # pidfd_getfd: the same number on every architecture
                       cwd=str(Path(__file__).parents[2]))
    assert r.returncode == 0, r.stderr
    ok, required, detail = r.stdout.strip().split("|", 2)
    assert (ok, required) == ("False", "False"), r.stdout
    assert "seccomp" in detail and "--system-call-filter='bpf pidfd_getfd'" in detail, detail
    assert socket_mark_check(None).ok, "allowed without the filter"
    assert "CAP_SYS_PTRACE" in socket_mark_check(0).detail, "and the capability is named"


@requires_bpf
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the seccomp filter names bpf(2) by its x86_64 number")
def test_bpf_system_call_refused(world: World) -> None:
    """EPERM from bpf(2) (a container's seccomp filter): BPF NOT ENGAGED naming the
    container setting, nftables and routing enforce, doctor says the same, and `down`
    (the package's prerm) still removes what it can and succeeds."""
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "ksbpf.cli", "--netns", world.u.client, "--state-dir", str(world.state), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=180, preexec_fn=_refuse_bpf_syscall,
                              cwd=str(Path(__file__).parents[2]))

    r = run("up", "--config", str(world.policy))
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stdout + r.stderr
    bpf = layer_line(r.stdout, "bpf")
    assert "NOT ENGAGED" in bpf and "Operation not permitted" in bpf and "--system-call-filter=bpf" in bpf, r.stdout
    assert "NOT ENGAGED" not in layer_line(r.stdout, "nftables") + layer_line(r.stdout, "routing"), r.stdout
    assert world.has_table() and world.nft_enforces(40004)
    assert ks_attached(world.attach) == []
    st = run("status")
    assert st.returncode == 1 and "NOT ENGAGED" in layer_line(st.stdout, "bpf"), st.stdout + st.stderr
    d = run("doctor")
    assert d.returncode == 1, d.stdout + d.stderr
    line = next(line for line in d.stdout.splitlines() if " bpf syscall " in line)
    assert line.startswith("FAIL") and "refused (EPERM)" in line and "--system-call-filter=bpf" in line, d.stdout
    down = run("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not world.has_table()
