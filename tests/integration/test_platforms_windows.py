"""ksctl's Windows adapter (ksbpf.platforms.windows) running the rendered apply.ps1 and
rollback.ps1 through a powershell.exe stand-in that holds the firewall's state
(tests/integration/standins/powershell.py).

What is shown: at every step of apply.ps1 no ksbpf allow rule exists unless every profile
blocks by default, and nothing passes that verdict() drops unless a rule of Windows' own
(not yet disabled) passes it; engaged, the firewall decides every generated packet as
verdict() does; a failure at any step leaves that true and `down` restores what `up`
found; a planted state folder is refused; status reads back. Not shown: anything about
the real Windows Defender Firewall or PowerShell (none was used).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

from ksbpf.errors import BackendError
from ksbpf.platforms.windows import Windows
from ksbpf.render.windows import render_windows
from ksbpf.verdict import verdict
from tests.integration import standins
from tests.integration.test_adapters_agree import win_exclusion
from tests.unit import winparse
from tests.unit.adapter_world import GOLDEN, Case, cases, packets, to_win, tunnel_names

CASES = {c.name: c for c in cases()}
PROFILES = ("Domain", "Private", "Public")
# Windows' own allow rules of the local store (apply.ps1 disables them), one that is off,
# and one from group policy that stays active (apply.ps1 can only warn about it).
OWN_RULES = [
    {"Name": "CoreNet-DHCP-In", "DisplayName": "Core Networking - DHCP (DHCP-In)", "Direction": "Inbound",
     "Action": "Allow", "Protocol": "UDP", "LocalPort": "68", "RemotePort": "67"},
    {"Name": "RemoteDesktop-UserMode-In-TCP", "DisplayName": "Remote Desktop (TCP-In)", "Direction": "Inbound",
     "Action": "Allow", "Protocol": "TCP", "LocalPort": "3389"},
    {"Name": "App-Out", "DisplayName": "Some app", "Direction": "Outbound", "Action": "Allow",
     "Program": r"C:\Program Files\Other\other.exe"},
]


def initial(case: Case, **over: Any) -> dict[str, Any]:
    rules = [{**r, "Group": "", "Enabled": True, "Store": "PersistentStore"} for r in OWN_RULES]
    rules.append({"Name": "Off-Rule", "DisplayName": "off", "Direction": "Outbound", "Action": "Allow",
                  "Group": "", "Enabled": False, "Store": "PersistentStore"})
    adapters = [n for n in tunnel_names(case.policy)] + ["en0"]
    fw: dict[str, Any] = {
        "profiles": {p: {"Enabled": True, "DefaultInboundAction": "Block", "DefaultOutboundAction": "Allow"} for p in PROFILES},
        "rules": rules, "adapters": adapters,
        "metrics": {f"{a}/{af}": {"AutomaticMetric": "Enabled", "InterfaceMetric": 25} for a in adapters for af in ("IPv4", "IPv6")},
        "programdata": None, "tasks": {"ksbpf": {"Enabled": True}},
    }
    fw.update(over)
    return {"fw": fw}


@pytest.fixture
def win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    state_file = tmp_path / "standin.json"

    def start(case: Case, **over: Any) -> tuple[Windows, Path]:
        env = standins.install(tmp_path / "bin", state_file, initial(case, **over))
        monkeypatch.setenv("PATH", env["PATH"])
        monkeypatch.setenv("KSBPF_STANDIN_STATE", env["KSBPF_STANDIN_STATE"])
        return Windows(install_dir=tmp_path / "Program Files" / "ksbpf"), state_file

    return start


def firewall(fw: dict[str, Any]) -> tuple[winparse.Firewall, list[winparse.WinRule]]:
    """The firewall this state stands for, and the enabled rules that are not ksbpf's."""
    defaults = {(p["DefaultInboundAction"], p["DefaultOutboundAction"]) for p in fw["profiles"].values()}
    assert len(defaults) == 1, "the profiles differ: the model keeps one default per direction"
    (inbound, outbound), = defaults
    rules, foreign = [], []
    for r in fw["rules"]:
        if not r["Enabled"]:
            continue
        rule = winparse.WinRule({k: v for k, v in r.items() if k in winparse.KEYS}, [])
        rules.append(rule)
        if r.get("Group") != "ksbpf":
            foreign.append(rule)
    return winparse.Firewall(rules, {"Inbound": inbound, "Outbound": outbound}), foreign


