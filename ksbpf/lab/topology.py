"""The lab's topology: namespaces, veths and addresses, the services in them, wireguard-go
on both ends of the tunnel, and what tests change at run time (the tunnel broken and
rebuilt, routes pushed, a routed host, cgroups below the lab's own)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

from ksbpf.lab.addresses import (
    CGROUP_PREFIX,
    CLIENT_V4,
    CLIENT_V6,
    CLIENT_WG_PORT,
    DNS_OUTSIDE_A,
    DNS_OUTSIDE_AAAA,
    DNS_TUNNEL_A,
    DNS_TUNNEL_AAAA,
    ECHO_PORT,
    ENDPOINT_PORT,
    OUTSIDE_DNS_V4,
    OUTSIDE_DNS_V6,
    ROUTED_GW_V4,
    ROUTED_GW_V6,
    ROUTED_NET_V4,
    ROUTED_NET_V6,
    ROUTED_V4,
    ROUTED_V6,
    SERVER_PORTS,
    SERVER_V4,
    SERVER_V6,
    TARGET_GW_V4,
    TARGET_GW_V6,
    TARGET_V4,
    TARGET_V6,
    TUN_CLIENT_V4,
    TUN_CLIENT_V6,
    TUN_SERVER_V4,
    TUN_SERVER_V6,
    UPLINK,
    WG_FWMARK,
    WG_RUN_DIR,
    WG_TABLE,
    WHOAMI_PORT,
)
from ksbpf.lab.processes import LabError, LabProcesses, Proc, ip_batch, nft_load, run_cmd, sysctl
from ksbpf.lab.rulesets import counter_ruleset, server_filter_ruleset
from ksbpf.linux.cgroup import cgroup2_mount


class LabTopology(LabProcesses):
    """Builds the namespaces and the tunnel, and changes them at run time."""

    def _add_netns(self, ns: str) -> None:
        run_cmd(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        self._save()
        # Static addresses are usable at once (no DAD), and no router solicitations
        # or autoconfiguration add noise to the far-side counter.
        sysctl(ns, {
            "net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
            "net.ipv6.conf.all.accept_ra": 0, "net.ipv6.conf.default.accept_ra": 0,
            "net.ipv6.conf.all.router_solicitations": 0, "net.ipv6.conf.default.router_solicitations": 0,
        })
        ip_batch(ns, ["link set lo up"])

    def _build_topology(self) -> None:
        """Namespaces, links, the server's rulesets, the lab's cgroup, keys, services and
        both wireguard-go ends, up to the services being ready (Lab._build warms up)."""
        for ns in (self.client, self.server, self.target):
            self._add_netns(ns)
        # Loose reverse-path filtering on the client (Debian's default), none on the routers.
        sysctl(self.client, {
            "net.ipv4.conf.all.rp_filter": 2, "net.ipv4.conf.default.rp_filter": 2,
            "net.ipv4.conf.all.src_valid_mark": 1,  # as wg-quick sets it
        })
        sysctl(self.server, {
            "net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1,
            "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0,
        })
        # Distinct ifindexes on the two ends of each veth: a carrier change on a device
        # whose iflink equals its own ifindex is not "urgent" for linkwatch and reaches
        # IPv6 up to a second late (the peer stays unreachable until then).
        ip_batch(self.client, [f"link add {UPLINK} index 10 type veth peer name {UPLINK} index 11 netns {self.server}"])
        ip_batch(self.server, [f"link add target index 12 type veth peer name eth0 index 13 netns {self.target}"])
        ip_batch(self.client, [
            f"addr add {CLIENT_V4}/24 dev {UPLINK}",
            f"addr add {CLIENT_V6}/64 dev {UPLINK} nodad",
            f"link set {UPLINK} up",
            f"route add default via {SERVER_V4} dev {UPLINK}",
            f"route add default via {SERVER_V6} dev {UPLINK}",
        ])
        ip_batch(self.server, [
            f"addr add {SERVER_V4}/24 dev {UPLINK}",
            f"addr add {OUTSIDE_DNS_V4}/24 dev {UPLINK}",
            f"addr add {SERVER_V6}/64 dev {UPLINK} nodad",
            f"addr add {OUTSIDE_DNS_V6}/64 dev {UPLINK} nodad",
            f"link set {UPLINK} up",
            f"addr add {TARGET_GW_V4}/24 dev target",
            f"addr add {TARGET_GW_V6}/64 dev target nodad",
            "link set target up",
        ])
        ip_batch(self.target, [
            f"addr add {TARGET_V4}/24 dev eth0",
            f"addr add {TARGET_V6}/64 dev eth0 nodad",
            "link set eth0 up",
            f"route add default via {TARGET_GW_V4}",
            f"route add default via {TARGET_GW_V6}",
        ])
        # wg-quick's routing, at wg-quick's priorities.
        for fam in ("-4", "-6"):
            ip_batch(self.client, [
                f"rule add not fwmark {WG_FWMARK:#x} table {WG_TABLE} priority 32765",
                "rule add table main suppress_prefixlength 0 priority 32764",
            ], family=fam)
        nft_load(self.server, server_filter_ruleset())
        nft_load(self.server, counter_ruleset())

        root = cgroup2_mount() / f"{CGROUP_PREFIX}{self.name}"
        try:
            root.mkdir()
        except OSError as e:
            raise LabError(f"cannot make the lab's cgroup {root}: {e.strerror}") from None
        self.cgroup_root = root
        self._save()

        for who in ("client", "server"):
            priv = run_cmd(["wg", "genkey"]).stdout.strip()
            pub = run_cmd(["wg", "pubkey"], input=priv + "\n").stdout.strip()
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
        run_cmd(["ip", "netns", "exec", self.server, "wg", "set", self.wg_server,
              "private-key", str(self.state_dir / "server.key"), "listen-port", str(ENDPOINT_PORT),
              "peer", self.keys["client"], "allowed-ips", allowed])
        ip_batch(self.server, [
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
        run_cmd(["ip", "netns", "exec", self.client, "wg", "set", self.wg,
              "private-key", str(self.state_dir / "client.key"), "listen-port", str(CLIENT_WG_PORT),
              "fwmark", f"{WG_FWMARK:#x}",
              "peer", self.keys["server"], "endpoint", f"{SERVER_V4}:{ENDPOINT_PORT}", "allowed-ips", "0.0.0.0/0,::/0"])
        self._configure_wg_client()

    def _configure_wg_client(self) -> None:
        """Addresses, link up and table 51820's defaults: what wg-quick does after `wg set`.
        IPv6 addresses and every route through the device go when the link goes down."""
        ip_batch(self.client, [
            f"addr replace {TUN_CLIENT_V4}/24 dev {self.wg}",
            f"addr replace {TUN_CLIENT_V6}/64 dev {self.wg} nodad",
            f"link set {self.wg} up",
            f"route replace default dev {self.wg} table {WG_TABLE}",
        ])
        ip_batch(self.client, [f"route replace default dev {self.wg} table {WG_TABLE}"], family="-6")

    @staticmethod
    def _ifindex(ns: str, ifname: str) -> int | None:
        cp = run_cmd(["ip", "-n", ns, "-j", "link", "show", "dev", ifname], check=False)
        if cp.returncode != 0:
            return None
        return int(json.loads(cp.stdout)[0]["ifindex"])

    def tunnel_ifindex(self) -> int | None:
        """The client's tunnel device's ifindex; None while it does not exist."""
        return self._ifindex(self.client, self.wg)

    def tunnel_down(self) -> None:
        """`ip link set WG down` on the client (the process and device stay)."""
        ip_batch(self.client, [f"link set {self.wg} down"])

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
            run_cmd(["ip", "-n", self.client, "link", "del", self.wg], check=False)
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

    def _wait_gone(self, proc: Proc, grace: float) -> None:
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
        ip_batch(self.client, [f"route replace {cidr} via {via} dev {UPLINK}"])

    def remove_route(self, cidr: str) -> None:
        run_cmd(["ip", "-n", self.client, "route", "del", cidr], check=False)

    def add_routed_host(self) -> str:
        """A namespace routed through the client (a container or VM on it), the client
        forwarding for it; returns its name. Idempotent."""
        if self.routed:
            return self.routed
        ns = f"{self.name}-routed"
        self._add_netns(ns)
        self.routed = ns
        self._save()
        sysctl(self.client, {"net.ipv4.ip_forward": 1, "net.ipv6.conf.all.forwarding": 1})
        ip_batch(self.client, [
            f"link add routed index 14 type veth peer name eth0 index 15 netns {ns}",
            f"addr add {ROUTED_GW_V4}/24 dev routed",
            f"addr add {ROUTED_GW_V6}/64 dev routed nodad",
            "link set routed up",
        ])
        ip_batch(ns, [
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
        return str(d.relative_to(cgroup2_mount()))
