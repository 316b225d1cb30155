"""ksctl: the command line of ksbpf.

Exit codes: 0 done; 1 a kernel layer failed; 2 bad input (nothing changed);
3 `up` engaged only some layers (named in the output).
"""

from __future__ import annotations

# Imported for every ksctl command: only what parsing the command line and talking to a
# running daemon needs. ksctl status/exempt/unexempt with ksbpfd running import neither
# the policy parser (ksbpfd validates the request completely) nor any kernel library;
# everything else is imported by the command that needs it.
import argparse
import json
import os
import sys

from ksbpf import __version__
from ksbpf.errors import BackendError, KsbpfError, PolicyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

    from ksbpf.policy import Exemption

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PARTIAL = 0, 1, 2, 3
DEFAULT_POLICY = "/etc/ksbpf/policy.toml"  # ksbpf.policy.DEFAULT_POLICY_PATH, without importing the parser


def _engine(args: argparse.Namespace) -> Any:
    from pathlib import Path

    from ksbpf.linux.engine import LinuxEngine, state_dir_for

    base = Path(args.state_dir) if args.state_dir else None
    state = state_dir_for(args.netns, base) if base else None
    return LinuxEngine(netns=args.netns, state_dir=state, bpf=not getattr(args, "no_bpf", False))


def _print_layers(layers: dict[str, Any], out: Any = sys.stdout) -> None:
    for name, st in layers.items():
        mark = "engaged" if st.engaged else "NOT ENGAGED"
        print(f"  {name:<9} {mark:<12} {st.detail}", file=out)


def _control(args: argparse.Namespace) -> Any:
    """A client for a running daemon's control socket, or None when no daemon serves
    this namespace (ksctl then works on the kernel directly)."""
    try:
        from ksbpf.control import ControlClient
    except ImportError:
        return None
    return ControlClient.connect_if_running(args.netns, args.state_dir)


# ------------------------------------------------------------------ commands


