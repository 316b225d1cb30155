"""A lab of network namespaces joined by a real wireguard-go tunnel, for the kernel tests
and `ksctl lab up|down|demo`.

    routed ──(veth)── client ══uplink══ server ──(veth)── target
                        └── wireguard-go ⇄ wireguard-go ──┘

- client: the machine the kill switch protects. Main table: default via the uplink
  (the physical route); wg-quick-style rules send everything without the tunnel's fwmark
  to table 51820 (default dev WG), so coexistence with a VPN client is exercised.
- server: the ISP side and the VPN server. Its forward path never carries uplink traffic,
  so the target is reachable only through the tunnel. A netdev ingress chain on its
  uplink counts every packet the client lets out that is not the tunnel's own encrypted
  traffic, ARP or neighbour discovery: that is where a leak is seen, not inferred.
- target: echo services behind the server. DNS resolvers inside the tunnel (10.64.0.1)
  and outside it (192.0.2.53, and the server's own address).
- routed (optional): a host routed through the client, for the forward path.

Nothing here touches the host's network namespace or its root cgroup. State is kept in
/run/ksbpf/lab/<name>.json so that `ksctl lab up` and `ksctl lab down` can be separate
processes; every process is ended by its pid (checked against its start time).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ksbpf.errors import KsbpfError

STATE_DIR = Path("/run/ksbpf/lab")
WG_RUN_DIR = Path("/var/run/wireguard")
CGROUP_PREFIX = "ksbpf-lab-"
DEFAULT_LAB = "ksbpf"
AGENT = Path(__file__).with_name("lab_agent.py")

UPLINK = "uplink"
SERVER_V4, CLIENT_V4, OUTSIDE_DNS_V4 = "192.0.2.1", "192.0.2.2", "192.0.2.53"
SERVER_V6, CLIENT_V6, OUTSIDE_DNS_V6 = "2001:db8:1::1", "2001:db8:1::2", "2001:db8:1::53"
TUN_SERVER_V4, TUN_CLIENT_V4 = "10.64.0.1", "10.64.0.2"
TUN_SERVER_V6, TUN_CLIENT_V6 = "fd00:64::1", "fd00:64::2"
TUN_NET_V4, TUN_NET_V6 = "10.64.0.0/24", "fd00:64::/64"
TARGET_V4, TARGET_GW_V4 = "198.51.100.10", "198.51.100.1"
TARGET_V6, TARGET_GW_V6 = "2001:db8:2::10", "2001:db8:2::1"
ROUTED_V4, ROUTED_GW_V4, ROUTED_NET_V4 = "10.99.0.2", "10.99.0.1", "10.99.0.0/24"
ROUTED_V6, ROUTED_GW_V6, ROUTED_NET_V6 = "fd00:99::2", "fd00:99::1", "fd00:99::/64"

ENDPOINT_PORT = 51820
CLIENT_WG_PORT = 51821
ENDPOINT = f"{SERVER_V4}:{ENDPOINT_PORT}/udp"
WG_FWMARK = 0xCA6C
WG_TABLE = 51820
ECHO_PORT = 7
WHOAMI_PORT = 8
# TCP and UDP echo on the server's uplink addresses: "any other port on the VPN server".
SERVER_PORTS = (22, 80, 443, 8080)
# Who answered a DNS query shows in the answer.
DNS_TUNNEL_A, DNS_TUNNEL_AAAA = TARGET_V4, TARGET_V6
DNS_OUTSIDE_A, DNS_OUTSIDE_AAAA = "192.0.2.66", "2001:db8:1::66"

COUNTER_TABLE = "ksbpflab"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,19}$")


class LabError(KsbpfError):
    """The lab could not be built, driven or torn down."""


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str = ""

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return ("ok" if self.ok else "failed") + (f" ({self.detail})" if self.detail else "")


@dataclass(frozen=True)
class Counters:
    """What the far side of the uplink saw since the last reset."""

    tunnel: int
    leaks: int
    link: int
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class TrafficStats:
    """Per flow ("udp 198.51.100.10 7"): sent, received, errors, last_error."""

    flows: Mapping[str, Mapping[str, Any]]

    def _sum(self, key: str) -> int:
        return sum(int(f.get(key, 0)) for f in self.flows.values())

    @property
    def sent(self) -> int:
        return self._sum("sent")

    @property
    def received(self) -> int:
        return self._sum("received")

    @property
    def errors(self) -> int:
        return self._sum("errors")


@dataclass
class _Proc:
    role: str
    pid: int
    start: int

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "pid": self.pid, "start": self.start}


# --------------------------------------------------------------------------- helpers


def _run(
    argv: Sequence[str], *, input: str | None = None, check: bool = True, timeout: float = 15
) -> subprocess.CompletedProcess[str]:
    try:
        cp = subprocess.run(list(argv), input=input, text=True, capture_output=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LabError(f"{' '.join(argv)}: {e}") from None
    if check and cp.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {(cp.stderr or cp.stdout).strip()}")
    return cp


def _ip_batch(ns: str, lines: Sequence[str], *, family: str = "") -> None:
    argv = ["ip", *([family] if family else []), "-n", ns, "-batch", "-"]
    _run(argv, input="\n".join(lines) + "\n")


def _sysctl(ns: str, settings: Mapping[str, str | int]) -> None:
    _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items())])


def _in_netns(ns: str | None, argv: Sequence[str], cgroup: Path | None = None) -> list[str]:
    """argv run in `ns`, after joining `cgroup`: the cgroup is joined first because
    `ip netns exec` remounts /sys and hides the cgroup2 mount. A shell does the joining,
    not a preexec_fn, which is unsafe in threaded callers (the daemon, parallel probes)."""
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    if cgroup is None:
        return cmd
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(cgroup), *cmd]


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[19])


def _protected_pids() -> set[int]:
    """This process and its ancestors: never killed, whatever namespace they are in."""
    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                pid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError):
            break
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(key: str, v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return hex(v) if key.endswith("mark") else str(v)
    if isinstance(v, str | Path):
        return json.dumps(str(v))
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(key, x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(k, x)}" for k, x in v.items()) + " }"
    raise LabError(f"cannot write {type(v).__name__} for {key!r} as TOML")


def render_toml(data: Mapping[str, Any]) -> str:
    """A policy as TOML: tables and arrays of tables one level deep, which is all
    DESIGN.md's policy file has. None values are left out."""
    head: list[str] = []
    body: list[str] = []

    def table(header: str, items: Mapping[str, Any]) -> None:
        body.extend(["", header] + [f"{k} = {_toml_value(k, v)}" for k, v in items.items() if v is not None])

    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            table(f"[{key}]", value)
        elif isinstance(value, list) and value and all(isinstance(x, Mapping) for x in value):
            for item in value:
                table(f"[[{key}]]", item)
        else:
            head.append(f"{key} = {_toml_value(key, value)}")
    lines = head + body
    return "\n".join(lines).lstrip("\n") + "\n"


