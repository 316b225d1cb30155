"""ksctl: the command line of ksbpf.

Exit codes: EXIT_CODES below, the same for every command (and for ksbpfd where they
apply); `ksctl --help` and ksctl(8) list them.
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
from ksbpf.deps import MissingDependency
from ksbpf.errors import BackendError, KsbpfError, PolicyError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from ipaddress import IPv4Address, IPv6Address
    from typing import Any, TextIO

    from ksbpf.control import ControlClient
    from ksbpf.linux.engine import LinuxEngine
    from ksbpf.linux.layer import LayerStatus
    from ksbpf.platforms._tools import Layer as PlatformLayer
    from ksbpf.platforms.macos import MacOS
    from ksbpf.platforms.windows import Windows
    from ksbpf.policy import Exemption, Policy

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_CANNOT_RUN = 4  # not root (audit: could not run)
EXIT_NOT_INSTALLED = 5  # a Python dependency is missing (as ksbpfd; systemd's NOTINSTALLED)
EXIT_DROP = 6  # explain: the policy drops the packet
# One table for every command: `ksctl --help` prints it, ksctl(8) is generated from it.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "success (explain: the packet is allowed; audit: pass)"),
    (EXIT_FAILED, "failed: a kernel layer or the operation failed (status: a layer is not engaged; "
                  "reload: no ksbpfd serves; audit: a probe leaked)"),
    (EXIT_BAD_INPUT, "bad input: a policy, file or argument was refused; nothing was changed"),
    (EXIT_PARTIAL, "partial: some layers engaged, the others are named and the engaged ones enforce "
                   "(audit: a warning)"),
    (EXIT_CANNOT_RUN, "cannot run here: the command needs root (audit: could not run)"),
    (EXIT_NOT_INSTALLED, "not installed: a Python module is missing; the message names the Debian package"),
    (EXIT_DROP, "explain: the policy drops the packet"),
)
DEFAULT_POLICY = "/etc/ksbpf/policy.toml"  # ksbpf.policy.DEFAULT_POLICY_PATH, without importing the parser
DEFAULT_STATE_DIR = "/var/lib/ksbpf"  # ksbpf.linux.engine.DEFAULT_STATE_DIR, without importing the engine


def exit_codes_text(width: int = 79) -> str:
    import textwrap

    return "exit status (the same for every command):\n" + "\n".join(
        textwrap.fill(what, width, initial_indent=f"  {code}  ", subsequent_indent="     ") for code, what in EXIT_CODES)


def _state_dir(args: argparse.Namespace) -> str:
    """The engine's state directory (ksbpf.linux.engine.state_dir_for) for these options."""
    base = args.state_dir or DEFAULT_STATE_DIR
    return base if args.netns is None else os.path.join(base, "netns", args.netns)


def _engine(args: argparse.Namespace, need_bpf: bool = False) -> LinuxEngine:
    from pathlib import Path

    from ksbpf.deps import load_library, locate, require

    # Before anything changes: a missing module is one clear error (exit 5), not a layer
    # half engaged or a traceback. Only `up` needs bcc: down and status get along without.
    require("nftables", "pyroute2")
    if need_bpf and not getattr(args, "no_bpf", False):
        locate("bcc", hint="(or engage nftables and routing only: --no-bpf)")
        load_library("libbpf.so.1", hint="(or engage nftables and routing only: --no-bpf)")
    from ksbpf.linux.engine import LinuxEngine, state_dir_for

    base = Path(args.state_dir) if args.state_dir else None
    state = state_dir_for(args.netns, base) if base else None
    return LinuxEngine(netns=args.netns, state_dir=state, bpf=not getattr(args, "no_bpf", False))


def _print_layers(layers: Mapping[str, LayerStatus | PlatformLayer], out: TextIO = sys.stdout) -> None:
    for name, st in layers.items():
        mark = "engaged" if st.engaged else "NOT ENGAGED"
        print(f"  {name:<9} {mark:<12} {st.detail}", file=out)