def cmd_up(args: argparse.Namespace) -> int:
    client = _control(args)
    if client is not None:
        # ksbpfd stays the only writer: it reloads its policy file (which this must be).
        import time

        if args.no_bpf:
            client.close()
            raise PolicyError("ksbpfd runs here and decides about its BPF layer (ksbpfd --no-bpf); "
                              "stop it to engage without BPF", source="ksctl up", key="--no-bpf")
        t0 = time.monotonic()
        with client:
            reply = client.request({"op": "reload", "config": os.path.abspath(args.config)})
        print(f"ksbpf up ({args.config}) in {(time.monotonic() - t0) * 1000:.0f} ms by ksbpfd"
              + (f" [netns {args.netns}]" if args.netns else ""))
        return _print_daemon_layers(reply.get("layers", {}))
    eng = _engine(args)
    result = eng.up_file(args.config)
    print(f"ksbpf up ({args.config}) in {result.seconds * 1000:.0f} ms" + (f" [netns {args.netns}]" if args.netns else ""))
    _print_layers(result.layers)
    if not result.ok:
        print(f"ksctl: layers not engaged: {', '.join(result.failed)} (the others are enforcing)", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running ksbpfd to re-read its policy file (as SIGHUP does), and wait for it:
    a bad policy is refused (exit 2) and the one in force stays."""
    client = _control(args)
    if client is None:
        print("ksctl: no ksbpfd serves this namespace; `ksctl up --config FILE` applies a policy directly",
              file=sys.stderr)
        return EXIT_FAILED
    with client:
        reply = client.request({"op": "reload"})
    print("ksbpfd reloaded its policy" + (f" [netns {args.netns}]" if args.netns else ""))
    return _print_daemon_layers(reply.get("layers", {}))


def _print_daemon_layers(layers: dict[str, Any]) -> int:
    for name, st in layers.items():
        print(f"  {name:<9} {'engaged' if st['engaged'] else 'NOT ENGAGED':<12} {st['detail']}")
    if not all(st["engaged"] for st in layers.values()):
        print(f"ksctl: layers not engaged: {', '.join(n for n, st in layers.items() if not st['engaged'])} "
              "(the others are enforcing)", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    _engine(args).down()
    print("ksbpf down: all layers removed" + (f" [netns {args.netns}]" if args.netns else ""))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    client = _control(args)
    if client is not None:
        with client:
            status = client.request({"op": "status"} if args.json else {"op": "status", "brief": True})
        if args.json:
            print(json.dumps(status, indent=1))
        else:
            for name, st in status["layers"].items():
                print(f"  {name:<9} {'engaged' if st['engaged'] else 'NOT ENGAGED':<12} {st['detail']}")
            tunnels = ", ".join(f"{n} {'up' if up else 'down'}" for n, up in sorted(status.get("tunnels", {}).items()))
            print(f"  tunnel    {tunnels or 'none'}")
            repairs = ", ".join(f"{n} {c}" for n, c in status.get("drift_repairs", {}).items() if c)
            count = status["exemption_count"] if "exemption_count" in status else len(status.get("exemptions", []))
            print(f"  daemon    pid {status.get('pid')}, exemptions in force: {count}"
                  + (f", drift repaired: {repairs}" if repairs else "") + (f"; {status['note']}" if status.get("note") else ""))
        return EXIT_OK if all(s["engaged"] for s in status["layers"].values()) else EXIT_FAILED
    eng = _engine(args)
    layers = eng.status()
    exemptions = [e.as_dict() for e in eng.exemptions.load()]
    if args.json:
        print(json.dumps({"layers": {n: s.as_dict() for n, s in layers.items()}, "exemptions": exemptions}, indent=1))
    else:
        _print_layers(layers)
        print(f"  run-time exemptions: {len(exemptions)}")
    return EXIT_OK if all(s.engaged for s in layers.values()) else EXIT_FAILED


def _exemption_request(args: argparse.Namespace) -> dict[str, Any]:
    """The exemption as the command line gives it, unparsed: the shape of a policy's
    [[exempt]] table and of the control request."""
    data: dict[str, Any] = {"cgroup": args.cgroup}
    for key in ("allow", "listen", "to"):
        if getattr(args, key):
            data[key] = getattr(args, key)
    if args.from_:
        data["from"] = args.from_
    return data


def _exemption_from_args(args: argparse.Namespace) -> Exemption:
    from ksbpf.policy import parse_exemption

    return parse_exemption(_exemption_request(args), "ksctl exempt", "")


def cmd_exempt(args: argparse.Namespace) -> int:
    client = _control(args)
    if client is not None:
        # ksbpfd validates the request completely before anything changes (the policy
        # parser, and the cgroup path against its cgroup2 mount) and refuses a bad one,
        # which is exit 2 here as below: the client need not parse it first.
        with client:
            reply = client.request({"op": "exempt", "exemption": _exemption_request(args)})
        shown = reply.get("exemption") or {"cgroup": args.cgroup}
    else:
        from ksbpf.linux.cgroup import cgroup_dir

        ex = _exemption_from_args(args)
        cgroup_dir(ex.cgroup)  # refuses paths escaping the cgroup2 mount
        _engine(args).set_exemption(ex)
        shown = ex.as_dict()
    print(f"exempted {shown.get('cgroup')}: " + json.dumps(shown))
    return EXIT_OK


def cmd_unexempt(args: argparse.Namespace) -> int:
    client = _control(args)
    if client is not None:
        with client:  # ksbpfd normalizes and validates the path
            reply = client.request({"op": "unexempt", "cgroup": args.cgroup})
        cgroup = reply.get("cgroup", args.cgroup)
    else:
        from ksbpf.policy import normalize_cgroup

        try:
            cgroup = normalize_cgroup(args.cgroup)
        except ValueError as e:
            raise PolicyError(str(e), source="ksctl unexempt", key="--cgroup") from None
        _engine(args).remove_exemption(cgroup)
    print(f"removed exemption for {cgroup}")
    return EXIT_OK


def cmd_exemptions(args: argparse.Namespace) -> int:
    eng = _engine(args)
    runtime = [e.as_dict() for e in eng.exemptions.load()]
    try:
        from_policy = [e.as_dict() for e in eng.applied_snapshot().exemptions]
    except KsbpfError:
        from_policy = []
    if args.json:
        print(json.dumps({"policy": from_policy, "runtime": runtime}, indent=1))
    else:
        for origin, items in (("policy", from_policy), ("run-time", runtime)):
            for e in items:
                print(f"{origin:<9} {json.dumps(e)}")
        if not from_policy and not runtime:
            print("no exemptions")
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    from ksbpf.policy import load_policy

    policy = load_policy(args.config)
    if args.platform == "linux":
        from ksbpf.render.nft import render_nft, to_json
        from ksbpf.render.routing import render_routing

        uplinks: dict[int, str] = {}
        tunnels: dict[int, str] = {}
        if os.geteuid() == 0 and not args.offline:
            # What `up` would apply here: the kernel's interfaces decide the egress chains.
            from ksbpf.linux.netns import netns
            from ksbpf.linux.nftables import uplink_interfaces

            with netns(args.netns):
                uplinks = uplink_interfaces(policy)
            from ksbpf.linux.routing import RoutingLayer

            plan = RoutingLayer(args.netns).plan(policy)
        else:
            plan = render_routing(policy, tunnels)
        print(to_json(render_nft(policy, uplinks)))
        print("# policy routing")
        for line in plan.describe():
            print(f"# {line}")
        return EXIT_OK
    try:
        if args.platform == "macos":
            from ksbpf.render.pf import render_pf

            rendered = render_pf(policy)
        else:
            from ksbpf.render.windows import render_windows

            rendered = render_windows(policy)
    except ValueError as e:  # a value the platform's syntax cannot carry safely
        raise PolicyError(str(e), source=args.config, key=f"render --platform {args.platform}") from None
    for name, text in rendered.files.items():
        print(f"# ===== {name} =====")
        print(text)
    if rendered.unsupported:
        print(f"# unsupported on {args.platform}:", file=sys.stderr)
        for u in rendered.unsupported:
            print(f"#   {u}", file=sys.stderr)
        if args.strict:
            print("ksctl: --strict: the policy uses features this platform cannot express", file=sys.stderr)
            return EXIT_BAD_INPUT
    return EXIT_OK


def _addr_port(text: str) -> tuple[Any, int]:
    import ipaddress

    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return ipaddress.ip_address(host), int(rest[1:]) if rest.startswith(":") else 0
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return ipaddress.ip_address(host), int(port)
    return ipaddress.ip_address(text), 0


def cmd_explain(args: argparse.Namespace) -> int:
    import ipaddress

    from ksbpf.policy import load_policy
    from ksbpf.verdict import Packet, verdict

    policy = load_policy(args.config)
    try:
        dst, dport = _addr_port(args.destination)
        src = ipaddress.ip_address(args.source) if args.source else None
    except ValueError as e:
        raise PolicyError(str(e), source="ksctl explain", key="destination") from None
    iface = args.interface or ""
    packet = Packet(
        direction=args.direction, proto=args.proto, dst=dst, src=src, sport=args.sport, dport=dport,
        oif=iface if args.direction != "in" else "", iif=iface if args.direction == "in" else args.iif or "",
        mark=int(args.mark, 0), cgroup=args.cgroup, icmp_type=args.icmp_type,
    )
    v = verdict(policy, packet)
    print(f"{v.action}: {v.reason.value}")
    return EXIT_OK if v.allow else EXIT_FAILED


def cmd_doctor(args: argparse.Namespace) -> int:
    from ksbpf.doctor import run_doctor

    return int(run_doctor(args))


def cmd_audit(args: argparse.Namespace) -> int:
    from ksbpf.audit import run_audit

    return int(run_audit(args))


def cmd_lab(args: argparse.Namespace) -> int:
    from ksbpf import lab  # type: ignore[attr-defined,unused-ignore]

    if args.lab_cmd == "demo":
        return int(lab.demo(sys.stdout))
    if args.lab_cmd == "up":
        info = lab.lab_up(args.name)
        print(json.dumps(info, indent=1, default=str) if not isinstance(info, str) else info)
        return EXIT_OK
    if not lab.lab_down(args.name):
        print(f"ksctl: no lab named {args.name!r}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"lab {args.name} removed")
    return EXIT_OK


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ksctl", description="ksbpf: a VPN kill switch in three kernel layers")
    p.add_argument("--version", action="version", version=f"ksctl {__version__}")
    p.add_argument("--netns", metavar="NAME", help="do the network-side work inside this named network namespace")
    p.add_argument("--state-dir", metavar="DIR", help="state directory (default /var/lib/ksbpf)")
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="engage the kill switch (idempotent)")
    up.add_argument("--config", default=DEFAULT_POLICY)
    up.add_argument("--no-bpf", action="store_true", help="engage nftables and routing only")
    up.set_defaults(func=cmd_up)

    sub.add_parser("reload", help="ksbpfd re-reads its policy file (as SIGHUP)").set_defaults(func=cmd_reload)
    sub.add_parser("down", help="remove every layer").set_defaults(func=cmd_down)

    st = sub.add_parser("status", help="each layer's state")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=cmd_status)

    ex = sub.add_parser("exempt", help="exempt a cgroup for exactly these ports")
    ex.add_argument("--cgroup", required=True)
    ex.add_argument("--allow", action="append", metavar="PROTO/PORT", help="remote port this cgroup may reach")
    ex.add_argument("--listen", action="append", metavar="PROTO/PORT", help="local port of an inbound service")
    ex.add_argument("--to", action="append", metavar="CIDR")
    ex.add_argument("--from", dest="from_", action="append", metavar="CIDR")
    ex.set_defaults(func=cmd_exempt)

    un = sub.add_parser("unexempt", help="remove a run-time exemption")
    un.add_argument("--cgroup", required=True)
    un.set_defaults(func=cmd_unexempt)

    exs = sub.add_parser("exemptions", help="list exemptions")
    exs.add_argument("--json", action="store_true")
    exs.set_defaults(func=cmd_exemptions)

    r = sub.add_parser("render", help="print what `up` applies, or a macOS/Windows rendering")
    r.add_argument("--platform", choices=["linux", "macos", "windows"], default="linux")
    r.add_argument("--config", default=DEFAULT_POLICY)
    r.add_argument("--strict", action="store_true", help="fail if a feature cannot be expressed")
    r.add_argument("--offline", action="store_true", help="do not read interfaces from the kernel")
    r.set_defaults(func=cmd_render)

    e = sub.add_parser("explain", help="what the policy does with one packet")
    e.add_argument("--config", default=DEFAULT_POLICY)
    e.add_argument("direction", choices=["out", "in", "forward"])
    e.add_argument("proto", choices=["tcp", "udp", "icmp", "icmpv6"])
    e.add_argument("destination", help="ADDRESS[:PORT] or [V6]:PORT")
    e.add_argument("--interface", "-i", help="output interface (out, forward) or input interface (in)")
    e.add_argument("--iif", help="input interface of a forwarded packet")
    e.add_argument("--source", help="source address")
    e.add_argument("--sport", type=int, default=0)
    e.add_argument("--mark", default="0")
    e.add_argument("--cgroup", default="", help="socket's cgroup path")
    e.add_argument("--icmp-type", type=int)
    e.set_defaults(func=cmd_explain)

    a = sub.add_parser("audit", help="active leak self-test (exit 0 pass, 1 leak, 3 warning, 4 could not run)")
    a.add_argument("--config", default=DEFAULT_POLICY)
    a.add_argument("--json", action="store_true")
    a.add_argument("--target", action="append", metavar="ADDR", help="also probe this address over every interface")
    a.add_argument("--timeout", type=float, default=1.0, metavar="S", help="wait this long for answers (default 1)")
    a.set_defaults(func=cmd_audit)

    d = sub.add_parser("doctor", help="can every layer work here?")
    d.add_argument("--config", help="policy whose [bpf] settings to check")
    d.add_argument("--prepare-headers", metavar="DIR", help="build a kernel header tree for BCC in DIR")
    d.set_defaults(func=cmd_doctor)

    lab = sub.add_parser("lab", help="a WireGuard lab in network namespaces")
    lab.add_argument("lab_cmd", choices=["up", "down", "demo"])
    lab.add_argument("--name", default="ksbpf-lab")
    lab.set_defaults(func=cmd_lab)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except PolicyError as e:
        print(f"ksctl: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BackendError as e:
        print(f"ksctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KsbpfError as e:
        print(f"ksctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    except PermissionError as e:
        print(f"ksctl: permission denied ({e.filename or e}); run as root", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