@functools.cache
def _sample(name: str, every: int) -> list[Any]:
    return [p for i, p in enumerate(packets(CASES[name].policy)) if i % every == 0]


def sample(case: Case, every: int) -> list[Any]:
    return _sample(case.name, every)


def check_every_step(case: Case, journal: list[dict[str, Any]], every: int = 97) -> None:
    rendered = render_windows(case.policy)
    pkts = sample(case, every)
    for snap in journal:
        fw_state = snap["fw"]
        ours = [r for r in fw_state["rules"] if r.get("Group") == "ksbpf" and r["Enabled"]]
        if any(r["Action"] == "Allow" for r in ours):
            for name, p in fw_state["profiles"].items():
                assert (p["DefaultInboundAction"], p["DefaultOutboundAction"]) == ("Block", "Block"), \
                    f"a ksbpf allow rule while profile {name} does not block, after {snap['argv']}"
        fw, foreign = firewall(fw_state)
        present = {*fw_state["adapters"], "lo"}
        for p in pkts:
            if (p.oif if p.direction == "out" else p.iif) not in present:
                continue  # no packet crosses an adapter that does not exist
            v = verdict(case.policy, p)
            if win_exclusion(case, rendered, p, v.reason) is not None:
                continue
            wp = to_win(case, p)
            if fw.allows(wp) and not v.allow and not any(r.action == "Allow" and r.matches(wp) for r in foreign):
                if fw.default[wp.direction] == "Allow" and not ours:
                    continue  # the state up found: nothing of ksbpf's in it
                raise AssertionError(f"after {snap['argv']}: {p} passes, verdict drops it ({v}); {fw.explain(wp)}")


def agrees(case: Case, fw_state: dict[str, Any]) -> None:
    rendered = render_windows(case.policy)
    fw, foreign = firewall(fw_state)
    assert not foreign, "Windows' own allow rules are disabled while engaged"
    compared = 0
    for p in sample(case, 7):
        v = verdict(case.policy, p)
        if win_exclusion(case, rendered, p, v.reason) is not None:
            continue
        compared += 1
        assert fw.allows(to_win(case, p)) == v.allow, (p, v, fw.explain(to_win(case, p)))
    assert compared > 1000


def restored(before: dict[str, Any], after: dict[str, Any]) -> None:
    b, a = before["fw"], after["fw"]
    for key in ("profiles", "rules", "metrics", "adapters", "programdata"):
        assert a[key] == b[key], key
    assert a["tasks"]["ksbpf"]["Enabled"] is False, "down disables the scheduled task, or it engages again"


def test_up_engages_status_reads_back_down_restores(win) -> None:  # type: ignore[no-untyped-def]
    case = CASES["full-mapped"]
    plat, state_file = win(case)
    before = standins.load(state_file)
    result = plat.up(case.policy, (GOLDEN / "policies" / "full-mapped.toml").read_text())
    assert result.output[-1].startswith("ksbpf: kill switch engaged (")
    st = standins.load(state_file)
    check_every_step(case, st["journal"])
    agrees(case, st["fw"])
    assert st["fw"]["metrics"]["wg0/IPv4"] == {"AutomaticMetric": "Disabled", "InterfaceMetric": 1}
    assert st["fw"]["programdata"]["owner"] == "S-1-5-32-544"
    # The order in the log: defaults Block, Windows' own allows off, then blocks before allows.
    calls = [c[1:] for c in st["log"]]  # [tool, cmdlet, what]
    log = [" ".join(c) for c in calls]
    news = [c for c in calls if c[0] == "New-NetFirewallRule"]
    actions = [next(r["Action"] for r in st["fw"]["rules"] if r["Name"] == c[1]) for c in news]
    assert actions == sorted(actions, key=lambda a: a != "Block"), "blocks first"
    first_rule = min(i for i, c in enumerate(log) if c.startswith("New-NetFirewallRule"))
    assert log.index("Set-NetFirewallProfile") < log.index("Disable-NetFirewallRule App-Out") < first_rule
    layers, unsupported = plat.status()
    assert all(layer.engaged for layer in layers.values()), layers
    assert unsupported == ["lan.networks: " + next(u.reason for u in render_windows(case.policy).unsupported)]

    assert plat.down() == []
    restored(before, standins.load(state_file))
    layers, _ = plat.status()
    assert not layers["profiles"].engaged