def _control(args: argparse.Namespace) -> ControlClient | None:
    """A client for a running daemon's control socket, or None when no daemon serves
    this namespace (ksctl then works on the kernel directly)."""
    try:
        from ksbpf.control import ControlClient
    except ImportError:
        return None
    return ControlClient.connect_if_running(args.netns, args.state_dir)


# ------------------------------------------------------------------ commands


def cmd_up(args: argparse.Namespace) -> int:
    if (plat := _platform()) != "linux":
        return _platform_up(plat, args)
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
        _mark_existing(reply.get("marks"))
        return _print_daemon_layers(reply.get("layers", {}))
    eng = _engine(args, need_bpf=True)
    result = eng.up_file(args.config)
    print(f"ksbpf up ({args.config}) in {result.seconds * 1000:.0f} ms" + (f" [netns {args.netns}]" if args.netns else ""))
    if result.effective is not None:
        from ksbpf.sockmark import wanted_marks

        _mark_existing(wanted_marks(result.effective))
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
    _mark_existing(reply.get("marks"))
    return _print_daemon_layers(reply.get("layers", {}))


def _mark_existing(marks: dict[str, int] | None) -> None:
    """Give the sockets exempt cgroups made before ksbpf engaged the mark sock_create gives
    new ones (ksbpf.sockmark: the sandboxed daemon cannot, ksctl as root can). Best
    effort: an unmarked socket is blocked, never let out."""
    if not marks or os.geteuid() != 0:
        return
    from ksbpf.sockmark import mark_existing_sockets

    try:
        report = mark_existing_sockets({cg: int(m) for cg, m in marks.items()})
    except OSError as e:
        print(f"ksctl: could not mark existing sockets of exempt cgroups: {e}", file=sys.stderr)
        return
    if report.marked or report.refused:
        print(f"  sockets   {report.describe()}")


def cmd_mark_sockets(args: argparse.Namespace) -> int:
    """For the unit's ExecStartPost=+ (and by hand): mark the existing sockets of the exempt
    cgroups of the policy in force, as recorded in the state directory."""
    from ksbpf.sockmark import mark_existing_sockets, wanted_marks

    eng = _engine(args)
    try:
        snapshot = eng.applied_snapshot()
    except KsbpfError as e:
        print(f"ksctl: no policy applied here: {e}", file=sys.stderr)
        return EXIT_FAILED
    report = mark_existing_sockets(wanted_marks(eng.effective_policy(snapshot)))
    print(report.describe())
    return EXIT_OK if not report.refused else EXIT_PARTIAL