def merge_policy(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Table-wise merge: a dict override updates that table key by key, anything else
    (a list of [[exempt]] tables, None to drop the table) replaces it."""
    out: dict[str, Any] = {k: dict(v) if isinstance(v, Mapping) else v for k, v in base.items()}
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k].update(v)
        elif v is None:
            out.pop(k, None)
        else:
            out[k] = v
    return out


def counter_ruleset(uplink: str = UPLINK, *, client_port: int = CLIENT_WG_PORT) -> str:
    """The far-side leak counter: a netdev ingress chain on the server's uplink.
    Loaded as one transaction that also replaces any previous copy (a reset)."""
    key4 = "ip saddr . ip daddr . meta l4proto"
    key6 = "ip6 saddr . ip6 daddr . meta l4proto"
    dyn = "flags dynamic; size 4096; counter;"
    # WireGuard messages start with a type byte 1-4 and three zero bytes, so plaintext
    # sent from the tunnel's own port still counts as a leak.
    wg_types = "{ 0x01000000, 0x02000000, 0x03000000, 0x04000000 }"
    l4 = "{ tcp, udp, sctp, dccp, udplite }"
    return f"""\
table netdev {COUNTER_TABLE} {{}}
delete table netdev {COUNTER_TABLE}
table netdev {COUNTER_TABLE} {{
  counter tunnel {{}}
  counter leaks {{}}
  counter link {{}}
  set leak4 {{ typeof {key4} . th dport; {dyn} }}
  set leak4o {{ typeof {key4}; {dyn} }}
  set leak4i {{ typeof ip saddr . ip daddr . icmp type . icmp code; {dyn} }}
  set leak6 {{ typeof {key6} . th dport; {dyn} }}
  set leak6o {{ typeof {key6}; {dyn} }}
  set leak6i {{ typeof ip6 saddr . ip6 daddr . icmpv6 type . icmpv6 code; {dyn} }}
  set leakx {{ typeof ether type; {dyn} }}
  chain ingress {{
    type filter hook ingress device "{uplink}" priority -500; policy accept;
    ether type arp counter name link accept
    icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect, mld-listener-query, mld-listener-report, mld-listener-done, mld2-listener-report }} counter name link accept
    ip daddr {SERVER_V4} udp sport {client_port} udp dport {ENDPOINT_PORT} @th,64,32 {wg_types} counter name tunnel accept
    counter name leaks
    meta protocol ip meta l4proto {l4} update @leak4 {{ {key4} . th dport }} accept
    meta protocol ip meta l4proto icmp update @leak4i {{ ip saddr . ip daddr . icmp type . icmp code }} accept
    meta protocol ip update @leak4o {{ {key4} }} accept
    meta protocol ip6 meta l4proto {l4} update @leak6 {{ {key6} . th dport }} accept
    meta protocol ip6 meta l4proto ipv6-icmp update @leak6i {{ ip6 saddr . ip6 daddr . icmpv6 type . icmpv6 code }} accept
    meta protocol ip6 update @leak6o {{ {key6} }} accept
    update @leakx {{ ether type }}
  }}
}}
"""


def server_filter_ruleset() -> str:
    """The server never forwards to or from the uplink, and answers on its tunnel
    addresses only through the tunnel: the target and the tunnel's resolver are
    reachable only through the tunnel, so a reply from them proves the tunnel path."""
    return f"""\
