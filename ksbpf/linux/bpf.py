"""The cgroup-bpf layer: BCC compiles `bpf/killswitch.c`, this module loads, fills,
attaches, replaces and reads it.

Two programs per generation, attached with BPF_F_ALLOW_MULTI to the policy's [bpf] cgroup:
`ks_egress` (cgroup_skb/egress) drops what would leave outside the tunnel and counts it,
`ks_sock_create` (cgroup/sock_create) gives sockets of exempt cgroups their exempt mark
and those of endpoint cgroups the endpoint mark (ksbpf.marks), so routing and nftables
can tell them apart.

Design, in short (the why of each is next to the code that does it):

- Compiling happens in a short-lived child process (`python -m ksbpf.linux.bpf`): BCC and
  LLVM cost ~100 MiB of RSS that a long-running daemon should not carry. The child only
  compiles, loads and pins; filling maps and attaching happen here, through bpf(2) via
  ctypes, so this module never imports bcc.
- Pins, per instance, under /sys/fs/bpf/ksbpf/<instance>/:
      drops        per-CPU hash (reason, cgroup id) -> (packets, bytes), shared by all
                   generations so counters survive reloads and restarts
      sk_netns     socket -> netns cookie (only on kernels without the cgroup_skb helper)
      g<N>/        one generation: egress, sock_create and its own policy maps
  A new policy is a new generation: its maps are filled before it is attached, so a
  program never sees a half-written policy.
- Replacement: BPF_PROG_ATTACH with BPF_F_REPLACE swaps the old generation's program for
  the new one in place (atomic: never zero, never two). When that is impossible (the
  attach cgroup changed) the new one is attached first and the old one detached after
  (make-before-break; both run meanwhile and any drop wins, so nothing leaks).
- Legacy attachments (not bpf_links) on purpose: they stay until detached, so a loader
  that exits or crashes, or someone deleting the pins, leaves enforcement in place.
- Network namespaces: a program on a cgroup sees that cgroup's sockets in every netns,
  and ifindexes are per netns. The program judges only packets of its target netns
  (netns cookie, from bpf_get_netns_cookie(skb) where cgroup_skb has it, else recorded
  per socket at creation) and passes the others, which are another instance's business.
  In the per-socket mode a socket created before the first attach has no record and is
  judged as the target netns's (fail closed).

Limits worth knowing: marks are given at socket creation, so an exempt service's sockets
opened before the first engage carry no exempt mark (nftables and routing match the mark;
this layer matches the cgroup); counters count skbs (a GSO skb once); an exemption on a
cgroup deeper than MAX_CGROUP_DEPTH is not seen (fail closed).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import importlib.resources
import ipaddress
import json
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ksbpf.errors import BpfError, KsbpfError
from ksbpf.linux import headers
from ksbpf.linux.cgroup import cgroup2_mount, cgroup_dir, cgroup_id, ids_by_path
from ksbpf.linux.netns import netns
from ksbpf.marks import DEFAULT_ENDPOINT_MARK, exempt_mark, exemption_ids
from ksbpf.policy import IPNetwork, Policy, PortSpec
from ksbpf.verdict import DROP_REASONS, Reason, interface_matches

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "ksbpf"
SOURCE = "killswitch.c"

PROGS = {"egress": "ks_egress", "sock_create": "ks_sock_create"}
GEN_MAPS = ("ks_config", "ks_tunnels", "ks_endpoints", "ks_dns", "ks_cgroups", "ks_ports", "ks_nets")
DROPS_PIN = "drops"
SK_NETNS_PIN = "sk_netns"

MAX_CGROUP_DEPTH = 31
MAX_DROP_KEYS = 4096

# Map layouts of bpf/killswitch.h.
CONFIG_FMT = "<QQQII64s"
CGROUP_FMT = "<IIII"
DROP_KEY_FMT = "<IIQ"
DROP_VAL_FMT = "<QQ"
F_IPV6_BLOCK, F_ENDPOINT_MARK, F_ENDPOINT_CGROUPS = 0x1, 0x2, 0x4
KIND_ALLOW, KIND_LISTEN = 0, 1
SCOPE_LAN = 0
PORT_PREFIX_BASE = NET_PREFIX_BASE = 40
IPPROTO = {"tcp": 6, "udp": 17}

REASON_NUMBERS: dict[Reason, int] = {r: i for i, r in enumerate(DROP_REASONS)}

_INSTANCE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def instance_name(netns_name: str | None) -> str:
    """The instance a ksbpf engine uses for a netns: one per netns, so concurrent engines
    (the host's, a lab's, a test's) keep apart pins and programs."""
    return "host" if netns_name is None else f"netns-{netns_name}"


# =========================================================================== bpf(2)

_BPF_MAP_LOOKUP_ELEM = 1
_BPF_MAP_UPDATE_ELEM = 2
_BPF_MAP_DELETE_ELEM = 3
_BPF_MAP_GET_NEXT_KEY = 4
_BPF_PROG_LOAD = 5
_BPF_OBJ_PIN = 6
_BPF_OBJ_GET = 7
_BPF_PROG_ATTACH = 8
_BPF_PROG_DETACH = 9
_BPF_PROG_GET_FD_BY_ID = 13
_BPF_MAP_GET_FD_BY_ID = 14
_BPF_OBJ_GET_INFO_BY_FD = 15
_BPF_PROG_QUERY = 16

BPF_F_ALLOW_MULTI = 2
BPF_F_REPLACE = 4
BPF_ANY, BPF_NOEXIST = 0, 1

ATTACH_EGRESS = 1  # BPF_CGROUP_INET_EGRESS
ATTACH_SOCK_CREATE = 2  # BPF_CGROUP_INET_SOCK_CREATE
ATTACH_TYPES = {"egress": ATTACH_EGRESS, "sock_create": ATTACH_SOCK_CREATE}

MAP_PERCPU_HASH = 5
MAP_SK_STORAGE = 24
PROG_CGROUP_SKB = 8

_NR_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351, "riscv64": 280}
_SO_NETNS_COOKIE = 71
_BPF_FUNC_GET_NETNS_COOKIE = 122

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _sys_bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    nr = _NR_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) syscall number unknown for {os.uname().machine}")
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), attr, ctypes.c_uint(len(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(128)


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def obj_get(path: Path | str) -> int:
    name = ctypes.create_string_buffer(os.fsencode(str(path)))
    a = _attr()
    struct.pack_into("<Q", a, 0, _addr(name))
    return _sys_bpf(_BPF_OBJ_GET, a, f"open pinned {path}")


def obj_pin(fd: int, path: Path | str) -> None:
    name = ctypes.create_string_buffer(os.fsencode(str(path)))
    a = _attr()
    struct.pack_into("<QI", a, 0, _addr(name), fd)
    _sys_bpf(_BPF_OBJ_PIN, a, f"pin {path}")


def prog_attach(prog_fd: int, cgroup_fd: int, attach_type: int, replace_fd: int | None = None) -> None:
    a = _attr()
    flags = BPF_F_ALLOW_MULTI | (BPF_F_REPLACE if replace_fd is not None else 0)
    struct.pack_into("<IIIII", a, 0, cgroup_fd, prog_fd, attach_type, flags, replace_fd or 0)
    _sys_bpf(_BPF_PROG_ATTACH, a, "attach")


def prog_detach(prog_fd: int, cgroup_fd: int, attach_type: int) -> None:
    a = _attr()
    struct.pack_into("<III", a, 0, cgroup_fd, prog_fd, attach_type)
    _sys_bpf(_BPF_PROG_DETACH, a, "detach")


def prog_query(cgroup_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to a cgroup (not inherited ones)."""
    cap = 64
    while True:
        ids = (ctypes.c_uint32 * cap)()
        a = _attr()
        struct.pack_into("<IIIIQI", a, 0, cgroup_fd, attach_type, 0, 0, ctypes.addressof(ids), cap)
        try:
            _sys_bpf(_BPF_PROG_QUERY, a, "query cgroup programs")
        except OSError as e:
            if e.errno == errno.ENOSPC:
                cap *= 4
                continue
            raise
        count = struct.unpack_from("<I", a, 24)[0]
        return list(ids[:count])


def _fd_by_id(cmd: int, obj_id: int, what: str) -> int:
    a = _attr()
    struct.pack_into("<I", a, 0, obj_id)
    return _sys_bpf(cmd, a, what)


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def prog_info(fd: int) -> ProgInfo:
    map_ids = (ctypes.c_uint32 * 64)()
    info = ctypes.create_string_buffer(88)
    struct.pack_into("<IQ", info, 52, 64, ctypes.addressof(map_ids))
    a = _attr()
    struct.pack_into("<IIQ", a, 0, fd, len(info), ctypes.addressof(info))
    _sys_bpf(_BPF_OBJ_GET_INFO_BY_FD, a, "program info")
    ptype, pid = struct.unpack_from("<II", info, 0)
    nr = struct.unpack_from("<I", info, 52)[0]
    name = info.raw[64:80].split(b"\0", 1)[0].decode(errors="replace")
    return ProgInfo(pid, ptype, name, tuple(map_ids[: min(nr, 64)]))


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(40)
    a = _attr()
    struct.pack_into("<IIQ", a, 0, fd, len(info), ctypes.addressof(info))
    _sys_bpf(_BPF_OBJ_GET_INFO_BY_FD, a, "map info")
    mtype, mid, ks, vs, me, fl = struct.unpack_from("<IIIIII", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode(errors="replace")
    return MapInfo(mid, mtype, ks, vs, me, fl, name)


def _possible_cpus() -> int:
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class BpfMap:
    """A map opened by fd (pinned path or id), read and written with bpf(2)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.info = map_info(fd)
        self.percpu = self.info.type in (5, 6, 10)  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
        self.ncpus = _possible_cpus() if self.percpu else 1
        self.value_stride = (self.info.value_size + 7) // 8 * 8 if self.percpu else self.info.value_size

    @classmethod
    def pinned(cls, path: Path | str) -> BpfMap:
        return cls(obj_get(path))

    @classmethod
    def by_id(cls, map_id: int) -> BpfMap:
        return cls(_fd_by_id(_BPF_MAP_GET_FD_BY_ID, map_id, f"open map id {map_id}"))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> BpfMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _key(self, key: bytes) -> ctypes.Array[ctypes.c_char]:
        if len(key) != self.info.key_size:
            raise ValueError(f"map {self.info.name}: key of {len(key)} bytes, map wants {self.info.key_size}")
        return ctypes.create_string_buffer(key, len(key))

    def lookup(self, key: bytes) -> bytes | None:
        """The value; for per-CPU maps, every CPU's value back to back."""
        k = self._key(key)
        v = ctypes.create_string_buffer(self.value_stride * self.ncpus)
        a = _attr()
        struct.pack_into("<IIQQ", a, 0, self.fd, 0, ctypes.addressof(k), ctypes.addressof(v))
        try:
            _sys_bpf(_BPF_MAP_LOOKUP_ELEM, a, f"lookup in {self.info.name}")
        except OSError as e:
            if e.errno == errno.ENOENT:
                return None
            raise
        return v.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        k = self._key(key)
        if self.percpu and len(value) == self.info.value_size:
            value = value.ljust(self.value_stride, b"\0") * self.ncpus
        v = ctypes.create_string_buffer(value, len(value))
        a = _attr()
        struct.pack_into("<IIQQQ", a, 0, self.fd, 0, ctypes.addressof(k), ctypes.addressof(v), flags)
        _sys_bpf(_BPF_MAP_UPDATE_ELEM, a, f"update {self.info.name}")

    def delete(self, key: bytes) -> bool:
        k = self._key(key)
        a = _attr()
        struct.pack_into("<IIQ", a, 0, self.fd, 0, ctypes.addressof(k))
        try:
            _sys_bpf(_BPF_MAP_DELETE_ELEM, a, f"delete from {self.info.name}")
        except OSError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    def keys(self) -> list[bytes]:
        out: list[bytes] = []
        prev: ctypes.Array[ctypes.c_char] | None = None
        nxt = ctypes.create_string_buffer(self.info.key_size)
        while True:
            a = _attr()
            struct.pack_into("<IIQQ", a, 0, self.fd, 0, _addr(prev), ctypes.addressof(nxt))
            try:
                _sys_bpf(_BPF_MAP_GET_NEXT_KEY, a, f"iterate {self.info.name}")
            except OSError as e:
                if e.errno == errno.ENOENT:
                    return out
                raise
            out.append(nxt.raw)
            prev = ctypes.create_string_buffer(nxt.raw, self.info.key_size)

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:
                yield k, v

    def percpu_values(self, raw: bytes) -> list[bytes]:
        return [raw[i * self.value_stride : i * self.value_stride + self.info.value_size] for i in range(self.ncpus)]

    def sync(self, wanted: dict[bytes, bytes]) -> None:
        """Make the map hold exactly `wanted`: add and update first, delete after, so an
        entry that stays is never missing in between."""
        for k, v in wanted.items():
            self.update(k, v)
        for k in self.keys():
            if k not in wanted:
                self.delete(k)


def probe_netns_cookie_helper() -> bool:
    """Does this kernel let cgroup_skb programs call bpf_get_netns_cookie (6.15+)?
    Asks the verifier with a three-instruction program; needs no compiler."""
    insns = b"".join(
        struct.pack("<BBhi", code, regs, 0, imm)
        for code, regs, imm in (
            (0x85, 0x00, _BPF_FUNC_GET_NETNS_COOKIE),  # call bpf_get_netns_cookie(ctx)
            (0xB7, 0x00, 1),  # r0 = 1
            (0x95, 0x00, 0),  # exit
        )
    )
    prog = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    a = _attr()
    struct.pack_into("<IIQQ", a, 0, PROG_CGROUP_SKB, 3, ctypes.addressof(prog), ctypes.addressof(lic))
    struct.pack_into("<I", a, 68, ATTACH_EGRESS)
    try:
        fd = _sys_bpf(_BPF_PROG_LOAD, a, "probe")
    except OSError as e:
        if e.errno in (errno.EINVAL, errno.EACCES):
            return False
        raise
    os.close(fd)
    return True


def netns_cookie(name: str | None) -> int:
    """The cookie of a named netns (None: this thread's), as BPF's bpf_get_netns_cookie sees it."""
    with netns(name):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            raw = s.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8)
    return int(struct.unpack("<Q", raw)[0])


# =========================================================================== rendering


@dataclass(frozen=True)
class ExemptionRules:
    cgroup: str
    mark: int
    allow: tuple[PortSpec, ...]
    listen: tuple[PortSpec, ...]
    to: tuple[IPNetwork, ...]  # both families, as Exemption.to_networks gives them
    from_: tuple[IPNetwork, ...]


@dataclass(frozen=True)
class BpfPlan:
    """What a policy means to the BPF maps, before cgroup paths become ids. Pure."""

    flags: int
    endpoint_mark: int
    tunnel_patterns: tuple[str, ...]
    endpoints: tuple[bytes, ...]
    dns: tuple[bytes, ...]
    lan: tuple[bytes, ...]
    exemptions: tuple[ExemptionRules, ...]
    endpoint_cgroups: tuple[str, ...]
    # the mark sock_create gives endpoint cgroups' sockets (0: the VPN client sets its own)
    endpoint_cgroup_mark: int


def _addr16(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return addr.packed.ljust(16, b"\0")


def endpoint_key(family: int, proto: str, port: int, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return struct.pack("<BB", family, IPPROTO[proto]) + port.to_bytes(2, "big") + _addr16(addr)


def addr_key(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    return struct.pack("<B3x", addr.version) + _addr16(addr)


def net_key(scope: int, net: IPNetwork) -> bytes:
    return struct.pack("<IIB", NET_PREFIX_BASE + net.prefixlen, scope, net.version) + _addr16(
        net.network_address
    ) + b"\0" * 3


def port_key(scope: int, proto: str, port: int, prefix: int) -> bytes:
    return struct.pack("<IIB", PORT_PREFIX_BASE + prefix, scope, IPPROTO[proto]) + port.to_bytes(2, "big") + b"\0"


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """An inclusive port range as (port, prefix length) blocks for the LPM trie."""
    out: list[tuple[int, int]] = []
    while first <= last:
        size = first & -first if first else 1 << 16
        while size > last - first + 1:
            size >>= 1
        out.append((first, 17 - size.bit_length()))
        first += size
    return out


def scope(slot: int, kind: int) -> int:
    return (slot << 1) | kind


def render(policy: Policy) -> BpfPlan:
    t = policy.tunnel
    flags = 0
    if policy.ipv6.mode == "block":
        flags |= F_IPV6_BLOCK
    if t.endpoint_mark is not None:
        flags |= F_ENDPOINT_MARK
    if t.endpoint_cgroups:
        flags |= F_ENDPOINT_CGROUPS
    ids = exemption_ids([e.cgroup for e in policy.exemptions])
    exemptions = tuple(
        ExemptionRules(
            cgroup=e.cgroup,
            mark=exempt_mark(ids[e.cgroup]),
            allow=e.allow,
            listen=e.listen,
            to=e.to_networks(4) + e.to_networks(6),
            from_=e.from_networks(4) + e.from_networks(6),
        )
        for e in policy.exemptions
    )
    return BpfPlan(
        flags=flags,
        endpoint_mark=t.endpoint_mark or 0,
        tunnel_patterns=t.interfaces,
        endpoints=tuple(endpoint_key(ep.family, ep.proto, ep.port, ep.address) for ep in t.endpoints),
        dns=tuple(addr_key(a) for a in policy.dns.servers),
        lan=tuple(net_key(SCOPE_LAN, n) for n in policy.lan_networks(4) + policy.lan_networks(6)),
        exemptions=exemptions,
        endpoint_cgroups=t.endpoint_cgroups,
        endpoint_cgroup_mark=DEFAULT_ENDPOINT_MARK if t.endpoint_cgroups and t.endpoint_mark is None else 0,
    )


def rule_keys(rules: ExemptionRules, slot: int) -> tuple[list[bytes], list[bytes]]:
    """ks_ports and ks_nets keys of one exemption under `slot`."""
    ports: list[bytes] = []
    nets: list[bytes] = []
    for kind, specs, networks in ((KIND_ALLOW, rules.allow, rules.to), (KIND_LISTEN, rules.listen, rules.from_)):
        if not specs:
            continue
        sc = scope(slot, kind)
        for spec in specs:
            ports.extend(port_key(sc, spec.proto, p, n) for p, n in port_prefixes(spec.first, spec.last))
        nets.extend(net_key(sc, n) for n in networks)
    return ports, nets


def cflags(netns_mode: str, pin_dir: Path | None) -> list[str]:
    """Constants for the C source. Policy never goes here: it goes into maps."""
    flags = [f"-DKS_R_{r.value.upper()}={REASON_NUMBERS[r]}" for r in DROP_REASONS]
    flags += [f"-DKS_MAX_DEPTH={MAX_CGROUP_DEPTH}", f"-DKS_MAX_DROP_KEYS={MAX_DROP_KEYS}"]
    if netns_mode == "sk_storage":
        flags.append("-DKS_NETNS_SK_STORAGE")
    if pin_dir is not None:
        flags.append(f'-DKS_DROPS_PIN="{pin_dir / DROPS_PIN}"')
        if netns_mode == "sk_storage":
            flags.append(f'-DKS_SK_NETNS_PIN="{pin_dir / SK_NETNS_PIN}"')
    return flags


# =========================================================================== loader child


@dataclass(frozen=True)
class LoadStats:
    compile_s: float  # clang + LLVM in BCC
    load_s: float  # the verifier, both programs
    loader_s: float  # the whole child, python start and bcc import included
    peak_rss_kb: int  # the child's VmHWM
    netns_mode: str


def _source_dir() -> Path:
    # Editable and wheel installs both give a real directory; zipped installs are unsupported.
    return Path(str(importlib.resources.files("ksbpf.bpf")))


def _run_loader(source: headers.KernelSource, netns_mode: str, instance_dir: Path | None,
                gen_dir: Path | None) -> LoadStats:
    request = {
        "source_dir": str(_source_dir()),
        "cflags": cflags(netns_mode, instance_dir),
        "gen_dir": str(gen_dir) if gen_dir else None,
    }
    env = {k: v for k, v in os.environ.items() if k != headers.ENV_VAR}
    env.update(source.env)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ksbpf.linux.bpf"],
            input=json.dumps(request), capture_output=True, text=True, timeout=300, env=env,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BpfError(f"BPF loader process failed: {e}") from None
    wall = time.monotonic() - t0
    try:
        reply = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        reply = {}
    if proc.returncode != 0 or "error" in reply or not reply:
        raise BpfError(_loader_failure(reply.get("error", f"loader exited with {proc.returncode}"),
                                       proc.stderr, source))
    return LoadStats(reply["compile_s"], reply["load_s"], wall, reply["peak_rss_kb"], netns_mode)


def _loader_failure(error: str, stderr: str, source: headers.KernelSource) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if any("Unable to find kernel headers" in ln for ln in lines):
        return (f"BCC found no usable kernel headers at {source.describe()}: run `ksctl doctor --prepare-headers "
                f"{headers.DEFAULT_HEADERS_DIR}` or set [bpf] kernel_source")
    errors = [ln for ln in lines if "error:" in ln]
    detail = "; ".join(errors[:3]) if errors else " / ".join(lines[-6:])
    return f"{error} (headers: {source.describe()}){': ' + detail if detail else ''}"


def _loader_main() -> int:
    """The child: compile, load, pin into gen_dir; one JSON line on stdout."""
    request = json.loads(sys.stdin.read())
    try:
        from bcc import BPF
    except ImportError as e:
        print(json.dumps({"error": f"python3-bpfcc (bcc) is not importable: {e}"}))
        return 1
    src = Path(request["source_dir"])
    t0 = time.monotonic()
    try:
        b = BPF(text=(src / SOURCE).read_text(), cflags=[f"-I{src}", "-Wno-unused-function", *request["cflags"]])
    except Exception as e:  # BCC raises bare Exception; stderr has the compiler's words
        print(json.dumps({"error": f"compiling {SOURCE} failed: {e}"}))
        return 1
    t1 = time.monotonic()
    fns = {}
    try:
        fns["egress"] = b.load_func(PROGS["egress"], BPF.CGROUP_SKB, attach_type=ATTACH_EGRESS)
        fns["sock_create"] = b.load_func(PROGS["sock_create"], BPF.CGROUP_SOCK, attach_type=ATTACH_SOCK_CREATE)
    except Exception as e:  # BCC raises bare Exception; stderr has the verifier log
        print(json.dumps({"error": f"the kernel refused the program: {e}"}))
        return 1
    t2 = time.monotonic()
    from bcc import lib

    gen_dir = request["gen_dir"]
    if gen_dir:
        try:
            os.mkdir(gen_dir)
            for name in GEN_MAPS:
                obj_pin(lib.bpf_table_fd(b.module, name.encode()), Path(gen_dir) / name)
            for kind, fn in fns.items():
                obj_pin(fn.fd, Path(gen_dir) / kind)
        except OSError as e:
            print(json.dumps({"error": f"pinning under {gen_dir} failed: {e}"}))
            return 1
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"compile_s": t1 - t0, "load_s": t2 - t1, "peak_rss_kb": peak}))
    return 0


# =========================================================================== kernel state


def _ensure_bpffs() -> None:
    with open("/proc/mounts", encoding="utf-8") as f:
        if any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in f if len(line.split()) >= 3):
            return
    BPFFS.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"bpf", os.fsencode(str(BPFFS)), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise BpfError(f"cannot mount bpffs at {BPFFS}: {os.strerror(err)}")


def _bpffs_mounted() -> bool:
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            return any(line.split()[1:3] == [str(BPFFS), "bpf"] for line in f if len(line.split()) >= 3)
    except OSError:
        return False


@dataclass(frozen=True)
class Config:
    netns_cookie: int
    generation: int
    cgroup_id: int
    flags: int
    endpoint_mark: int
    instance: str

    def pack(self) -> bytes:
        return struct.pack(CONFIG_FMT, self.netns_cookie, self.generation, self.cgroup_id, self.flags,
                           self.endpoint_mark, self.instance.encode())

    @classmethod
    def unpack(cls, raw: bytes) -> Config:
        c, g, cg, fl, m, inst = struct.unpack_from(CONFIG_FMT, raw)
        return cls(c, g, cg, fl, m, inst.split(b"\0", 1)[0].decode(errors="replace"))


@dataclass
class Generation:
    number: int
    path: Path

    def map(self, name: str) -> BpfMap:
        return BpfMap.pinned(self.path / name)

    def config(self) -> Config | None:
        try:
            with self.map("ks_config") as m:
                raw = m.lookup(struct.pack("<I", 0))
        except OSError:
            return None
        return Config.unpack(raw) if raw else None

    def prog_fd(self, kind: str) -> int:
        return obj_get(self.path / kind)

    def prog_id(self, kind: str) -> int | None:
        try:
            fd = self.prog_fd(kind)
        except OSError:
            return None
        try:
            return prog_info(fd).id
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Attached:
    """One of our programs on a cgroup, found by asking the kernel (pins may be gone)."""

    kind: str
    prog_id: int
    generation: int
    cgroup: Path


def _prog_config(prog_id: int) -> Config | None:
    """The ks_config of an attached program, if it is one of ksbpf's."""
    try:
        fd = _fd_by_id(_BPF_PROG_GET_FD_BY_ID, prog_id, f"open program id {prog_id}")
    except OSError:
        return None
    try:
        info = prog_info(fd)
    finally:
        os.close(fd)
    if info.name not in PROGS.values():
        return None
    for mid in info.map_ids:
        try:
            with BpfMap.by_id(mid) as m:
                if m.info.name == "ks_config":
                    raw = m.lookup(struct.pack("<I", 0))
                    return Config.unpack(raw) if raw else None
        except OSError:
            continue
    return None


@dataclass(frozen=True)
class ApplyStats:
    generation: int
    load: LoadStats
    apply_s: float  # the whole apply(), loader included
    replacement: str  # "first", "atomic" or "make-before-break"
    rss_kb: int  # this process after apply (the daemon's steady state; bcc is never imported here)


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# =========================================================================== the layer


@dataclass
class BpfLayer:
    """The cgroup-bpf enforcement layer of one ksbpf instance.

    `instance` names the pins and lets the layer recognise its own programs; `netns` is
    the network namespace whose packets it judges (None: the caller's). Every method
    works from a process that did not load the programs (state lives in the kernel).
    """

    instance: str
    kernel_source: str | None = None
    netns: str | None = None
    # "auto" probes the kernel; "helper" / "sk_storage" force a netns mode (tests).
    netns_mode: str = "auto"
    last_apply: ApplyStats | None = field(default=None, init=False)
    _policy: Policy | None = field(default=None, init=False, repr=False)
    _cgroup_cache: dict[int, tuple[Path, ...]] = field(default_factory=dict, init=False, repr=False)

    name = "bpf"

    def __post_init__(self) -> None:
        if not _INSTANCE_RE.match(self.instance) or self.instance in (".", ".."):
            raise BpfError(f"invalid instance name {self.instance!r} (1-64 of A-Z a-z 0-9 _ . -)")
        if self.netns_mode not in ("auto", "helper", "sk_storage"):
            raise BpfError(f"unknown netns mode {self.netns_mode!r}")

    @property
    def dir(self) -> Path:
        return PIN_ROOT / self.instance

    # ------------------------------------------------------------------ support

    def is_supported(self) -> tuple[bool, str]:
        for name, ok, detail in environment_checks():
            if not ok:
                return False, f"{name}: {detail}"
        lookup = headers.resolve_kernel_source(self.kernel_source)
        if lookup.source is None:
            return False, lookup.explain()
        mode = self._netns_mode()
        return True, f"BCC with headers {lookup.source.describe()}; netns by {mode}"

    def _netns_mode(self) -> str:
        if self.netns_mode != "auto":
            return self.netns_mode
        try:
            return "helper" if probe_netns_cookie_helper() else "sk_storage"
        except OSError as e:
            raise BpfError(f"cannot load BPF programs: {e.strerror}") from None

    def _source(self, policy: Policy | None) -> headers.KernelSource:
        setting = self.kernel_source or (policy.bpf.kernel_source if policy else None)
        lookup = headers.resolve_kernel_source(setting)
        if lookup.source is None:
            raise BpfError(
                f"cannot compile: {lookup.explain()}. Install the running kernel's headers, run "
                f"`ksctl doctor --prepare-headers {headers.DEFAULT_HEADERS_DIR}`, or set [bpf] kernel_source"
            )
        return lookup.source

    # ------------------------------------------------------------------ apply

    def apply(self, policy: Policy) -> ApplyStats:
        """Compile, load, fill and attach a new generation for `policy`, replacing this
        instance's earlier one (atomically where the kernel can). On failure the earlier
        generation stays attached and BpfError says why."""
        t0 = time.monotonic()
        target = self._cgroup(policy.bpf.cgroup)
        source = self._source(policy)
        cookie = self._cookie()
        mode = self._netns_mode()
        plan = render(policy)
        _ensure_bpffs()
        with self._locked():
            self._check_instance_maps(mode)
            self._sweep_unattached()
            previous = self._attached(extra=[target])
            number = 1 + max([g.number for g in self._generations()] + [a.generation for a in previous] + [0])
            gen = Generation(number, self.dir / f"g{number}")
            load = _run_loader(source, mode, self.dir, gen.path)
            try:
                self._fill(gen, plan, Config(cookie, number, cgroup_id(target), plan.flags,
                                             plan.endpoint_mark, self.instance))
                how = self._attach(gen, target, previous)
            except BaseException:
                self._discard(gen, target)
                raise
            self._retire(keep=number, cgroups=[target])
        self._policy = policy
        self.last_apply = ApplyStats(number, load, time.monotonic() - t0, how, _rss_kb())
        return self.last_apply

    def _cgroup(self, path: str) -> Path:
        try:
            d = cgroup_dir(path)
        except KsbpfError as e:
            raise BpfError(f"[bpf] cgroup: {e}") from None
        if not d.is_dir():
            raise BpfError(f"[bpf] cgroup {path!r}: {d} does not exist")
        return d

    def _cookie(self) -> int:
        try:
            return netns_cookie(self.netns)
        except OSError as e:
            raise BpfError(f"cannot read the netns cookie of {self.netns or 'this netns'}: {e.strerror}") from None
        except KsbpfError as e:
            raise BpfError(str(e)) from None

    @contextmanager
    def _locked(self, create: bool = True) -> Iterator[None]:
        """One writer per instance (daemon and ksctl may both act): flock on the pin dir."""
        try:
            if create:
                self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BpfError(f"instance {self.instance!r} has no loaded programs (apply a policy first)") from None
        except OSError as e:
            raise BpfError(f"cannot use {self.dir}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _check_instance_maps(self, mode: str) -> None:
        """A pinned map from an older, incompatible build would be reused blindly by BCC."""
        wanted = {DROPS_PIN: (MAP_PERCPU_HASH, struct.calcsize(DROP_KEY_FMT), struct.calcsize(DROP_VAL_FMT))}
        if mode == "sk_storage":
            wanted[SK_NETNS_PIN] = (MAP_SK_STORAGE, 4, 8)
        for name, (mtype, ks, vs) in wanted.items():
            path = self.dir / name
            if not path.exists():
                continue
            try:
                with BpfMap.pinned(path) as m:
                    ok = (m.info.type, m.info.key_size, m.info.value_size) == (mtype, ks, vs)
            except OSError:
                ok = False
            if not ok:
                path.unlink()

    def _generations(self) -> list[Generation]:
        gens = []
        try:
            entries = list(self.dir.iterdir())
        except OSError:
            return []
        for p in entries:
            if p.is_dir() and re.fullmatch(r"g\d+", p.name):
                gens.append(Generation(int(p.name[1:]), p))
        return sorted(gens, key=lambda g: g.number)

    def _cgroup_by_id(self, cg_id: int, hints: Iterable[Path] = ()) -> Path | None:
        """The cgroup directory with this id: the hints, the last answer and the cgroup2
        root (production attaches there) first; a walk of the whole tree last."""
        try:
            mount = cgroup2_mount()
        except KsbpfError:
            return None
        for h in [*hints, *self._cgroup_cache.get(cg_id, ()), mount]:
            try:
                if cgroup_id(h) == cg_id:
                    self._cgroup_cache[cg_id] = (h,)
                    return h
            except OSError:
                continue
        for rel, i in ids_by_path(mount).items():
            if i == cg_id:
                found = cgroup_dir(rel, mount)
                self._cgroup_cache[cg_id] = (found,)
                return found
        return None

    def _candidate_cgroups(self, extra: Iterable[Path] = ()) -> list[Path]:
        """Cgroups our programs may be attached to: the given ones, the last policy's,
        and those the pinned generations recorded."""
        out: list[Path] = []
        hints = list(extra)
        if self._policy is not None:
            try:
                hints.append(cgroup_dir(self._policy.bpf.cgroup))
            except KsbpfError:
                pass
        for h in hints:
            if h not in out and h.is_dir():
                out.append(h)
        for g in self._generations():
            cfg = g.config()
            if cfg is None:
                continue
            p = self._cgroup_by_id(cfg.cgroup_id, out)
            if p is not None and p not in out:
                out.append(p)
        return out

    def _attached(self, extra: Iterable[Path] = ()) -> list[Attached]:
        """Our programs attached to any candidate cgroup, recognised by their ks_config."""
        found: list[Attached] = []
        for cg in self._candidate_cgroups(extra):
            try:
                fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                for kind, atype in ATTACH_TYPES.items():
                    for pid in prog_query(fd, atype):
                        cfg = _prog_config(pid)
                        if cfg is not None and cfg.instance == self.instance:
                            found.append(Attached(kind, pid, cfg.generation, cg))
            except OSError as e:
                raise BpfError(f"cannot query programs on {cg}: {e.strerror}") from None
            finally:
                os.close(fd)
        return found

    def _sweep_unattached(self) -> None:
        """Generations pinned but attached nowhere (an apply that died half-way)."""
        attached = {(a.generation, a.kind) for a in self._attached()}
        for g in self._generations():
            if not any((g.number, k) in attached for k in PROGS):
                shutil.rmtree(g.path, ignore_errors=True)

    def _fill(self, gen: Generation, plan: BpfPlan, config: Config) -> None:
        try:
            with gen.map("ks_config") as m:
                m.update(struct.pack("<I", 0), config.pack())
            with gen.map("ks_endpoints") as m:
                m.sync(dict.fromkeys(plan.endpoints, b"\1"))
            with gen.map("ks_dns") as m:
                m.sync(dict.fromkeys(plan.dns, b"\1"))
            with gen.map("ks_nets") as m:
                for k in plan.lan:
                    m.update(k, b"\1")
            with BpfMap.pinned(self.dir / DROPS_PIN) as m:
                zero = struct.pack(DROP_VAL_FMT, 0, 0)
                for r in DROP_REASONS:
                    try:
                        m.update(struct.pack(DROP_KEY_FMT, REASON_NUMBERS[r], 0, 0), zero, BPF_NOEXIST)
                    except FileExistsError:
                        pass
            self._sync_tunnels(gen, self._tunnel_ifindexes(plan.tunnel_patterns))
            self._sync_cgroups(gen, plan)
        except OSError as e:
            raise BpfError(f"filling generation {gen.number}: {e}") from None

    def _attach(self, gen: Generation, target: Path, previous: list[Attached]) -> str:
        """Swap the new generation in for the previous one. Returns how: "first" (nothing
        to replace), "atomic" (BPF_F_REPLACE in place) or "make-before-break"."""
        how = "atomic" if previous else "first"
        cg_fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # Egress first: it is the enforcing half; sock_create only adds marks.
            for kind in ("egress", "sock_create"):
                new_fd = gen.prog_fd(kind)
                try:
                    old = next((a for a in previous if a.kind == kind and a.cgroup == target), None)
                    if old is not None and self._replace(new_fd, cg_fd, kind, old):
                        continue
                    if previous:
                        # Attach cgroup changed, old kernel, or old program gone: the old one
                        # stays until _retire, so both run meanwhile and nothing leaks.
                        how = "make-before-break"
                    prog_attach(new_fd, cg_fd, ATTACH_TYPES[kind])
                except OSError as e:
                    raise BpfError(f"attaching {kind} to {target}: {e.strerror}") from None
                finally:
                    os.close(new_fd)
        finally:
            os.close(cg_fd)
        return how

    @staticmethod
    def _replace(new_fd: int, cg_fd: int, kind: str, old: Attached) -> bool:
        try:
            old_fd = _fd_by_id(_BPF_PROG_GET_FD_BY_ID, old.prog_id, "open old program")
        except OSError:
            return False
        try:
            prog_attach(new_fd, cg_fd, ATTACH_TYPES[kind], replace_fd=old_fd)
            return True
        except OSError:
            return False
        finally:
            os.close(old_fd)

    def _detach(self, prog_id: int, kind: str, cgroup: Path) -> None:
        try:
            pfd = _fd_by_id(_BPF_PROG_GET_FD_BY_ID, prog_id, "open program")
        except OSError:
            return
        try:
            cfd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(pfd)
            return
        try:
            prog_detach(pfd, cfd, ATTACH_TYPES[kind])
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise BpfError(f"detaching {kind} #{prog_id} from {cgroup}: {e.strerror}") from None
        finally:
            os.close(pfd)
            os.close(cfd)

    def _discard(self, gen: Generation, target: Path) -> None:
        for kind in PROGS:
            pid = gen.prog_id(kind)
            if pid is not None:
                self._detach(pid, kind, target)
        shutil.rmtree(gen.path, ignore_errors=True)

    def _retire(self, keep: int, cgroups: list[Path]) -> None:
        """Detach and unpin every generation but `keep`."""
        for a in self._attached(extra=cgroups):
            if a.generation != keep:
                self._detach(a.prog_id, a.kind, a.cgroup)
        for g in self._generations():
            if g.number != keep:
                shutil.rmtree(g.path, ignore_errors=True)

    # ------------------------------------------------------------------ runtime updates

    def _live(self) -> list[Generation]:
        gens = self._generations()
        if not gens:
            raise BpfError(f"instance {self.instance!r} has no loaded programs (apply a policy first)")
        return gens

    def _tunnel_ifindexes(self, patterns: tuple[str, ...]) -> list[int]:
        try:
            with netns(self.netns):
                links = socket.if_nameindex()
        except (OSError, KsbpfError) as e:
            raise BpfError(f"cannot list links in {self.netns or 'this netns'}: {e}") from None
        return sorted(i for i, name in links if interface_matches(name, patterns))

    @staticmethod
    def _sync_tunnels(gen: Generation, ifindexes: Iterable[int]) -> None:
        with gen.map("ks_tunnels") as m:
            m.sync({struct.pack("<I", i): b"\1" for i in ifindexes})

    def update_tunnel_ifindexes(self, policy: Policy | None = None,
                                ifindexes: Iterable[int] | None = None) -> tuple[int, ...]:
        """Point the tunnel map at the current tunnel links (call on netlink link events):
        `ifindexes` as given, or the links in the netns matching the policy's tunnel
        interfaces (the last applied policy when None). Returns the ifindexes set."""
        if ifindexes is None:
            p = policy or self._policy
            if p is None:
                raise BpfError("update_tunnel_ifindexes needs a policy or explicit ifindexes")
            ifindexes = self._tunnel_ifindexes(p.tunnel.interfaces)
        wanted = tuple(sorted(set(ifindexes)))
        with self._locked(create=False):
            for g in self._live():
                try:
                    self._sync_tunnels(g, wanted)
                except OSError as e:
                    raise BpfError(f"updating tunnels of generation {g.number}: {e}") from None
        return wanted

    def update_exemptions(self, policy: Policy) -> dict[str, int | None]:
        """Re-resolve exempt and endpoint cgroups to ids (call when cgroups come and go,
        and after exemptions change at run time). A cgroup recreated under the same path
        gets a new id and keeps its exemption. Only exemptions and endpoint cgroups are
        taken from `policy`; any other change needs apply(). Returns path -> id (None: not
        there now)."""
        plan = render(policy)
        with self._locked(create=False):
            resolved: dict[str, int | None] = {}
            for g in self._live():
                try:
                    resolved = self._sync_cgroups(g, plan)
                except OSError as e:
                    raise BpfError(f"updating exemptions of generation {g.number}: {e}") from None
        if self._policy is not None:
            self._policy = self._policy.with_exemptions(policy.exemptions)
        return resolved

    def _sync_cgroups(self, gen: Generation, plan: BpfPlan) -> dict[str, int | None]:
        """Rules go under fresh slots, then each cgroup id flips to its new slot with one
        map update, then the old slots' rules go: a packet sees old or new, never a mix."""
        resolved: dict[str, int | None] = {}

        def resolve(path: str) -> int | None:
            if path not in resolved:
                try:
                    resolved[path] = cgroup_id(cgroup_dir(path))
                except (KsbpfError, OSError):
                    resolved[path] = None
            return resolved[path]

        with gen.map("ks_cgroups") as cgm, gen.map("ks_ports") as pm, gen.map("ks_nets") as nm:
            old = dict(cgm.items())
            used = {struct.unpack(CGROUP_FMT, v)[0] for v in old.values()}
            port_keys = pm.keys()
            net_keys = [k for k in nm.keys() if struct.unpack_from("<I", k, 4)[0] != SCOPE_LAN]
            used |= {struct.unpack_from("<I", k, 4)[0] >> 1 for k in port_keys + net_keys}
            slot = max(used, default=0) + 1

            entries: dict[int, list[int]] = {}  # cgroup id -> [slot, mark, endpoint]
            for rules in plan.exemptions:
                ports, nets = rule_keys(rules, slot)
                for k in ports:
                    pm.update(k, b"\1")
                for k in nets:
                    nm.update(k, b"\1")
                cid = resolve(rules.cgroup)
                if cid is not None:
                    entries[cid] = [slot, rules.mark, 0]
                slot += 1
            for path in plan.endpoint_cgroups:
                cid = resolve(path)
                if cid is None:
                    continue
                e = entries.setdefault(cid, [0, 0, 0])
                e[2] = 1
                # One cgroup both exempt and endpoint: the endpoint mark wins, the VPN needs it.
                if plan.endpoint_cgroup_mark:
                    e[1] = plan.endpoint_cgroup_mark
            wanted = {struct.pack("<Q", cid): struct.pack(CGROUP_FMT, *e, 0) for cid, e in entries.items()}
            cgm.sync(wanted)
            for k in port_keys:
                pm.delete(k)
            for k in net_keys:
                nm.delete(k)
        return resolved

    # ------------------------------------------------------------------ drift, status, reset

    def ensure_attached(self) -> list[str]:
        """Re-attach the pinned generation where someone detached it (no compile needed).
        Returns what was repaired, e.g. ["egress"]."""
        repaired: list[str] = []
        with self._locked(create=False):
            gens = self._generations()
            if not gens:
                raise BpfError(f"instance {self.instance!r} has nothing pinned to re-attach; apply instead")
            gen = gens[-1]
            cfg = gen.config()
            target = self._cgroup_by_id(cfg.cgroup_id, self._candidate_cgroups()) if cfg else None
            if target is None:
                raise BpfError(f"the cgroup generation {gen.number} was attached to is gone; apply instead")
            attached = {(a.kind, a.prog_id) for a in self._attached(extra=[target])}
            for kind in PROGS:
                pid = gen.prog_id(kind)
                if pid is None or (kind, pid) in attached:
                    continue
                pfd = gen.prog_fd(kind)
                cfd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    prog_attach(pfd, cfd, ATTACH_TYPES[kind])
                    repaired.append(kind)
                except OSError as e:
                    raise BpfError(f"re-attaching {kind}: {e.strerror}") from None
                finally:
                    os.close(pfd)
                    os.close(cfd)
        return repaired

    def status(self) -> tuple[bool, str]:
        """(engaged, detail): engaged means exactly one generation, both programs attached."""
        if not _bpffs_mounted():
            return False, f"bpffs is not mounted at {BPFFS}"
        gens = self._generations()
        try:
            attached = self._attached()
        except BpfError as e:
            return False, str(e)
        if not gens and not attached:
            return False, "not loaded"
        if not gens:
            return False, f"programs attached ({len(attached)}) but their pins under {self.dir} are gone"
        gen = gens[-1]
        cfg = gen.config()
        mine = [a for a in attached if a.generation == gen.number]
        others = sorted({a.generation for a in attached if a.generation != gen.number})
        kinds = {a.kind for a in mine}
        where = str(mine[0].cgroup) if mine else (f"cgroup id {cfg.cgroup_id}" if cfg else "?")
        detail = f"generation {gen.number} on {where}"
        if cfg:
            detail += f", netns cookie {cfg.netns_cookie}"
        try:
            with gen.map("ks_tunnels") as m:
                tunnels = sorted(struct.unpack("<I", k)[0] for k in m.keys())
            with gen.map("ks_cgroups") as m:
                ncg = len(m.keys())
            detail += f", tunnel ifindexes {tunnels or 'none (blocking all)'}, {ncg} exempt/endpoint cgroups"
        except OSError:
            pass
        missing = [k for k in PROGS if k not in kinds]
        if missing:
            return False, f"{detail}: {', '.join(missing)} not attached (detached behind our back?)"
        if others or len(gens) > 1:
            return False, f"{detail}: other generations still present {others or [g.number for g in gens[:-1]]}"
        return True, detail

    def counters(self) -> list[tuple[str, int, int, int]]:
        """(reason, cgroup id, packets, bytes) from the pinned drop counters, summed over
        CPUs; cgroup id 0 collects drops after the map filled up."""
        path = self.dir / DROPS_PIN
        if not path.exists():
            return []
        out: list[tuple[str, int, int, int]] = []
        try:
            with BpfMap.pinned(path) as m:
                for k, raw in m.items():
                    reason, _, cg = struct.unpack(DROP_KEY_FMT, k)
                    pk = by = 0
                    for v in m.percpu_values(raw):
                        p, b = struct.unpack(DROP_VAL_FMT, v)
                        pk += p
                        by += b
                    name = DROP_REASONS[reason].value if reason < len(DROP_REASONS) else f"reason_{reason}"
                    if pk or cg:
                        out.append((name, cg, pk, by))
        except OSError as e:
            raise BpfError(f"reading {path}: {e}") from None
        return sorted(out)

    def reset(self, cgroup: str | None = None) -> None:
        """Detach every program of this instance and unpin everything it made (counters
        included). `cgroup` names one more place to look for programs whose pins are gone."""
        extra = []
        if cgroup is not None:
            try:
                extra.append(cgroup_dir(cgroup))
            except KsbpfError:
                pass
        if not self.dir.exists() and not extra and self._policy is None:
            return
        with self._locked():
            for a in self._attached(extra=extra):
                self._detach(a.prog_id, a.kind, a.cgroup)
            shutil.rmtree(self.dir, ignore_errors=True)
        self._policy = None


# =========================================================================== doctor helpers


def environment_checks() -> list[tuple[str, bool, str]]:
    """What BPF needs besides headers, as (check, ok, detail), in dependency order."""
    import importlib.util

    checks: list[tuple[str, bool, str]] = []
    try:
        checks.append(("cgroup2", True, f"mounted at {cgroup2_mount()}"))
    except KsbpfError as e:
        checks.append(("cgroup2", False, str(e)))
    spec = importlib.util.find_spec("bcc")
    checks.append(("bcc", spec is not None,
                   f"python module at {spec.origin}" if spec else
                   "python3-bpfcc is not importable (apt install python3-bpfcc; venv needs --system-site-packages)"))
    checks.append(("bpffs", True, f"mounted at {BPFFS}" if _bpffs_mounted() else f"not mounted; apply mounts it at {BPFFS}"))
    if os.geteuid() == 0:
        try:
            helper = probe_netns_cookie_helper()
            checks.append(("netns keying", True, "bpf_get_netns_cookie in cgroup_skb" if helper else
                           "per-socket netns record (cgroup_skb lacks bpf_get_netns_cookie before 6.15)"))
        except OSError as e:
            checks.append(("bpf syscall", False, f"loading a probe program failed: {e.strerror}"))
    return checks


def trial_compile(source: headers.KernelSource, netns_mode: str = "auto") -> LoadStats:
    """Compile and verifier-load the programs without pinning or attaching anything."""
    mode = netns_mode if netns_mode != "auto" else ("helper" if probe_netns_cookie_helper() else "sk_storage")
    return _run_loader(source, mode, None, None)


if __name__ == "__main__":
    sys.exit(_loader_main())