def _print_daemon_layers(layers: dict[str, Any]) -> int:
    for name, st in layers.items():
        print(f"  {name:<9} {'engaged' if st['engaged'] else 'NOT ENGAGED':<12} {st['detail']}")
    if not all(st["engaged"] for st in layers.values()):
        print(f"ksctl: layers not engaged: {', '.join(n for n, st in layers.items() if not st['engaged'])} "
              "(the others are enforcing)", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    if (plat := _platform()) != "linux":
        return _platform_down(plat, args)
    _engine(args).down()
    print("ksbpf down: all layers removed" + (f" [netns {args.netns}]" if args.netns else ""))
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    if (plat := _platform()) != "linux":
        return _platform_status(plat, args)
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
            _print_recent_drops(status)
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


def _print_recent_drops(status: dict[str, Any]) -> None:
    from ksbpf.events import DropEvent

    recent = status.get("recent_drops") or []
    print(f"  drops     {'last ' + str(len(recent)) + ' with their process' if recent else 'none reported'}"
          f" (events: {status.get('drop_events', '?')})")
    for d in recent:
        try:
            print(f"    {DropEvent.from_dict(d).line()}")
        except (KeyError, TypeError, ValueError):
            print(f"    {d}")


def cmd_watch(args: argparse.Namespace) -> int:
    """Live drop events from ksbpfd, until Ctrl-C or the daemon stops."""
    from ksbpf.control import BadRequest, validate_request
    from ksbpf.events import DropEvent

    req: dict[str, Any] = {"op": "watch"}
    if args.cgroup is not None:
        req["cgroup"] = args.cgroup
    if args.reason is not None:
        req["reason"] = args.reason
    try:
        validate_request(json.dumps(req))  # the daemon would refuse it as well: say so before connecting
    except BadRequest as e:
        raise PolicyError(e.reason, source="ksctl watch", key=f"--{e.key}") from None
    client = _control(args)
    if client is None:
        raise BackendError("control", "ksbpfd is not running" + (f" for netns {args.netns}" if args.netns else "")
                           + ": drop events come from the daemon")
    try:
        with client:
            for msg in client.watch(req):
                if msg.get("ok"):
                    print("ksctl: watching drop events (Ctrl-C ends)", file=sys.stderr, flush=True)
                    continue
                if "end" in msg:
                    print(f"ksctl: {msg['end']}", file=sys.stderr)
                    break
                if "event" not in msg:
                    continue
                if msg.get("missed"):
                    print(f"ksctl: {msg['missed']} events not shown (this watcher fell behind)", file=sys.stderr)
                if args.json:
                    print(json.dumps(msg["event"]), flush=True)
                else:
                    print(DropEvent.from_dict(msg["event"]).line(), flush=True)
            else:
                print("ksctl: ksbpfd closed the connection", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # `ksctl watch | head`
        sys.stderr.close()
    return EXIT_OK


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
        marks = reply.get("marks")
    else:
        from ksbpf.linux.cgroup import cgroup_dir
        from ksbpf.sockmark import wanted_marks

        ex = _exemption_from_args(args)
        cgroup_dir(ex.cgroup)  # refuses paths escaping the cgroup2 mount
        effective = _engine(args).set_exemption(ex)
        shown = ex.as_dict()
        mark = wanted_marks(effective).get(ex.cgroup) if effective is not None else None
        marks = {ex.cgroup: mark} if mark else None
    print(f"exempted {shown.get('cgroup')}: " + json.dumps(shown))
    _mark_existing(marks)  # a running service's sockets, made before it was exempt
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
    args.platform = args.platform or _platform()
    if args.output is not None and args.platform == "linux":
        raise PolicyError("--output writes the macOS or Windows files; give --platform macos or windows",
                          source="ksctl render", key="--output")
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
        from ksbpf.render.bpf import describe as describe_bpf
        from ksbpf.render.bpf import render as render_bpf

        print("# cgroup-bpf maps")
        for line in describe_bpf(render_bpf(policy)):
            print(f"# {line}")
        return EXIT_OK
    try:
        if args.platform == "macos":
            from ksbpf.render.pf import render_pf

            # On the Mac itself, the main ruleset is built from its /etc/pf.conf.
            pf_conf = _macos_adapter(args).system_pf_conf() if _platform() == "macos" else None
            rendered = render_pf(policy, pf_conf=pf_conf)
        else:
            from ksbpf.render.windows import render_windows

            rendered = render_windows(policy)
    except ValueError as e:  # a value the platform's syntax cannot carry safely
        raise PolicyError(str(e), source=args.config, key=f"render --platform {args.platform}") from None
    if args.output is not None:
        _write_rendering(rendered.files, args.output)
    else:
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


def _describe(policy: Policy) -> list[str]:
    """A few lines saying what a valid policy does."""
    t = policy.tunnel
    how = []
    if t.endpoint_mark is not None:
        how.append(f"mark {t.endpoint_mark:#x}")
    if t.endpoint_cgroups:
        how.append("cgroups " + ", ".join(t.endpoint_cgroups))
    lines = [
        f"  tunnel      {', '.join(t.interfaces)}; endpoints: {', '.join(map(str, t.endpoints)) or 'none'}"
        + (f" ({' and '.join(how)})" if how and t.endpoints else ""),
        f"  dns         {', '.join(map(str, policy.dns.servers)) or 'none (port 53/853 dropped everywhere)'}",
        f"  lan         {'allowed: ' + ', '.join(map(str, policy.lan.networks)) if policy.lan.allow else 'blocked'}",
        f"  ipv6        {'through the tunnel only' if policy.ipv6.mode == 'tunnel' else 'blocked'}",
        f"  exemptions  {len(policy.exemptions)}",
    ]
    from ksbpf.render.lockdown import listen_exemptions

    opened = [f"{' '.join(map(str, e.listen))} from {', '.join(map(str, e.from_)) or 'anywhere'} ({e.cgroup})"
              for e in listen_exemptions(policy)]
    lines.append("  at boot     " + ("; ".join(opened) if opened else "loopback only (no [[exempt]] with listen ports)"))
    return lines


def cmd_check(args: argparse.Namespace) -> int:
    """Validate a policy file as `ksctl up` and ksbpfd read it, without the kernel."""
    from ksbpf.policy import load_policy
    from ksbpf.policy_file import read_policy_file

    policy = load_policy(args.config)  # the content first: its errors name the key
    try:
        read_policy_file(args.config)  # then who may write it, as ksbpfd and `up` check
    except PolicyError as e:
        raise PolicyError(f"ksbpfd and `ksctl up` would refuse this file: {e.reason}", source=e.source, key=e.key) from None
    print(f"{args.config}: valid")
    for line in _describe(policy):
        print(line)
    if args.write_lockdown:
        from pathlib import Path

        from ksbpf.lockdown_file import write_lockdown

        if os.geteuid() != 0:
            print("ksctl check: --write-lockdown needs root (it writes the state directory)", file=sys.stderr)
            return EXIT_CANNOT_RUN
        try:
            path = write_lockdown(policy, Path(_state_dir(args)))
        except (OSError, ValueError) as e:
            print(f"ksctl check: boot lockdown not written: {e}", file=sys.stderr)
            return EXIT_FAILED
        print(f"boot lockdown written to {path}")
    return EXIT_OK


def _resolve(host: str, port: int) -> list[IPv4Address | IPv6Address]:
    """The addresses wg would try for an Endpoint host name (getaddrinfo, UDP)."""
    import ipaddress
    import socket

    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP)
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos
            if info[0] in (socket.AF_INET, socket.AF_INET6)]