table inet ksbpflab {{}}
delete table inet ksbpflab
table inet ksbpflab {{
  chain input {{
    type filter hook input priority 0; policy accept;
    iifname "{UPLINK}" ip daddr {TUN_NET_V4} drop
    iifname "{UPLINK}" ip6 daddr {TUN_NET_V6} drop
  }}
  chain forward {{
    type filter hook forward priority 0; policy accept;
    iifname "{UPLINK}" drop
    oifname "{UPLINK}" drop
  }}
}}
"""


def parse_counters(doc: Mapping[str, Any]) -> Counters:
    """`nft -j list table netdev ksbpflab` -> Counters, with one line per leaked flow."""
    counts: dict[str, int] = {}
    flows: list[tuple[int, str]] = []
    for obj in doc.get("nftables", []):
        if "counter" in obj:
            counts[obj["counter"]["name"]] = int(obj["counter"]["packets"])
        elif "set" in obj:
            for elem in obj["set"].get("elem", []):
                e: Any = elem.get("elem", elem) if isinstance(elem, Mapping) else {"val": elem}
                val, packets = e.get("val"), int(e.get("counter", {}).get("packets", 0))
                flows.append((packets, _describe_flow(obj["set"]["name"], val)))
    flows.sort(key=lambda f: (-f[0], f[1]))
    return Counters(
        tunnel=counts.get("tunnel", 0),
        leaks=counts.get("leaks", 0),
        link=counts.get("link", 0),
        details=tuple(f"{d} ×{n}" for n, d in flows),
    )


def _describe_flow(set_name: str, val: Any) -> str:
    parts = val["concat"] if isinstance(val, Mapping) and "concat" in val else [val]
    if set_name == "leakx":
        return f"ethertype {parts[0]}"
    if set_name in ("leak4i", "leak6i"):
        return f"{'icmp' if set_name == 'leak4i' else 'icmpv6'} {parts[0]} → {parts[1]} {parts[2]}/{parts[3]}"
    src, dst, proto = str(parts[0]), str(parts[1]), str(parts[2])
    if len(parts) > 3:
        host = f"[{dst}]" if ":" in dst else dst
        return f"{proto} {src} → {host}:{parts[3]}"
    return f"{proto} {src} → {dst}"


# --------------------------------------------------------------------------- the lab


class Lab:
    """Build with `Lab.create()` (or `lab_up()`), find again with `Lab.load(name)`,
    tear down with `close()` (idempotent; also the context manager's exit)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.name: str = state["name"]
        self.client: str = state["client"]
        self.server: str = state["server"]
        self.target: str = state["target"]
        self.routed: str | None = state.get("routed")
        self.wg: str = state["wg"]
        self.wg_server: str = state["wg_server"]
        self.state_dir = Path(state["state_dir"])
        self.cgroup_root: Path | None = Path(state["cgroup_root"]) if state.get("cgroup_root") else None
        self.metrics_port: int = state["metrics_port"]
        self.keys: dict[str, str] = state.get("keys", {})
        self._procs = [_Proc(**p) for p in state.get("procs", [])]
        self._namespaces: list[str] = list(state.get("namespaces", []))
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self.closed = False

    # ----------------------------------------------------------------- lifecycle

    @staticmethod
    def state_file(name: str) -> Path:
        return STATE_DIR / f"{name}.json"

    @classmethod
    def create(cls, name: str | None = None, *, routed: bool = False) -> Lab:
        name = name or f"kl{secrets.token_hex(3)}"
        if not _NAME_RE.match(name):
            raise LabError(f"lab name {name!r}: use 1-20 of a-z 0-9 -, starting with a letter or digit")
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, nftables, wireguard-go)")
        for tool in ("ip", "nft", "wg", "wireguard-go", "sysctl"):
            if shutil.which(tool) is None:
                raise LabError(f"{tool} is not installed (see `make setup`)")
        STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o700)
        if cls.state_file(name).exists():
            raise LabError(f"lab {name!r} exists already; `ksctl lab down {name}` removes it")
        existing = set(_run(["ip", "netns", "list"]).stdout.split())
        tok = secrets.token_hex(3)
        state: dict[str, Any] = {
            "name": name,
            "client": f"{name}-client",
            "server": f"{name}-server",
            "target": f"{name}-target",
            "routed": None,
            # wireguard-go's control sockets are shared by every namespace: names are unique.
            "wg": f"wgc{tok}",
            "wg_server": f"wgs{tok}",
            "state_dir": str(STATE_DIR / name),
            "cgroup_root": None,
            "metrics_port": _free_port(),
            "procs": [],
            "namespaces": [],
        }
        clash = {state["client"], state["server"], state["target"]} & existing
        if clash:
            raise LabError(f"network namespace {sorted(clash)[0]} exists already; pick another lab name")
        lab = cls(state)
        try:
            # Claims the name atomically: close() below must never tear down another's lab.
            lab.state_dir.mkdir(mode=0o700)
        except FileExistsError:
            raise LabError(f"lab {name!r} exists already; `ksctl lab down {name}` removes it") from None
        try:
            lab._save()
            lab._build()
            if routed:
                lab.add_routed_host()
            lab._save()
        except BaseException:
            lab.close()
            raise
        return lab

    @classmethod
    def load(cls, name: str) -> Lab:
        try:
            state = json.loads(cls.state_file(name).read_text())
        except FileNotFoundError:
            raise LabError(f"no lab named {name!r} (no {cls.state_file(name)})") from None
        except (OSError, ValueError) as e:
            raise LabError(f"{cls.state_file(name)}: {e}") from None
        return cls(state)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "client": self.client,
            "server": self.server,
            "target": self.target,
            "routed": self.routed,
            "wg": self.wg,
            "wg_server": self.wg_server,
            "state_dir": str(self.state_dir),
            "cgroup_root": str(self.cgroup_root) if self.cgroup_root else None,
            "metrics_port": self.metrics_port,
            "keys": self.keys,
            "procs": [p.as_dict() for p in self._procs],
            "namespaces": self._namespaces,
        }

    def _save(self) -> None:
        if self.closed:
            return
        path = self.state_file(self.name)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state(), indent=1))
        os.replace(tmp, path)

    def _add_netns(self, ns: str) -> None:
        _run(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        self._save()
        # Static addresses are usable at once (no DAD), and no router solicitations
        # or autoconfiguration add noise to the far-side counter.
        _sysctl(ns, {
            "net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
            "net.ipv6.conf.all.accept_ra": 0, "net.ipv6.conf.default.accept_ra": 0,
            "net.ipv6.conf.all.router_solicitations": 0, "net.ipv6.conf.default.router_solicitations": 0,
        })
        _ip_batch(ns, ["link set lo up"])

    def _build(self) -> None:
        for ns in (self.client, self.server, self.target):
            self._add_netns(ns)
        # Loose reverse-path filtering on the client (Debian's default), none on the routers.
        _sysctl(self.client, {
            "net.ipv4.conf.all.rp_filter": 2, "net.ipv4.conf.default.rp_filter": 2,
            "net.ipv4.conf.all.src_valid_mark": 1,  # as wg-quick sets it
        })
        _sysctl(self.server, {
            "net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1,
            "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
        })
        # Distinct ifindexes on the two ends of each veth: a carrier change on a device
        # whose iflink equals its own ifindex is not "urgent" for linkwatch and reaches
        # IPv6 up to a second late (the peer stays unreachable until then).
        _ip_batch(self.client, [f"link add {UPLINK} index 10 type veth peer name {UPLINK} index 11 netns {self.server}"])
        _ip_batch(self.server, [f"link add target index 12 type veth peer name eth0 index 13 netns {self.target}"])
        _ip_batch(self.client, [
            f"addr add {CLIENT_V4}/24 dev {UPLINK}",
            f"addr add {CLIENT_V6}/64 dev {UPLINK} nodad",
            f"link set {UPLINK} up",
            f"route add default via {SERVER_V4} dev {UPLINK}",
            f"route add default via {SERVER_V6} dev {UPLINK}",
        ])
        _ip_batch(self.server, [
            f"addr add {SERVER_V4}/24 dev {UPLINK}",
            f"addr add {OUTSIDE_DNS_V4}/24 dev {UPLINK}",
            f"addr add {SERVER_V6}/64 dev {UPLINK} nodad",
            f"addr add {OUTSIDE_DNS_V6}/64 dev {UPLINK} nodad",
            f"link set {UPLINK} up",
            f"addr add {TARGET_GW_V4}/24 dev target",
            f"addr add {TARGET_GW_V6}/64 dev target nodad",
            "link set target up",
        ])
        _ip_batch(self.target, [
            f"addr add {TARGET_V4}/24 dev eth0",
            f"addr add {TARGET_V6}/64 dev eth0 nodad",
            "link set eth0 up",
            f"route add default via {TARGET_GW_V4}",
            f"route add default via {TARGET_GW_V6}",
        ])
        # wg-quick's routing, at wg-quick's priorities.
        for fam in ("-4", "-6"):
            _ip_batch(self.client, [
                f"rule add not fwmark {WG_FWMARK:#x} table {WG_TABLE} priority 32765",
                "rule add table main suppress_prefixlength 0 priority 32764",
            ], family=fam)
        _run(["ip", "netns", "exec", self.server, "nft", "-f", "-"], input=server_filter_ruleset())
        self.reset_counters()

        root = _cgroup2_mount() / f"{CGROUP_PREFIX}{self.name}"
        try:
            root.mkdir()
        except OSError as e:
            raise LabError(f"cannot make the lab's cgroup {root}: {e.strerror}") from None
        self.cgroup_root = root
        self._save()

        for who in ("client", "server"):
            priv = _run(["wg", "genkey"]).stdout.strip()
            pub = _run(["wg", "pubkey"], input=priv + "\n").stdout.strip()
            keyfile = self.state_dir / f"{who}.key"
            fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(priv + "\n")
            self.keys[who] = pub
        self._save()

        self._start_services()
        self._start_wg_server()
        self._start_wg_client()
        self._wait_services()
        self._warm_up()
        self.reset_counters()

    def _start_services(self) -> None:
        tgt = ["serve", "--ready", str(self.state_dir / "target.ready")]
        tgt += ["--tcp-echo", f"::,{ECHO_PORT}", "--udp-echo", f"::,{ECHO_PORT}", "--whoami", f"::,{WHOAMI_PORT}"]
        self._spawn("services-target", self.target, self._agent(*tgt))
        srv = ["serve", "--ready", str(self.state_dir / "server.ready")]
        for addr in (TUN_SERVER_V4, TUN_SERVER_V6):
            srv += ["--dns", f"{addr},53,{DNS_TUNNEL_A},{DNS_TUNNEL_AAAA}"]
        for addr in (OUTSIDE_DNS_V4, OUTSIDE_DNS_V6, SERVER_V4, SERVER_V6):
            srv += ["--dns", f"{addr},53,{DNS_OUTSIDE_A},{DNS_OUTSIDE_AAAA}"]
        for addr in (SERVER_V4, SERVER_V6):
            for port in SERVER_PORTS:
                srv += ["--tcp-echo", f"{addr},{port}", "--udp-echo", f"{addr},{port}"]
        self._spawn("services-server", self.server, self._agent(*srv))

    def _wait_services(self) -> None:
        for who in ("target", "server"):
            ready = self.state_dir / f"{who}.ready"
            self._wait(ready.exists, f"{who} services", role=f"services-{who}")

    def _agent(self, *args: str) -> list[str]:
        return [sys.executable or "python3", "-I", "-S", str(AGENT), *args]

    def _warm_up(self) -> None:
        """The first packet through the tunnel starts the handshake; wait for it here,
        not in the first test."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.udp_echo(TARGET_V4, timeout=0.5):
                return
        raise LabError(f"no traffic through the tunnel {self.wg} after 10 s; see {self.state_dir}/*.log")

    # ----------------------------------------------------------------- processes

    def _spawn(self, role: str, ns: str | None, argv: Sequence[str], *, cgroup: Path | None = None) -> _Proc:
        with open(self.state_dir / f"{role}.log", "ab") as log:
            # A session of its own: `ksctl lab up` exits and the lab's processes stay.
            p = subprocess.Popen(
                _in_netns(ns, argv, cgroup), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        st = _proc_stat(p.pid)
        proc = _Proc(role, p.pid, st[1] if st else 0)
        self._children[p.pid] = p
        self._procs = [q for q in self._procs if q.role != role] + [proc]
        self._save()
        return proc

    def processes(self) -> dict[str, int]:
        """role -> pid of every process the lab runs (wg-client, wg-server,
        services-target, services-server, traffic-PID)."""
        return {p.role: p.pid for p in self._procs}

    def _proc(self, role: str) -> _Proc | None:
        return next((p for p in self._procs if p.role == role), None)

    def _alive(self, proc: _Proc | None) -> bool:
        if proc is None:
            return False
        child = self._children.get(proc.pid)
        if child is not None and child.poll() is not None:
            return False
        st = _proc_stat(proc.pid)
        return st is not None and st[1] == proc.start and st[0] != "Z"

    def _stop(self, proc: _Proc, *, sig: int = signal.SIGTERM, grace: float = 2.0) -> None:
        """End one of the lab's processes by pid, only if the pid is still that process."""
        for s in (sig, signal.SIGKILL):
            if not self._alive(proc):
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, s)
            deadline = time.monotonic() + grace
            while self._alive(proc) and time.monotonic() < deadline:
                time.sleep(0.02)
        child = self._children.pop(proc.pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=1)
        self._procs = [q for q in self._procs if q is not proc]
        self._save()

    def _wait(self, cond: Any, what: str, *, role: str | None = None, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            if role is not None and not self._alive(self._proc(role)):
                raise LabError(f"{what}: process {role} died: {self._log_tail(role)}")
            time.sleep(0.02)
        raise LabError(f"{what}: not ready after {timeout:.0f} s: {self._log_tail(role) if role else ''}")

    def _log_tail(self, role: str) -> str:
        try:
            return " | ".join((self.state_dir / f"{role}.log").read_text(errors="replace").strip().splitlines()[-3:])
        except OSError:
            return "(no log)"

    # ----------------------------------------------------------------- wireguard

    def _start_wg(self, role: str, ns: str, ifname: str, cgroup: Path | None) -> None:
        sock = WG_RUN_DIR / f"{ifname}.sock"
        if sock.exists():
            raise LabError(f"{sock} exists: another wireguard-go owns the name {ifname}")
        self._spawn(role, ns, ["wireguard-go", "-f", ifname], cgroup=cgroup)
        self._wait(lambda: sock.exists() and self._ifindex(ns, ifname) is not None, f"wireguard-go {ifname}", role=role)

    def _start_wg_server(self) -> None:
        self._start_wg("wg-server", self.server, self.wg_server, None)
        allowed = ",".join([f"{TUN_CLIENT_V4}/32", f"{TUN_CLIENT_V6}/128", ROUTED_NET_V4, ROUTED_NET_V6])
        _run(["ip", "netns", "exec", self.server, "wg", "set", self.wg_server,
              "private-key", str(self.state_dir / "server.key"), "listen-port", str(ENDPOINT_PORT),
              "peer", self.keys["client"], "allowed-ips", allowed])
        _ip_batch(self.server, [
            f"addr add {TUN_SERVER_V4}/24 dev {self.wg_server}",
            f"addr add {TUN_SERVER_V6}/64 dev {self.wg_server} nodad",
            f"link set {self.wg_server} up",
            f"route add {ROUTED_NET_V4} dev {self.wg_server}",
            f"route add {ROUTED_NET_V6} dev {self.wg_server}",
        ])

    @property
    def wg_cgroup(self) -> Path:
        """The cgroup the client's wireguard-go runs in (below the lab's cgroup), for
        policies that name endpoint_cgroups."""
        return self.cgroup("wireguard")

    def _start_wg_client(self) -> None:
        self._start_wg("wg-client", self.client, self.wg, self.wg_cgroup)
        _run(["ip", "netns", "exec", self.client, "wg", "set", self.wg,
              "private-key", str(self.state_dir / "client.key"), "listen-port", str(CLIENT_WG_PORT),
              "fwmark", f"{WG_FWMARK:#x}",
              "peer", self.keys["server"], "endpoint", f"{SERVER_V4}:{ENDPOINT_PORT}", "allowed-ips", "0.0.0.0/0,::/0"])
        self._configure_wg_client()

    def _configure_wg_client(self) -> None:
        """Addresses, link up and table 51820's defaults: what wg-quick does after `wg set`.
        IPv6 addresses and every route through the device go when the link goes down."""
        _ip_batch(self.client, [
            f"addr replace {TUN_CLIENT_V4}/24 dev {self.wg}",
            f"addr replace {TUN_CLIENT_V6}/64 dev {self.wg} nodad",
            f"link set {self.wg} up",
            f"route replace default dev {self.wg} table {WG_TABLE}",
        ])
        _ip_batch(self.client, [f"route replace default dev {self.wg} table {WG_TABLE}"], family="-6")

    @staticmethod
    def _ifindex(ns: str, ifname: str) -> int | None:
        cp = _run(["ip", "-n", ns, "-j", "link", "show", "dev", ifname], check=False)
        if cp.returncode != 0:
            return None
        return int(json.loads(cp.stdout)[0]["ifindex"])

    def tunnel_ifindex(self) -> int | None:
        """The client's tunnel device's ifindex; None while it does not exist."""
        return self._ifindex(self.client, self.wg)

    def tunnel_down(self) -> None:
        """`ip link set WG down` on the client (the process and device stay)."""
        _ip_batch(self.client, [f"link set {self.wg} down"])

    def tunnel_up(self) -> int:
        """Bring the client's tunnel back: link up and its addresses and routes restored,
        or a new wireguard-go if the device is gone. Returns the ifindex."""
        if self._alive(self._proc("wg-client")) and self.tunnel_ifindex() is not None:
            self._configure_wg_client()
            return self._require_ifindex()
        return self.tunnel_recreate()

    def tunnel_delete(self, how: str = "link") -> None:
        """Remove the client's tunnel device. how="link": `ip link del` (wireguard-go then
        exits by itself); how="kill": SIGKILL wireguard-go, as a crash (its control socket
        is left behind, as a crash would; the lab removes it)."""
        proc = self._proc("wg-client")
        if how == "link":
            _run(["ip", "-n", self.client, "link", "del", self.wg], check=False)
            if proc is not None:
                self._wait_gone(proc, grace=2.0)
                self._stop(proc)
        elif how == "kill":
            if proc is not None:
                self._stop(proc, sig=signal.SIGKILL)
        else:
            raise LabError(f"tunnel_delete(how={how!r}): use 'link' or 'kill'")
        deadline = time.monotonic() + 2
        while self.tunnel_ifindex() is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        with contextlib.suppress(FileNotFoundError):
            (WG_RUN_DIR / f"{self.wg}.sock").unlink()

    def _wait_gone(self, proc: _Proc, grace: float) -> None:
        deadline = time.monotonic() + grace
        while self._alive(proc) and time.monotonic() < deadline:
            time.sleep(0.02)

    def tunnel_recreate(self) -> int:
        """A new wireguard-go with the same name and keys: a new device (new ifindex),
        configured and routed again, as a VPN client reconnecting does. Returns the ifindex."""
        if self._alive(self._proc("wg-client")) or self.tunnel_ifindex() is not None:
            self.tunnel_delete()
        self._start_wg_client()
        return self._require_ifindex()

    def _require_ifindex(self) -> int:
        idx = self.tunnel_ifindex()
        if idx is None:
            raise LabError(f"tunnel device {self.wg} is missing in {self.client}")
        return idx

    # ----------------------------------------------------------------- routes, hosts, cgroups

    def push_route(self, cidr: str) -> None:
        """A more-specific route via the uplink in the client's main table, as a DHCP
        server pushing option 121 does (TunnelVision)."""
        via = SERVER_V6 if ":" in cidr else SERVER_V4
        _ip_batch(self.client, [f"route replace {cidr} via {via} dev {UPLINK}"])

    def remove_route(self, cidr: str) -> None:
        _run(["ip", "-n", self.client, "route", "del", cidr], check=False)

    def add_routed_host(self) -> str:
        """A namespace routed through the client (a container or VM on it), the client
        forwarding for it; returns its name. Idempotent."""
        if self.routed:
            return self.routed
        ns = f"{self.name}-routed"
        self._add_netns(ns)
        self.routed = ns
        self._save()
        _sysctl(self.client, {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})
        _ip_batch(self.client, [
            f"link add routed index 14 type veth peer name eth0 index 15 netns {ns}",
            f"addr add {ROUTED_GW_V4}/24 dev routed",
            f"addr add {ROUTED_GW_V6}/64 dev routed nodad",
            "link set routed up",
        ])
        _ip_batch(ns, [
            f"addr add {ROUTED_V4}/24 dev eth0",
            f"addr add {ROUTED_V6}/64 dev eth0 nodad",
            "link set eth0 up",
            f"route add default via {ROUTED_GW_V4}",
            f"route add default via {ROUTED_GW_V6}",
        ])
        return ns

    def cgroup(self, rel: str = "") -> Path:
        """A cgroup below the lab's own (made if missing); removed by close()."""
        if self.cgroup_root is None:
            raise LabError("the lab has no cgroup")
        if any(part in ("", ".", "..") for part in rel.split("/")) and rel:
            raise LabError(f"cgroup {rel!r}: use a relative path without '.', '..' or empty parts")
        d = (self.cgroup_root / rel) if rel else self.cgroup_root
        d.mkdir(parents=True, exist_ok=True)
        return d

    def cgroup_rel(self, d: Path | None = None) -> str:
        """A lab cgroup as a policy names it: relative to the cgroup2 mount."""
        d = d or self.cgroup()
        return str(d.relative_to(_cgroup2_mount()))

    # ----------------------------------------------------------------- counters

    def reset_counters(self) -> None:
        """Start counting afresh (reloads the counter table in one transaction)."""
        _run(["ip", "netns", "exec", self.server, "nft", "-f", "-"], input=counter_ruleset())

    def counters(self) -> Counters:
        cp = _run(["ip", "netns", "exec", self.server, "nft", "-j", "list", "table", "netdev", COUNTER_TABLE])
        try:
            return parse_counters(json.loads(cp.stdout))
        except (ValueError, KeyError, TypeError) as e:
            raise LabError(f"cannot read the leak counter: {e}") from None

    def leaks(self) -> int:
        """Packets the server received on its uplink other than the tunnel's own encrypted
        traffic, ARP and neighbour discovery, since the last reset."""
        return self.counters().leaks

    def leak_details(self) -> list[str]:
        """One line per leaked flow: 'udp 192.0.2.2 → 198.51.100.10:7 ×3'."""
        return list(self.counters().details)

    def tunnel_packets(self) -> int:
        """Encrypted WireGuard packets from the client's tunnel port since the last reset."""
        return self.counters().tunnel

    # ----------------------------------------------------------------- probes

    def run(
        self, argv: Sequence[str], *, netns: str | None = None, cgroup: Path | str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Any command in the client namespace (or `netns`), optionally in a cgroup."""
        cmd = _in_netns(netns or self.client, argv, self._cgroup_path(cgroup))
        try:
            return subprocess.run(cmd, text=True, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"{' '.join(argv)}: timed out after {timeout} s") from e

    def _cgroup_path(self, cgroup: Path | str | None) -> Path | None:
        if cgroup is None or isinstance(cgroup, Path):
            return cgroup
        return _cgroup2_mount() / cgroup.strip("/")

    def probe(
        self,
        kind: str,
        *args: str | int,
        netns: str | None = None,
        cgroup: Path | str | None = None,
        timeout: float = 1.0,
        mark: int | None = None,
        device: str | None = None,
        bind: str | None = None,
        sport: int | None = None,
    ) -> ProbeResult:
        """One lab_agent probe (tcp, udp, dns, ping) from the client (or `netns`)."""
        opts = ["--timeout", str(timeout)]
        if mark:
            opts += ["--mark", hex(mark)]
        if device:
            opts += ["--device", device]
        if bind:
            opts += ["--bind", bind]
        if sport:
            opts += ["--sport", str(sport)]
        cp = self.run(self._agent(kind, *opts, *map(str, args)), netns=netns, cgroup=cgroup, timeout=timeout + 10)
        try:
            out = json.loads(cp.stdout.strip().splitlines()[-1])
            return ProbeResult(bool(out["ok"]), str(out["detail"]))
        except (ValueError, IndexError, KeyError):
            return ProbeResult(False, f"probe failed: {(cp.stderr or cp.stdout).strip()[-200:]}")

    def tcp_echo(self, addr: str = TARGET_V4, port: int = ECHO_PORT, **opts: Any) -> ProbeResult:
        """Connect, send a line, get it back. opts: netns, cgroup, timeout, mark, device, bind, sport."""
        return self.probe("tcp", addr, port, **opts)

    def udp_echo(self, addr: str = TARGET_V4, port: int = ECHO_PORT, **opts: Any) -> ProbeResult:
        return self.probe("udp", addr, port, **opts)

    def whoami(self, addr: str = TARGET_V4, *, proto: str = "tcp", **opts: Any) -> ProbeResult:
        """The source address the target saw (detail), over tcp or udp."""
        return self.probe(proto, addr, WHOAMI_PORT, **opts)

    def dns_query(
        self, server: str = TUN_SERVER_V4, name: str = "lab.example", *, qtype: str = "A", tcp: bool = False,
        **opts: Any,
    ) -> ProbeResult:
        """detail is the answer: DNS_TUNNEL_A/AAAA from the tunnel's resolver,
        DNS_OUTSIDE_A/AAAA from the ones outside it."""
        extra = ["--qtype", qtype, *(["--tcp"] if tcp else [])]
        return self.probe("dns", server, name, *extra, **opts)

    def ping(self, addr: str = TARGET_V4, **opts: Any) -> ProbeResult:
        return self.probe("ping", addr, **opts)

    def raw_frames(
        self, addr: str = TARGET_V4, port: int = ECHO_PORT, *, count: int = 1, device: str = UPLINK,
        src: str = CLIENT_V4, **opts: Any,
    ) -> ProbeResult:
        """Write `count` broadcast Ethernet frames carrying IPv4/UDP to `device` through an
        AF_PACKET socket, past routing and the IP stack's hooks. ok means written, not
        delivered: count what arrived with leaks()."""
        return self.probe("raw", src, addr, port, "--count", count, device=device, **opts)

    def tunnel_checks(self, **opts: Any) -> dict[str, ProbeResult]:
        """tcp, udp, ipv6 and dns through the tunnel, in parallel."""
        calls = {
            "tcp": lambda: self.tcp_echo(TARGET_V4, **opts),
            "udp": lambda: self.udp_echo(TARGET_V4, **opts),
            "ipv6": lambda: self.tcp_echo(TARGET_V6, **opts),
            "dns": lambda: self.dns_query(TUN_SERVER_V4, **opts),
        }
        with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
            futures = {k: pool.submit(fn) for k, fn in calls.items()}
            return {k: f.result() for k, f in futures.items()}

    def traffic(
        self,
        targets: Sequence[str] | None = None,
        *,
        netns: str | None = None,
        cgroup: Path | str | None = None,
        interval: float = 0.02,
        mark: int | None = None,
    ) -> Traffic:
        """Start sending every `interval` to each target ("KIND,ADDR,PORT"; KIND udp,
        tcp (new connections), stream (one connection) or dns) until `.stop()`."""
        targets = list(targets or DEFAULT_TRAFFIC)
        ready = self.state_dir / f"traffic-{secrets.token_hex(3)}.ready"
        argv = ["traffic", "--interval", str(interval), "--ready", str(ready)]
        argv += ["--mark", hex(mark)] if mark else []
        for target in targets:
            argv += ["--target", target]
        cmd = _in_netns(netns or self.client, self._agent(*argv), self._cgroup_path(cgroup))
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        st = _proc_stat(p.pid)
        proc = _Proc(f"traffic-{p.pid}", p.pid, st[1] if st else 0)
        self._procs.append(proc)
        self._save()
        t = Traffic(self, p, proc)
        try:
            self._wait(lambda: ready.exists() or p.poll() is not None, "traffic generator")
        except BaseException:
            t.stop()
            raise
        with contextlib.suppress(FileNotFoundError):
            ready.unlink()
        if p.poll() is not None:
            raise LabError(f"traffic generator exited: {p.stderr.read().strip() if p.stderr else ''}")
        return t

    # ----------------------------------------------------------------- policy

    def policy_data(self, *, bpf_cgroup: Path | str | None = None, **overrides: Any) -> dict[str, Any]:
        if bpf_cgroup is None:
            bpf_rel = self.cgroup_rel()
        elif isinstance(bpf_cgroup, Path):
            bpf_rel = self.cgroup_rel(bpf_cgroup)
        else:
            bpf_rel = bpf_cgroup
        base = {
            "tunnel": {"interfaces": [self.wg], "endpoints": [ENDPOINT], "endpoint_mark": WG_FWMARK},
            "dns": {"servers": [TUN_SERVER_V4]},
            "ipv6": {"mode": "tunnel"},
            "bpf": {"cgroup": bpf_rel},
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
        }
        return merge_policy(base, overrides)

    def policy_toml(self, *, bpf_cgroup: Path | str | None = None, **overrides: Any) -> str:
        """The client's policy: tunnel = this lab's wg device and endpoint with the endpoint
        mark, the tunnel's resolver, IPv6 via the tunnel, BPF on the lab's cgroup (or
        `bpf_cgroup`: a Path, or a path relative to the cgroup2 mount). Overrides are per
        table: policy_toml(ipv6={"mode": "block"}, exempt=[{...}], lan=None)."""
        return render_toml(self.policy_data(bpf_cgroup=bpf_cgroup, **overrides))

    def describe(self) -> str:
        return "\n".join([
            f"lab {self.name}: {self.client} ⇄ {UPLINK} ⇄ {self.server} ⇄ {self.target}"
            + (f", {self.routed} routed via the client" if self.routed else ""),
            f"  tunnel {self.wg} (client {TUN_CLIENT_V4}, {TUN_CLIENT_V6}) → endpoint {ENDPOINT}, fwmark {WG_FWMARK:#x}",
            f"  target {TARGET_V4} / {TARGET_V6}: tcp+udp echo on {ECHO_PORT}, whoami on {WHOAMI_PORT}",
            f"  resolvers: {TUN_SERVER_V4} in the tunnel, {OUTSIDE_DNS_V4} outside it",
            f"  shell: ip netns exec {self.client} bash",
            f"  policy: {self.state_dir / 'policy.toml'}",
        ])

    # ----------------------------------------------------------------- teardown

    def close(self) -> None:
        """Remove everything the lab made: processes (by pid), namespaces, wireguard-go
        sockets, cgroups, state. Idempotent. Raises LabError naming what it could not
        remove, and then keeps the state so that `lab_down(name)` can try again."""
        if self.closed:
            return
        problems: list[str] = []
        for proc in list(self._procs):
            try:
                self._stop(proc, grace=1.0)
            except OSError as e:
                problems.append(f"{proc.role} (pid {proc.pid}): {e}")
        protected = _protected_pids()
        for ns in reversed(list(self._namespaces)):
            # Whatever else runs in the lab's namespaces was started into them (a test's
            # listener, a probe): end it, then the namespace.
            out = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in (int(p) for p in out if p.isdigit()):
                if pid not in protected:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            cp = _run(["ip", "netns", "del", ns], check=False)
            if cp.returncode != 0 and Path("/run/netns", ns).exists():
                problems.append(f"netns {ns}: {cp.stderr.strip()}")
            else:
                self._namespaces.remove(ns)
        for ifname in (self.wg, self.wg_server):
            with contextlib.suppress(FileNotFoundError):
                (WG_RUN_DIR / f"{ifname}.sock").unlink()
        if self.cgroup_root is not None:
            left = _remove_cgroup_tree(self.cgroup_root, protected)
            problems += left
            if not left:
                self.cgroup_root = None
        if problems:
            self._save()
            raise LabError(f"lab {self.name}: could not remove " + "; ".join(problems))
        self.closed = True
        shutil.rmtree(self.state_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.state_file(self.name).unlink()


DEFAULT_TRAFFIC = (
    f"udp,{TARGET_V4},{ECHO_PORT}",
    f"udp,{TARGET_V6},{ECHO_PORT}",
    f"tcp,{TARGET_V4},{ECHO_PORT}",
    f"stream,{TARGET_V4},{ECHO_PORT}",
    f"dns,{TUN_SERVER_V4},53",
)


class Traffic:
    """A running traffic generator (see Lab.traffic); a context manager that stops it."""

    def __init__(self, lab: Lab, popen: subprocess.Popen[str], proc: _Proc) -> None:
        self.lab = lab
        self.popen = popen
        self.proc = proc
        self.stats: TrafficStats | None = None

    def stop(self) -> TrafficStats:
        if self.stats is not None:
            return self.stats
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            out, _ = self.popen.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            out, _ = self.popen.communicate()
        self.lab._procs = [q for q in self.lab._procs if q is not self.proc]
        self.lab._save()
        try:
            flows = json.loads(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            flows = {}
        self.stats = TrafficStats(flows)
        return self.stats

    def __enter__(self) -> Traffic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _cgroup2_mount() -> Path:
    from ksbpf.linux.cgroup import cgroup2_mount

    return cgroup2_mount()


def _remove_cgroup_tree(root: Path, protected: set[int]) -> list[str]:
    from ksbpf.linux.cgroup import remove_cgroup_tree

    return remove_cgroup_tree(root, protected)


# --------------------------------------------------------------------------- CLI entry points


def list_labs() -> list[str]:
    return sorted(p.stem for p in STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []


def lab_up(name: str | None = None, *, routed: bool = False) -> str:
    """`ksctl lab up`: build a lab that outlives this process, write its policy file, and
    return a description for a person (`Lab.load(name)` gives the object)."""
    lab = Lab.create(name or DEFAULT_LAB, routed=routed)
    (lab.state_dir / "policy.toml").write_text(lab.policy_toml())
    return lab.describe()


def lab_down(name: str | None = None) -> bool:
    """`ksctl lab down`: tear a lab down; False if there was none by that name."""
    name = name or DEFAULT_LAB
    if not Lab.state_file(name).exists():
        return False
    Lab.load(name).close()
    return True


# --------------------------------------------------------------------------- demo


def _marks(results: Mapping[str, ProbeResult]) -> str:
    return " ".join(f"{k} {'✓' if r else '✗'}" for k, r in results.items())


def demo(out: TextIO = sys.stdout, *, name: str | None = None) -> int:
    """Build a lab, engage the kill switch, break the tunnel while sending, and count on
    the far side of the uplink what left outside it. 0 PASS, 1 FAIL, 2 could not run."""

    def say(line: str) -> None:
        print(line, file=out, flush=True)

    try:
        from ksbpf.linux.engine import LinuxEngine
        from ksbpf.policy import loads_policy
    except ImportError as e:
        say(f"cannot run the demo: the Linux engine is not available ({e})")
        return 2

    failures: list[str] = []
    notes: list[str] = []
    lab: Lab | None = None
    eng: Any = None
    t0 = time.monotonic()
    try:
        lab = Lab.create(name)
        apps = lab.cgroup("apps")
        say(f"ksbpf lab demo: client ⇄ uplink ⇄ server ⇄ target, over WireGuard ({lab.wg}, wireguard-go)")
        say("  leaks are counted where they would be seen: on the server's side of the uplink")

        before = lab.tunnel_checks(cgroup=apps)
        lab.reset_counters()
        lab.tunnel_down()
        lab.udp_echo(TARGET_V4, cgroup=apps, timeout=0.3)
        control = lab.leaks()
        lab.tunnel_up()
        say(f"  without ksbpf  tunnel up: {_marks(before)}   tunnel down: {control} packet(s) leaked")
        if not all(before.values()):
            failures.append("the tunnel does not carry traffic: " + str(before))
        if control == 0:
            failures.append("the far-side counter saw nothing leak without the kill switch")

        policy = loads_policy(lab.policy_toml(), f"lab {lab.name} policy")
        eng = LinuxEngine(netns=lab.client)
        result = eng.up(policy)
        say("  ksbpf up       " + " ".join(f"{n} {'✓' if s.engaged else '✗'}" for n, s in result.layers.items()))
        for n, st in result.layers.items():
            if not st.engaged:
                # The bpf layer may be missing (no kernel headers); the other two must hold.
                (notes if n == "bpf" else failures).append(f"{n} layer not engaged: {st.detail}")

        during = lab.tunnel_checks(cgroup=apps)
        say(f"  with ksbpf     tunnel up: {_marks(during)}")
        failures += [f"{k} through the tunnel: {r.detail}" for k, r in during.items() if not r]

        lab.reset_counters()
        with lab.traffic(cgroup=apps) as traffic:
            time.sleep(0.5)
            lab.tunnel_down()
            time.sleep(0.6)
            lab.tunnel_delete(how="kill")
            time.sleep(0.6)
            stats = traffic.stop()
        c = lab.counters()
        say(f"                 tunnel down, then wireguard-go killed, {stats.sent} packets sent: {c.leaks} leaked")
        failures += [f"leaked: {d}" for d in c.details[:5]] or (["leaked"] if c.leaks else [])

        lab.tunnel_recreate()
        # A new device: ksbpfd re-engages on the link event; without the daemon, by hand.
        if not eng.up(policy).ok and not notes:
            failures.append("re-engaging for the new tunnel device failed")
        after = lab.tunnel_checks(cgroup=apps)
        say(f"                 tunnel back (new device): {_marks(after)}")
        failures += [f"{k} after the tunnel came back: {r.detail}" for k, r in after.items() if not r]
    except KsbpfError as e:
        failures.append(str(e))
    finally:
        if eng is not None:
            try:
                eng.down()
            except KsbpfError as e:
                failures.append(f"ksbpf down: {e}")
        if lab is not None:
            try:
                lab.close()
            except LabError as e:
                failures.append(str(e))

    if failures:
        say("FAIL: " + failures[0])
        for f in [*failures[1:4], *notes]:
            say(f"      {f}")
        return 1
    say(f"PASS: nothing left the client outside the tunnel ({time.monotonic() - t0:.1f} s)")
    for n in notes:
        say(f"      note: {n}")
    return 0
