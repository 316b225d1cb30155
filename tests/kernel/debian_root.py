"""A Debian 12 root file system booted with systemd as PID 1, for the package's boot test.

- `base_root()`: a minimal bookworm root (mmdebstrap) cached outside the repository, in
  CACHE_DIR, with the downloaded .debs kept in CACHE_DIR/archives for the next build and
  for installing ksbpf's dependencies without the network.
- `package_deb()`: dist/ksbpf_*_all.deb from `make deb`, reused when newer than every
  source file.
- `OverlayRoot`: a writable overlay on the cached root, one per test run, removed after.
- `Wire`: the container's own network namespace, wired by a veth to a counting "ISP"
  namespace; nothing is ever wired to the host's network.
- `Container`: systemd-nspawn booting the root in that namespace, with BPF allowed, in a
  cgroup this test made (so the container's root cgroup, where ksbpf attaches, lies below
  it); commands run inside with nsenter.

Host protection: systemd inside gets all capabilities and writable /proc and /sys (for
bpffs and /proc/sys/net). Units that would write the host's kernel settings, load modules
or touch the host's disks through them are masked in the cached root (MASKED_UNITS).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ksbpf.linux.cgroup import cgroup2_mount, remove_cgroup_tree

REPO = Path(__file__).resolve().parents[2]
BOOT_ASSETS = Path(__file__).resolve().parent / "boot"
CACHE_DIR = Path(os.environ.get("KSBPF_BOOT_CACHE", "/var/cache/ksbpf-tests"))
SUITE = "bookworm"
MIRROR_HOST = "deb.debian.org"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "iproute2", "nftables")
# Units that, in a container with all capabilities and writable API file systems, would
# change the host: kernel sysctls, binfmt, modules, pstore, the host's disks (fstrim,
# e2scrub), and timers nobody needs in a test.
MASKED_UNITS = (
    "systemd-sysctl.service", "procps.service", "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount", "systemd-modules-load.service", "kmod-static-nodes.service",
    "systemd-pstore.service", "e2scrub_reap.service", "e2scrub_all.timer", "fstrim.timer",
    "apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer", "systemd-hwdb-update.service",
    "systemd-udevd.service", "systemd-udev-trigger.service", "getty@tty1.service", "console-getty.service",
)
# Bump when the way the root is built changes: a new cache entry is built.
ROOT_RECIPE = 2
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def skip_reason() -> str | None:
    """Why this machine cannot run the boot test, or None."""
    if os.geteuid() != 0:
        return "the boot test needs root"
    for tool in ("mmdebstrap", "systemd-nspawn", "nsenter", "bpftool", "dpkg-buildpackage"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install mmdebstrap systemd-container bpftool dpkg-dev)"
    try:
        cgroup2_mount()
    except Exception as e:
        return f"no cgroup2 mount: {e}"
    if not _base_root_path().is_dir():
        try:
            socket.create_connection((MIRROR_HOST, 80), timeout=10).close()
        except OSError as e:
            return f"no cached Debian root in {CACHE_DIR} and {MIRROR_HOST} is unreachable ({e})"
    return None


def run(argv: list[str], *, check: bool = True, timeout: float = 600, **kw: object) -> subprocess.CompletedProcess[str]:
    p: subprocess.CompletedProcess[str] = subprocess.run(argv, text=True, capture_output=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _base_key() -> str:
    recipe = json.dumps([ROOT_RECIPE, SUITE, BASE_PACKAGES, MASKED_UNITS])
    return hashlib.sha256(recipe.encode()).hexdigest()[:12]


def _base_root_path() -> Path:
    return CACHE_DIR / f"{SUITE}-{_base_key()}"


def archives_dir() -> Path:
    d = CACHE_DIR / "archives"
    d.mkdir(parents=True, exist_ok=True)
    return d


def base_root() -> Path:
    """The cached minimal root, built on first use (about a minute, with the network)."""
    path = _base_root_path()
    with _cache_lock():
        if path.is_dir():
            return path
        tmp = CACHE_DIR / f".build-{path.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        arch = archives_dir()
        masks = " ".join(f'ln -sf /dev/null "$1/etc/systemd/system/{u}";' for u in MASKED_UNITS)
        argv = [
            "mmdebstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
            # Keep the package lists: installing the .deb later resolves its Depends from them.
            "--skip=cleanup/apt/lists", "--skip=download/empty",
            '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
            f"--setup-hook=sync-in {arch} /var/cache/apt/archives/",
            f"--customize-hook=sync-out /var/cache/apt/archives {arch}",
            f"--customize-hook={masks}",
            '--customize-hook=echo ksbpf-boot > "$1/etc/hostname"',
            '--customize-hook=rm -f "$1"/etc/systemd/system/*.wants/e2scrub_reap.service',
            SUITE, str(tmp),
        ]
        started = time.monotonic()
        try:
            run(argv, timeout=1800)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (tmp / "etc/ksbpf-boot-test-root").write_text(
            f"built by tests/kernel/debian_root.py in {time.monotonic() - started:.0f} s\n")
        tmp.rename(path)
        return path


def _sources() -> list[Path]:
    """Every file `make deb` packs: tracked and untracked-but-not-ignored, dist/ aside."""
    out = run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
              check=False)
    if out.returncode != 0:
        return [p for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts
                and "dist" not in p.parts and "__pycache__" not in p.parts]
    return [REPO / name for name in out.stdout.split("\0") if name and not name.startswith("dist/")]


def package_deb() -> Path:
    """dist/ksbpf_<version>_all.deb: reused when newer than every source file, else built
    with `make deb` from this checkout. KSBPF_BOOT_DEB=FILE tests that package instead."""
    given = os.environ.get("KSBPF_BOOT_DEB")
    if given:
        return Path(given).resolve()
    debs = sorted((REPO / "dist").glob("ksbpf_*_all.deb"))
    if len(debs) == 1:
        built = debs[0].stat().st_mtime
        newest = max((p.stat().st_mtime for p in _sources() if p.exists()), default=0.0)
        if built > newest:
            return debs[0]
    run(["make", "-C", str(REPO), "deb"], timeout=900)
    debs = sorted((REPO / "dist").glob("ksbpf_*_all.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"make deb left {[d.name for d in debs]} in dist/, expected exactly one ksbpf_*_all.deb")
    return debs[0]


class BootCgroup:
    """A cgroup this test made below the cgroup2 mount (and the same path in the legacy
    name=systemd hierarchy of a hybrid host, which nspawn reads as its own): the container's
    whole cgroup tree lies below it, so nothing ksbpf attaches there can reach the host."""

    def __init__(self, name: str) -> None:
        self.mount = cgroup2_mount()
        self.path = self.mount / name
        self.path.mkdir()
        legacy = Path("/sys/fs/cgroup/systemd")
        self.legacy = legacy / name if (legacy / "cgroup.procs").exists() and legacy != self.mount else None
        if self.legacy is not None:
            self.legacy.mkdir()

    def join(self) -> None:
        """For preexec_fn: move the calling (child) process here."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))
        if self.legacy is not None:
            (self.legacy / "cgroup.procs").write_text(str(os.getpid()))

    def contains(self, host_rel: str) -> bool:
        """Is this cgroup2 path (relative to the mount, as /proc/PID/cgroup shows it) below ours?"""
        mine = "/" + str(self.path.relative_to(self.mount))
        return host_rel == mine or host_rel.startswith(mine + "/")

    def cleanup(self) -> None:
        for top in (self.path, self.legacy):
            if top is None or not top.exists():
                continue
            remove_cgroup_tree(top)