def cmd_init(args: argparse.Namespace) -> int:
    from ksbpf.policy import loads_policy
    from ksbpf.wgconf import WireGuardConfigError, interface_from_path, parse_wg_quick, render_policy

    path = args.from_wireguard
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 20)
    except OSError as e:
        hint = " (wg-quick files are root's: run as root)" if isinstance(e, PermissionError) else ""
        raise WireGuardConfigError(f"cannot read: {e.strerror}{hint}", source=path) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise WireGuardConfigError("not UTF-8 text", source=path) from None
    conf = parse_wg_quick(text, path, interface_from_path(path))
    draft = render_policy(conf, None if args.no_resolve else _resolve)
    # What is printed must be a policy `up` takes: checked by the real parser here.
    loads_policy(draft.text, f"the policy drafted from {path}")
    for w in draft.warnings:
        print(f"ksctl init: warning: {w}", file=sys.stderr)
    sys.stdout.write(draft.text)
    return EXIT_OK


def _addr_port(text: str) -> tuple[IPv4Address | IPv6Address, int]:
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
    return EXIT_OK if v.allow else EXIT_DROP


def cmd_doctor(args: argparse.Namespace) -> int:
    from ksbpf.doctor import run_doctor

    return int(run_doctor(args))


def cmd_audit(args: argparse.Namespace) -> int:
    from ksbpf.audit.run import run_audit

    return int(run_audit(args))


