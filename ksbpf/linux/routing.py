"""Policy-routing applier (pyroute2): makes the kernel's ip rules and ROUTE_TABLE match
the rendered plan. Only rules and routes stamped with RT_PROTO_KSBPF are ever touched,
so wg-quick's or anyone else's routing stays as it was."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ksbpf.errors import BackendError
from ksbpf.linux.layer import Layer, LayerName, LayerStatus
from ksbpf.linux.netns import netns
from ksbpf.marks import ROUTE_TABLE
from ksbpf.policy import Policy
from ksbpf.render.routing import PRIO_TUNNEL, RT_PROTO_KSBPF, RouteSpec, RoutingPlan, RuleSpec, render_routing
from ksbpf.verdict import interface_matches

AF = {4: socket.AF_INET, 6: socket.AF_INET6}


SRC_VALID_MARK = "/proc/sys/net/ipv4/conf/all/src_valid_mark"


def src_valid_mark() -> tuple[bool, str]:
    """(set, detail) for net.ipv4.conf.all.src_valid_mark of the calling thread's network
    namespace (/proc/sys/net follows it when a path is opened)."""
    try:
        with open(SRC_VALID_MARK, encoding="ascii") as f:
            value = f.read().strip()
    except OSError as e:
        return False, f"cannot read {SRC_VALID_MARK}: {e.strerror}"
    if value == "1":
        return True, "src_valid_mark 1"
    return False, f"{SRC_VALID_MARK} is {value}, not 1"


def _enable_src_valid_mark() -> None:
    """Reverse-path filtering must judge a reply by the mark nftables restores for it
    (see the prerouting chain), as wg-quick arranges too. Written only when not already
    1: a read-only /proc/sys/net whose value is right (docker --sysctl) is fine."""
    if src_valid_mark()[0]:
        return
    try:
        with open(SRC_VALID_MARK, "w", encoding="ascii") as f:
            f.write("1\n")
    except OSError as e:
        raise BackendError("routing", f"cannot set {SRC_VALID_MARK}: {e.strerror}{_sysctl_hint(e)}") from None


def _sysctl_hint(e: OSError) -> str:
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (" (a container needs a writable /proc/sys/net, or the value set to 1 by its manager, e.g. "
                "docker --sysctl net.ipv4.conf.all.src_valid_mark=1)")
    return ""


def _port(value: Any) -> int:
    if not value:
        return 0
    start, _, _end = str(value).partition(":")
    return int(start)


def _rule_from_kernel(msg: Any, fam: int) -> RuleSpec:
    return RuleSpec(
        family=fam,
        priority=msg.get_attr("FRA_PRIORITY") or 0,
        table=msg.get_attr("FRA_TABLE") or msg["table"],
        fwmark=msg.get_attr("FRA_FWMARK") or 0,
        fwmask=msg.get_attr("FRA_FWMASK") or 0 if msg.get_attr("FRA_FWMARK") else 0,
        dst=msg.get_attr("FRA_DST") or "",
        dst_len=msg["dst_len"] if msg.get_attr("FRA_DST") else 0,
        ip_proto=msg.get_attr("FRA_IP_PROTO") or 0,
        sport=_port(msg.get_attr("FRA_SPORT_RANGE")),
        dport=_port(msg.get_attr("FRA_DPORT_RANGE")),
    )


def _rule_args(r: RuleSpec) -> dict[str, Any]:
    args: dict[str, Any] = {"family": AF[r.family], "priority": r.priority, "table": r.table, "protocol": RT_PROTO_KSBPF}
    if r.fwmark:
        args.update(fwmark=r.fwmark, fwmask=r.fwmask)
    if r.dst:
        args.update(dst=r.dst, dst_len=r.dst_len)
    if r.ip_proto:
        args["ip_proto"] = r.ip_proto
    if r.sport:
        args["sport_range"] = f"{r.sport}:{r.sport}"
    if r.dport:
        args["dport_range"] = f"{r.dport}:{r.dport}"
    return args


def _route_args(r: RouteSpec) -> dict[str, Any]:
    args: dict[str, Any] = {
        "family": AF[r.family], "table": r.table, "dst": "0.0.0.0" if r.family == 4 else "::",
        "dst_len": 0, "priority": r.metric, "proto": RT_PROTO_KSBPF,
    }
    if r.blackhole:
        args["type"] = "blackhole"
    else:
        args["oif"] = r.oif
    return args


IFF_UP = 0x1


def tunnel_links(ipr: Any, policy: Policy) -> dict[int, str]:
    """Tunnel interfaces that are up: the kernel refuses a route via a down link, and a
    down tunnel must leave only the blackhole anyway."""
    return {
        link["index"]: link.get_attr("IFLA_IFNAME")
        for link in ipr.get_links()
        if link["flags"] & IFF_UP and interface_matches(link.get_attr("IFLA_IFNAME"), policy.tunnel.interfaces)
    }


class RoutingLayer:
    name = LayerName.ROUTING

    def __init__(self, netns_name: str | None = None) -> None:
        self.netns = netns_name

    def is_supported(self) -> tuple[bool, str]:
        try:
            import pyroute2  # noqa: F401
        except ImportError:
            return False, "python3-pyroute2 is not installed"
        return True, "pyroute2 available"

    def _ipr(self) -> Any:
        from pyroute2 import IPRoute

        return IPRoute()

    def plan(self, policy: Policy) -> RoutingPlan:
        with netns(self.netns), self._ipr() as ipr:
            return render_routing(policy, tunnel_links(ipr, policy))

    def _current(self, ipr: Any) -> tuple[set[RuleSpec], set[RouteSpec]]:
        rules: set[RuleSpec] = set()
        routes: set[RouteSpec] = set()
        for fam in (4, 6):
            for msg in ipr.get_rules(family=AF[fam]):
                if msg.get_attr("FRA_PROTOCOL") == RT_PROTO_KSBPF:
                    rules.add(_rule_from_kernel(msg, fam))
            for msg in ipr.get_routes(family=AF[fam], table=ROUTE_TABLE):
                if msg["proto"] != RT_PROTO_KSBPF or msg["dst_len"] != 0:
                    continue
                blackhole = msg["type"] == 6  # RTN_BLACKHOLE
                oif = 0 if blackhole else (msg.get_attr("RTA_OIF") or 0)
                routes.add(RouteSpec(fam, ROUTE_TABLE, msg.get_attr("RTA_PRIORITY") or 0, blackhole, oif))
        return rules, routes

    def apply(self, policy: Policy) -> None:
        with _netlink_errors(), netns(self.netns), self._ipr() as ipr:
            plan = render_routing(policy, tunnel_links(ipr, policy))
            self._sync(ipr, plan)
            _enable_src_valid_mark()

    def _sync(self, ipr: Any, plan: RoutingPlan) -> None:
        have_rules, have_routes = self._current(ipr)
        want_routes = {RouteSpec(r.family, r.table, r.metric, r.blackhole, r.oif) for r in plan.routes}
        try:
            # Make before break: the blackhole and new rules go in before stale ones go.
            for rt in sorted(want_routes - have_routes, key=lambda r: not r.blackhole):
                self._quiet(ipr.route, "replace", **_route_args(rt))
            for rule in sorted(set(plan.rules) - have_rules):
                self._quiet(ipr.rule, "add", **_rule_args(rule))
            for rule in have_rules - set(plan.rules):
                self._quiet(ipr.rule, "del", **_rule_args(rule))
            for rt in have_routes - want_routes:
                self._quiet(ipr.route, "del", **_route_args(rt))
        except OSError as e:
            raise BackendError("routing", f"netlink: {e}") from None

    @staticmethod
    def _quiet(fn: Any, *args: Any, **kwargs: Any) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            fn(*args, **kwargs)
        except NetlinkError as e:
            # ENETDOWN/ENODEV: the tunnel went away between listing and adding; the
            # blackhole behind it holds, and the next link event re-adds the route.
            if e.code in (errno.EEXIST, errno.ENOENT, errno.ESRCH, errno.ENETDOWN, errno.ENODEV):
                return
            raise BackendError("routing", f"{args[0]} failed: {e}") from None

    def sync_tunnel_routes(self, policy: Policy) -> None:
        """Follow a tunnel recreated with a new ifindex (called on link events)."""
        self.apply(policy)

    def reset(self) -> None:
        with _netlink_errors(), netns(self.netns), self._ipr() as ipr:
            rules, routes = self._current(ipr)
            for rule in rules:
                self._quiet(ipr.rule, "del", **_rule_args(rule))
            for rt in routes:
                self._quiet(ipr.route, "del", **_route_args(rt))

    def status(self) -> LayerStatus:
        """Engaged only when everything `apply` puts in place is there: the catch-all rules
        and blackholes of both families, and src_valid_mark."""
        try:
            with _netlink_errors(), netns(self.netns), self._ipr() as ipr:
                rules, routes = self._current(ipr)
                mark_ok, mark = src_valid_mark()
        except BackendError as e:
            return LayerStatus(False, e.reason)
        catch_all = {r.family for r in rules if r.priority == PRIO_TUNNEL and r.table == ROUTE_TABLE}
        holes = {r.family for r in routes if r.blackhole}
        if catch_all != {4, 6} or holes != {4, 6}:
            return LayerStatus(False, f"ksbpf ip rules or blackhole routes missing (rules for {sorted(catch_all)}, blackhole for {sorted(holes)})")
        tunnels = sorted({r.oif for r in routes if not r.blackhole})
        via = f"default via ifindex {', '.join(map(str, tunnels))}" if tunnels else "no tunnel present: blackhole only"
        if not mark_ok:
            return LayerStatus(False, f"{len(rules)} ip rules, table {ROUTE_TABLE} in place, but {mark}: replies "
                                      "to exempt traffic fail reverse-path filtering")
        return LayerStatus(True, f"{len(rules)} ip rules, table {ROUTE_TABLE}: {via}")


@contextmanager
def _netlink_errors() -> Iterator[None]:
    """The environment's refusals (no netlink socket, EPERM, a vanished netns) as the
    layer's BackendError, not a traceback."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        yield
    except NetlinkError as e:
        raise BackendError("routing", f"netlink: {e}") from None
    except OSError as e:
        raise BackendError("routing", f"{e.strerror or e}") from None


_conforms: type[Layer] = RoutingLayer  # mypy fails here when RoutingLayer drifts from the Layer Protocol