class OverlayRoot:
    """A writable overlay over a cached root: the cache is never written."""

    def __init__(self, lower: Path) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="ksbpf-boot-", dir="/var/tmp"))
        for d in ("upper", "work", "root"):
            (self.dir / d).mkdir()
        self.path = self.dir / "root"
        try:
            run(["mount", "-t", "overlay", "overlay", "-o",
                 f"lowerdir={lower},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}", str(self.path)])
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def cleanup(self) -> None:
        for _ in range(50):
            if run(["umount", str(self.path)], check=False).returncode == 0 or not os.path.ismount(self.path):
                break
            time.sleep(0.1)
        if not os.path.ismount(self.path):
            shutil.rmtree(self.dir, ignore_errors=True)


def nspawn_env() -> dict[str, str]:
    env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8",
           # A cgroup2 tree of its own for the container on a hybrid host, and writable
           # /proc/sys and /sys (bpffs at /sys/fs/bpf, net sysctls).
           "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1", "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "yes"}
    return env


def nspawn_run(root: Path, cgroup: BootCgroup, argv: list[str], *, binds: tuple[str, ...] = (),
               network: bool, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run a command in the root without booting it (as a chroot would). network=False
    gives it a network namespace of its own with nothing in it: offline."""
    # A machine name of its own: nspawn keeps /run/systemd/nspawn/propagate/<name>, which two
    # runs named after their directory ("root") would share and fight over.
    cmd = ["systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(root),
           f"--machine=ksbpf-run-{os.urandom(4).hex()}", "--resolv-conf=replace-host"
           if network else "--resolv-conf=off", "--timezone=off", "--link-journal=no"]
    if not network:
        cmd.append("--private-network")
    cmd += [f"--bind={b}" for b in binds]
    cmd += ["--setenv=DEBIAN_FRONTEND=noninteractive", f"--setenv=PATH={SYSTEM_PATH}", "--", *argv]
    return subprocess.run(cmd, text=True, capture_output=True, timeout=timeout, env=nspawn_env(),
                          preexec_fn=cgroup.join)


@dataclass
class Wire:
    """The container's network namespace (made fresh for every boot, as a reboot starts
    with an empty kernel state) wired by a veth to the ISP namespace, which counts."""

    tag: str
    isp: str = field(init=False)
    ct: str = field(init=False)

    ISP4 = "100.64.0.1"
    ISP6 = "fd00:64::1"
    CT4 = "100.64.0.2"
    CT6 = "fd00:64::2"

    def __post_init__(self) -> None:
        self.isp = f"ksbisp{self.tag}"
        self.ct = f"ksbct{self.tag}"
        run(["ip", "netns", "add", self.isp])
        try:
            self._in(self.isp, "ip", "link", "set", "lo", "up")
            self._in(self.isp, "nft", "-f", str(BOOT_ASSETS / "isp.nft"))
            # Forwarding stays off in the ISP namespace: it answers, it routes nothing.
            self.fresh_container_netns()
        except BaseException:
            self.cleanup()
            raise

    def _in(self, ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["ip", "netns", "exec", ns, *argv], check=check)

    def fresh_container_netns(self) -> None:
        if Path(f"/run/netns/{self.ct}").exists():
            run(["ip", "netns", "del", self.ct], check=False)
        run(["ip", "netns", "add", self.ct])
        # No duplicate address detection: the link-local address and its routes are there
        # at once, so the snapshot taken before a boot is the one purge must return to.
        self._in(self.ct, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        run(["ip", "link", "add", "eth0", "netns", self.ct, "type", "veth", "peer", "name", "isp0", "netns", self.isp])
        self._in(self.isp, "ip", "addr", "add", f"{self.ISP4}/24", "dev", "isp0")
        self._in(self.isp, "ip", "addr", "add", f"{self.ISP6}/64", "dev", "isp0", "nodad")
        self._in(self.isp, "ip", "link", "set", "isp0", "up")
        self._in(self.ct, "ip", "link", "set", "lo", "up")
        self._in(self.ct, "ip", "addr", "add", f"{self.CT4}/24", "dev", "eth0")
        self._in(self.ct, "ip", "addr", "add", f"{self.CT6}/64", "dev", "eth0", "nodad")
        self._in(self.ct, "ip", "link", "set", "eth0", "up")
        self._in(self.ct, "ip", "route", "add", "default", "via", self.ISP4)
        self._in(self.ct, "ip", "-6", "route", "add", "default", "via", self.ISP6)
        deadline = time.monotonic() + 10
        while "fe80::" not in self._in(self.ct, "ip", "-6", "route", "show", "table", "local").stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no IPv6 link-local address on eth0 in {self.ct}")
            time.sleep(0.1)

    def tunnel_up(self) -> None:
        """A stand-in for the VPN tunnel: `wg0` in the container (the policy's tunnel
        interface), a veth whose other end, ktun0, arrives at the ISP apart from isp0. ksbpf
        routes everything through it (default dev wg0); the ISP answers ARP for its own address
        there (arp_ignore=0), and fd00:64::1 by a proxy neighbour entry."""
        run(["ip", "link", "add", "wg0", "netns", self.ct, "type", "veth", "peer", "name", "ktun0", "netns", self.isp])
        self._in(self.isp, "ip", "link", "set", "ktun0", "up")
        self._in(self.isp, "sysctl", "-qw", "net.ipv6.conf.ktun0.proxy_ndp=1")
        self._in(self.isp, "ip", "-6", "neigh", "add", "proxy", self.ISP6, "dev", "ktun0")
        self._in(self.ct, "ip", "addr", "add", "10.64.0.2/32", "dev", "wg0")
        self._in(self.ct, "ip", "addr", "add", "fd00:6464::2/128", "dev", "wg0", "nodad")
        self._in(self.ct, "ip", "link", "set", "wg0", "up")

    def tunnel_down(self) -> None:
        self._in(self.ct, "ip", "link", "del", "wg0", check=False)

    def kernel_snapshot(self) -> dict[str, str]:
        """What ksbpf could leave in the container's network namespace: rules, routes,
        tables (read from the host: the same namespace the container sees)."""
        return {
            "ip rule": self._in(self.ct, "ip", "rule", "list").stdout,
            "ip -6 rule": self._in(self.ct, "ip", "-6", "rule", "list").stdout,
            "ip route table all": self._in(self.ct, "ip", "route", "show", "table", "all").stdout,
            "ip -6 route table all": self._in(self.ct, "ip", "-6", "route", "show", "table", "all").stdout,
            "nft tables": self._in(self.ct, "nft", "list", "tables").stdout,
        }

    def counters(self) -> dict[str, int]:
        out = json.loads(self._in(self.isp, "nft", "-j", "list", "counters", "table", "inet", "isp").stdout)
        return {o["counter"]["name"]: int(o["counter"]["packets"]) for o in out["nftables"] if "counter" in o}

    def leaked(self) -> list[str]:
        """What the leak counter saw: source, destination, protocol, port (port: the ICMP
        checksum for ICMP)."""
        seen: list[str] = []
        for family in ("4", "6"):
            out = json.loads(self._in(self.isp, "nft", "-j", "list", "set", "inet", "isp", f"leaked{family}").stdout)
            for o in out["nftables"]:
                for elem in o.get("set", {}).get("elem", []):
                    value = elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem
                    seen.append(" ".join(str(v) for v in value["concat"]))
        return seen

    def leak_report(self) -> str:
        c = self.counters()
        return f"ISP counters {c}; leaked flows (src dst proto port): {self.leaked()[:20]}"

    def connect_admin(self, port: int = 22, timeout: float = 3.0) -> str:
        """Connect from the ISP namespace to the container's admin port; the banner or the error."""
        code = ("import socket,sys\n"
                "try:\n"
                f"    s=socket.create_connection(('{self.CT4}',{port}),timeout={timeout})\n"
                "    print(s.recv(100).decode().strip())\n"
                "except OSError as e:\n"
                "    print('error:',e)\n")
        return self._in(self.isp, "python3", "-c", code, check=False).stdout.strip()

    def cleanup(self) -> None:
        for ns in (self.ct, self.isp):
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns], check=False)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