def cmd_lab(args: argparse.Namespace) -> int:
    from ksbpf.lab import cli as lab

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


# ------------------------------------------------------------------ macOS and Windows

# Commands that need the Linux engine or ksbpfd: refused by name elsewhere.
_LINUX_ONLY = frozenset({"reload", "exempt", "unexempt", "exemptions", "audit", "doctor", "lab", "watch"})


def _platform() -> str:
    from ksbpf.platforms import current

    try:
        return current()
    except ValueError as e:
        raise PolicyError(str(e), source="ksctl", key="KSBPF_PLATFORM") from None


def _platform_adapter(plat: str, args: argparse.Namespace) -> MacOS | Windows:
    """The macOS or Windows adapter; --state-dir is its state (macOS) or install (Windows) folder."""
    from pathlib import Path

    if plat == "macos":
        return _macos_adapter(args)
    if getattr(args, "netns", None):
        raise PolicyError("network namespaces exist on Linux only", source="ksctl", key="--netns")
    from ksbpf.platforms.windows import Windows

    return Windows(install_dir=Path(args.state_dir)) if args.state_dir else Windows()


def _macos_adapter(args: argparse.Namespace) -> MacOS:
    from pathlib import Path

    if getattr(args, "netns", None):
        raise PolicyError("network namespaces exist on Linux only", source="ksctl", key="--netns")
    from ksbpf.platforms.macos import MacOS

    return MacOS(state_dir=Path(args.state_dir)) if args.state_dir else MacOS()


def _platform_up(plat: str, args: argparse.Namespace) -> int:
    from ksbpf.policy import load_policy
    from ksbpf.policy_file import read_policy_file

    if args.no_bpf:
        raise PolicyError(f"there is no BPF layer on {plat}", source="ksctl up", key="--no-bpf")
    adapter = _platform_adapter(plat, args)
    if plat == "macos":
        policy, text = read_policy_file(args.config)  # root's alone, as on Linux
    else:
        # Windows has no POSIX owner or mode to check: the README says to keep the file in an
        # administrators-only folder.
        policy = load_policy(args.config)
        with open(args.config, encoding="utf-8") as f:
            text = f.read()
    result = adapter.up(policy, text)
    from ksbpf.platforms.macos import UpResult as PfResult

    summary, lines = (f": {result.rules} PF rules in anchor ksbpf", []) if isinstance(result, PfResult) else ("", result.output)
    print(f"ksbpf up ({args.config}) on {plat}{summary}")
    for line in lines:
        print(f"  {line}")
    for w in result.warnings:
        print(f"ksctl: {w}", file=sys.stderr)
    return EXIT_OK


def _platform_down(plat: str, args: argparse.Namespace) -> int:
    problems = _platform_adapter(plat, args).down()
    if problems:
        for p in problems:
            print(f"ksctl: down: {p}", file=sys.stderr)
        key = "sudo sh rollback.sh, or pfctl -d" if plat == "macos" else "rollback.ps1 as administrator"
        print(f"ksctl: the emergency key: {key}", file=sys.stderr)
        return EXIT_FAILED
    print(f"ksbpf down on {plat}: the kill switch is removed")
    return EXIT_OK


def _platform_status(plat: str, args: argparse.Namespace) -> int:
    layers, unsupported = _platform_adapter(plat, args).status()
    if args.json:
        print(json.dumps({"platform": plat, "layers": {n: s.as_dict() for n, s in layers.items()},
                          "unsupported": unsupported}, indent=1))
    else:
        _print_layers(layers)
        for u in unsupported:
            print(f"  not applied on {plat}: {u}")
    return EXIT_OK if all(s.engaged for s in layers.values()) else EXIT_FAILED


