"""`ksctl lab demo` (`make demo`): build a lab, engage the kill switch, break the tunnel
while sending, and count on the far side of the uplink what left outside it."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from ksbpf.errors import KsbpfError
from ksbpf.lab.addresses import TARGET_V4
from ksbpf.lab.lab import Lab
from ksbpf.lab.processes import LabError
from ksbpf.lab.traffic import ProbeResult


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