class Container:
    """systemd-nspawn booting `root` in `wire.ct`, in `cgroup`; `sh`/`run` inside via nsenter."""

    def __init__(self, root: Path, wire: Wire, cgroup: BootCgroup, name: str, log: Path) -> None:
        self.root, self.wire, self.cgroup, self.name, self.log = root, wire, cgroup, name, log
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    def boot(self, timeout: float = 120) -> None:
        cmd = ["systemd-nspawn", "--register=no", "--keep-unit", "-D", str(self.root), "-b", "-M", self.name,
               # bpf(2) for the BPF layer; pidfd_getfd(2) for `ksctl mark-sockets` (ExecStartPost=):
               # nspawn's own seccomp filter refuses both with EPERM (boot-findings F4).
               "--console=passive", "--capability=all", "--system-call-filter=bpf pidfd_getfd",
               f"--network-namespace-path=/run/netns/{self.wire.ct}", "--resolv-conf=off", "--timezone=off",
               "--link-journal=no"]
        with open(self.log, "ab") as out:
            out.write(f"\n==== boot at {time.strftime('%H:%M:%S')}\n".encode())
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=nspawn_env(), preexec_fn=self.cgroup.join)
        deadline = time.monotonic() + timeout
        own_pidns = os.readlink("/proc/self/ns/pid")
        while not self.pid1:
            if self.proc.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the container's PID 1 did not appear")
            for kid in _children(self.proc.pid):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{kid}/ns/pid") != own_pidns:
                        self.pid1 = kid
            time.sleep(0.05)
        cg = self.host_cgroup_of(self.pid1)
        if not self.cgroup.contains(cg):
            self.kill()
            raise RuntimeError(f"the container's PID 1 runs in cgroup {cg}, outside the test's {self.cgroup.path}: "
                               "stopped before anything could attach there")

    @staticmethod
    def host_cgroup_of(pid: int) -> str:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
        raise RuntimeError(f"process {pid} has no cgroup2 path")

    def host_root_cgroup(self) -> Path:
        """The container's root cgroup (its cgroup namespace's root) on the host's mount."""
        rel = self.host_cgroup_of(self.pid1).removesuffix("/init.scope")
        return self.cgroup.mount / rel.lstrip("/")

    def run(self, *argv: str, timeout: float = 60, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["nsenter", "-t", str(self.pid1), "-a", "--", *argv], text=True, capture_output=True,
                              timeout=timeout, input=input, env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"})

    def sh(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-c", script, timeout=timeout)

    def wait_running(self, timeout: float = 180) -> str:
        """`systemctl is-system-running --wait`: running, or degraded (then the failed units
        are in failed_units())."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.run("systemctl", "is-system-running", "--wait", timeout=timeout)
            state = r.stdout.strip()
            if state in ("running", "degraded", "maintenance", "stopping"):
                return state
            time.sleep(0.2)  # "offline" or nothing: the manager is not there yet
        raise RuntimeError("the container's systemd did not finish booting")

    def failed_units(self) -> str:
        return self.run("systemctl", "--failed", "--no-legend", "--plain").stdout.strip()

    def journal(self, *units: str, lines: int = 200) -> str:
        args = [a for u in units for a in ("-u", u)]
        return self.run("journalctl", "--no-pager", "-o", "short-monotonic", "-n", str(lines), *args).stdout

    def show(self, unit: str, prop: str) -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        """SIGTERM, then SIGKILL, to nspawn by pid; and its children left behind by pid."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        if self.wait_exit(20) is None:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.run("systemctl", "poweroff", "--no-block", timeout=10)
        if self.wait_exit(40) is None:
            self.kill()


def ksbpf_programs(cgroup_dir: Path) -> list[str]:
    """Every program named ks_* attached to any cgroup at or below `cgroup_dir`, found by
    asking the kernel (BPF_PROG_QUERY through bpftool), not by any pin."""
    out = run(["bpftool", "-j", "cgroup", "tree", str(cgroup_dir)])
    found: list[str] = []
    for entry in json.loads(out.stdout or "[]"):
        for prog in entry.get("programs", []):
            if str(prog.get("name", "")).startswith("ks_"):
                found.append(f"{prog['name']} (id {prog['id']}, {prog.get('attach_type')}) on {entry['cgroup']}")
    return found