def _write_rendering(files: dict[str, str], folder: str) -> None:
    from pathlib import Path

    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out / name).write_text(text, encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"cannot write: {e.strerror}", source=folder, key="--output") from None
    print(f"wrote {', '.join(files)} to {out}")


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ksctl", description="ksbpf: a VPN kill switch in three kernel layers",
                                epilog=exit_codes_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"ksctl {__version__}", help="print the version and exit")
    p.add_argument("--netns", metavar="NAME", help="do the network-side work inside this named network namespace")
    p.add_argument("--state-dir", metavar="DIR", help=f"state directory (default {DEFAULT_STATE_DIR})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")
    config_help = f"policy file (default {DEFAULT_POLICY})"

    up = sub.add_parser("up", help="engage the kill switch (idempotent)")
    up.add_argument("--config", default=DEFAULT_POLICY, help=config_help)
    up.add_argument("--no-bpf", action="store_true", help="engage nftables and routing only")
    up.set_defaults(func=cmd_up)

    sub.add_parser("reload", help="ksbpfd re-reads its policy file (as SIGHUP)").set_defaults(func=cmd_reload)
    sub.add_parser("mark-sockets", help="mark sockets exempt cgroups made before ksbpf engaged "
                   "(up, reload and exempt do it themselves)").set_defaults(func=cmd_mark_sockets)
    sub.add_parser("down", help="remove every layer").set_defaults(func=cmd_down)

    st = sub.add_parser("status", help="each layer's state")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)

    w = sub.add_parser("watch", help="live drop events with their process, from ksbpfd (Ctrl-C ends)")
    w.add_argument("--json", action="store_true", help="one JSON object per line")
    w.add_argument("--cgroup", metavar="PATH", help="only this cgroup and those below it")
    w.add_argument("--reason", metavar="REASON", help="only drops for this reason (e.g. dns, no_tunnel)")
    w.set_defaults(func=cmd_watch)

    ex = sub.add_parser("exempt", help="exempt a cgroup for exactly these ports")
    ex.add_argument("--cgroup", required=True, help="cgroup path below the cgroup2 mount, e.g. system.slice/ssh.service")
    ex.add_argument("--allow", action="append", metavar="PROTO/PORT", help="remote port this cgroup may reach")
    ex.add_argument("--listen", action="append", metavar="PROTO/PORT", help="local port of an inbound service")
    ex.add_argument("--to", action="append", metavar="CIDR", help="only to these networks (with --allow; default any)")
    ex.add_argument("--from", dest="from_", action="append", metavar="CIDR",
                    help="only from these networks (with --listen; default any)")
    ex.set_defaults(func=cmd_exempt)

    un = sub.add_parser("unexempt", help="remove a run-time exemption")
    un.add_argument("--cgroup", required=True, help="the exempted cgroup path")
    un.set_defaults(func=cmd_unexempt)

    exs = sub.add_parser("exemptions", help="list exemptions")
    exs.add_argument("--json", action="store_true", help="print JSON")
    exs.set_defaults(func=cmd_exemptions)

    c = sub.add_parser("check", help="validate a policy file without touching the kernel")
    c.add_argument("--config", default=DEFAULT_POLICY, help=config_help)
    c.add_argument("--write-lockdown", action="store_true",
                   help="also write the boot lockdown generated from it to the state directory (root)")
    c.set_defaults(func=cmd_check)

    i = sub.add_parser("init", help="print a commented starting policy from a wg-quick configuration")
    i.add_argument("--from-wireguard", required=True, metavar="FILE",
                   help="wg-quick configuration, e.g. /etc/wireguard/wg0.conf")
    i.add_argument("--no-resolve", action="store_true", help="refuse host name endpoints instead of resolving them")
    i.set_defaults(func=cmd_init)

    r = sub.add_parser("render", help="print what `up` applies, or a macOS/Windows rendering")
    r.add_argument("--platform", choices=["linux", "macos", "windows"],
                   help="target platform (default: the one ksctl runs on)")
    r.add_argument("--config", default=DEFAULT_POLICY, help=config_help)
    r.add_argument("--strict", action="store_true", help="fail if a feature cannot be expressed")
    r.add_argument("--offline", action="store_true", help="do not read interfaces from the kernel")
    r.add_argument("--output", metavar="DIR",
                   help="write the macOS or Windows files (with the LaunchDaemon or scheduled task) to DIR")
    r.set_defaults(func=cmd_render)

    e = sub.add_parser("explain", help=f"what the policy does with one packet (exit 0 allow, {EXIT_DROP} drop)")
    e.add_argument("--config", default=DEFAULT_POLICY, help=config_help)
    e.add_argument("direction", choices=["out", "in", "forward"], help="the packet's direction")
    e.add_argument("proto", choices=["tcp", "udp", "icmp", "icmpv6"], help="its protocol")
    e.add_argument("destination", help="ADDRESS[:PORT] or [V6]:PORT")
    e.add_argument("--interface", "-i", help="output interface (out, forward) or input interface (in)")
    e.add_argument("--iif", help="input interface of a forwarded packet")
    e.add_argument("--source", help="source address")
    e.add_argument("--sport", type=int, default=0, help="source port")
    e.add_argument("--mark", default="0", help="the packet's fwmark (e.g. 0xca6c)")
    e.add_argument("--cgroup", default="", help="socket's cgroup path")
    e.add_argument("--icmp-type", type=int, help="ICMP or ICMPv6 type")
    e.set_defaults(func=cmd_explain)

    a = sub.add_parser("audit", help="active leak self-test (exit 0 pass, 1 leak, 3 warning, 4 could not run)")
    a.add_argument("--config", default=DEFAULT_POLICY, help=config_help)
    a.add_argument("--json", action="store_true", help="print the report as JSON")
    a.add_argument("--target", action="append", metavar="ADDR", help="also probe this address over every interface")
    a.add_argument("--timeout", type=float, default=1.0, metavar="S", help="wait this long for answers (default 1)")
    a.set_defaults(func=cmd_audit)

    d = sub.add_parser("doctor", help="can every layer work here?")
    d.add_argument("--config", help="policy whose [bpf] settings to check")
    d.add_argument("--prepare-headers", metavar="DIR", help="build a kernel header tree for BCC in DIR")
    d.set_defaults(func=cmd_doctor)

    lab = sub.add_parser("lab", help="a WireGuard lab in network namespaces")
    lab.add_argument("lab_cmd", choices=["up", "down", "demo"], help="build the lab, remove it, or run the demo")
    lab.add_argument("--name", default="ksbpf-lab", help="the lab's name (default %(default)s)")
    lab.set_defaults(func=cmd_lab)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in _LINUX_ONLY and _platform() != "linux":
            print(f"ksctl: {args.command} works on Linux only (on macOS and Windows: up, down, status, render, "
                  "check, explain, init)", file=sys.stderr)
            return EXIT_BAD_INPUT
        return int(args.func(args))
    except PolicyError as e:
        print(f"ksctl: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ImportError as e:
        from ksbpf.deps import from_import_error

        missing = from_import_error(e)
        if missing is None:
            raise  # not a dependency: a bug, and its traceback is the report
        return _not_installed(args, missing)
    except MissingDependency as e:
        return _not_installed(args, e)
    except BackendError as e:
        print(f"ksctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KsbpfError as e:
        print(f"ksctl: {e}", file=sys.stderr)
        return EXIT_FAILED
    except PermissionError as e:
        print(f"ksctl: permission denied ({e.filename or e}); run as root", file=sys.stderr)
        return EXIT_CANNOT_RUN


def _not_installed(args: argparse.Namespace, e: KsbpfError) -> int:
    print(f"ksctl: {e}", file=sys.stderr)
    if args.command == "down":
        print("ksctl: to lift the kill switch without ksctl: nft delete table inet ksbpf; "
              "nft delete table inet ksbpf_lockdown", file=sys.stderr)
    return EXIT_NOT_INSTALLED


if __name__ == "__main__":
    sys.exit(main())