def _changes_of_a_clean_up(win, case: Case) -> int:  # type: ignore[no-untyped-def]
    plat, state_file = win(case)
    plat.up(case.policy, "")
    return int(standins.load(state_file)["calls"])


@pytest.mark.parametrize("name", ["full-mapped", "corners"])
def test_a_failure_at_any_step_fails_closed_and_down_restores(win, name: str) -> None:  # type: ignore[no-untyped-def]
    case = CASES[name]
    n = _changes_of_a_clean_up(win, case)
    # Every step of full-mapped; every third of corners (the same kinds of step, to save time).
    for fail_at in range(1, n + 1, 1 if name == "full-mapped" else 3):
        plat, state_file = win(case)
        st = standins.load(state_file)
        st["fail_at"] = fail_at
        state_file.write_text(json.dumps(st))
        before = standins.load(state_file)
        try:
            plat.up(case.policy, "")
        except BackendError as e:
            assert "apply.ps1 failed" in str(e)
        else:  # only the scheduled task's step may fail without failing apply.ps1 (try/catch)
            assert standins.load(state_file)["log"][fail_at - 1][1] == "Enable-ScheduledTask", fail_at
        check_every_step(case, standins.load(state_file).get("journal", []), every=211)
        assert plat.down() == [], fail_at
        restored(before, standins.load(state_file))


def test_a_planted_state_folder_is_refused_and_rollback_falls_back_to_windows_defaults(win) -> None:  # type: ignore[no-untyped-def]
    case = CASES["full"]
    planted = {"owner": "S-1-5-21-1004", "protected": True,
               "files": {"profiles.xml": {p: {"Enabled": False, "DefaultInboundAction": "Allow",
                                              "DefaultOutboundAction": "Allow"} for p in PROFILES}}}
    plat, state_file = win(case, programdata=planted)
    before = standins.load(state_file)
    with pytest.raises(BackendError, match="refusing to use the state folder"):
        plat.up(case.policy, "")
    assert standins.load(state_file)["fw"] == before["fw"], "nothing changed"
    problems = plat.down()
    assert problems and "rollback.ps1 failed" in problems[0]
    after = standins.load(state_file)["fw"]
    # The planted profiles.xml was not read: Windows' defaults, never "firewall off".
    assert all(p["Enabled"] and p["DefaultOutboundAction"] == "Allow" and p["DefaultInboundAction"] == "Block"
               for p in after["profiles"].values())


def test_without_a_tunnel_adapter_everything_stays_blocked_and_status_says_why(win) -> None:  # type: ignore[no-untyped-def]
    case = CASES["full-mapped"]
    plat, state_file = win(case, adapters=["en0"])
    plat.up(case.policy, "")
    st = standins.load(state_file)
    assert not [r for r in st["fw"]["rules"] if "InterfaceAlias" in r]
    check_every_step(case, st["journal"])
    layers, _ = plat.status()
    assert layers["rules"].engaged and "wait for its adapter" in layers["rules"].detail


def test_status_notices_a_missing_block_rule(win) -> None:  # type: ignore[no-untyped-def]
    case = CASES["full-mapped"]
    plat, state_file = win(case)
    plat.up(case.policy, "")
    st = standins.load(state_file)
    st["fw"]["rules"] = [r for r in st["fw"]["rules"] if r["Name"] != "ksbpf-out-tunnel-dns-udp"]
    state_file.write_text(json.dumps(st))
    layers, _ = plat.status()
    assert not layers["rules"].engaged and "MISSING ksbpf-out-tunnel-dns-udp" in layers["rules"].detail


def test_the_stand_in_refuses_a_statement_it_does_not_model(win, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import subprocess

    win(CASES["minimal"])
    script = tmp_path / "x.ps1"
    script.write_text(render_windows(CASES["minimal"].policy).files["apply.ps1"].replace(
        "$Made = 0\n", "$Made = 0\nSet-NetFirewallSetting -Exemptions Any\n"))
    proc = subprocess.run(["powershell.exe", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-File",
                           str(script)], capture_output=True, text=True)
    assert proc.returncode == 64 and "unmodelled statement" in proc.stderr
