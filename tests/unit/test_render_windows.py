"""The Windows renderer: golden files, the shape of apply.ps1 and rollback.ps1 (the
emergency key), what it reports as unsupported, and that hostile values never reach the
script."""

from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import replace

import pytest

from ksbpf.policy import Endpoint, Exemption, Policy, PortSpec, Tunnel
from ksbpf.render.windows import complement, render_windows
from tests.unit import winparse
from tests.unit.adapter_world import GOLDEN_CASES, WG_EXE, cases, check_golden

CASES = {c.name: c for c in cases()}
FULL = CASES["full"].policy


def _render(name: str):  # type: ignore[no-untyped-def]
    return render_windows(CASES[name].policy)


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden(name: str) -> None:
    r = _render(name)
    check_golden("windows", name, r.files, [str(u) for u in r.unsupported])


def test_rendering_is_deterministic_and_pure() -> None:
    events: list[str] = []
    armed = False

    def hook(event: str, _args: object) -> None:
        if armed and event in ("open", "subprocess.Popen", "os.system", "socket.connect", "os.exec"):
            events.append(event)

    sys.addaudithook(hook)
    armed = True
    first, second = _render("full-mapped"), _render("full-mapped")
    armed = False
    assert first == second
    assert events == [], f"render_windows did I/O: {events}"


# ------------------------------------------------------------------ apply.ps1


def _lines(script: str) -> list[str]:
    return [ln.strip() for ln in script.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_every_profile_blocks_by_default_both_ways() -> None:
    fw = winparse.parse(_render("minimal").files["apply.ps1"])
    assert fw.default == {"Inbound": "Block", "Outbound": "Block"}


def test_block_rules_only_narrow_the_tunnel() -> None:
    """Block beats allow: a block off the tunnel would also beat the endpoint, DHCP, LAN and
    exemption allows there. ksbpf's blocks all name the tunnel interface."""
    for name in CASES:
        fw = winparse.parse(_render(name).files["apply.ps1"])
        blocks = [r for r in fw.rules if r.action == "Block"]
        assert blocks and all(r.fields.get("InterfaceAlias") == "$TunnelAliases" for r in blocks), name


def test_apply_order_fails_closed() -> None:
    script = _render("full").files["apply.ps1"]
    lines = _lines(script)

    def at(prefix: str) -> int:
        return next(i for i, ln in enumerate(lines) if ln.startswith(prefix))

    assert script.startswith("#Requires -RunAsAdministrator\n")
    assert lines[0] == "$ErrorActionPreference = 'Stop'"
    # $TunnelAliases exists before the rule table refers to it.
    assert at("$TunnelAliases = ") < at("$Rules = @(")
    assert at("Set-NetFirewallProfile") < at("$Foreign = ") < at("$Foreign | Disable-NetFirewallRule")
    assert at("$Foreign | Disable-NetFirewallRule") < at("Get-NetFirewallRule -Group $Group -Action Allow")
    assert at("Get-NetFirewallRule -Group $Group -Action Allow") < at("New-NetFirewallRule @Rule")
    # The list of disabled rules is written before they are disabled: never lost.
    assert at("@(@($Already)") < at("$Foreign | Disable-NetFirewallRule")
    # An empty -InterfaceAlias would match every interface: such a rule is skipped.
    assert "if ($Rule.ContainsKey('InterfaceAlias') -and $Rule['InterfaceAlias'].Count -eq 0) { continue }" in lines
    # Blocks come first in the table, so they exist before the allows they narrow.
    fw = winparse.parse(script)
    actions = [r.action for r in fw.rules]
    assert actions == sorted(actions, key=lambda a: a != "Block")


def test_tunnel_metric_and_read_back() -> None:
    lines = _lines(_render("full").files["apply.ps1"])
    assert "Set-NetIPInterface -InterfaceAlias $TunnelAliases -AutomaticMetric Disabled -InterfaceMetric $TunnelMetric" in lines
    assert "$TunnelMetric = 1" in lines
    assert any(ln.startswith('if ($Have -ne $Made) { throw') for ln in lines)


def test_rollback_is_the_emergency_key() -> None:
    lines = _lines(_render("full").files["rollback.ps1"])
    assert "$ErrorActionPreference = 'Continue'" in lines, "every step runs even if one fails"
    text = "\n".join(lines)
    for needle in (
        "Remove-NetFirewallRule",
        "Enable-NetFirewallRule",
        "Set-NetFirewallProfile -Name $P.Name",
        "-DefaultOutboundAction Allow",
        "-AutomaticMetric Enabled",
        "Remove-Item -Recurse -Force -Path $State",
    ):
        assert needle in text, needle
    # Re-enabled by exact name: -Name would read wildcards in a stored rule name.
    assert "Where-Object { $Names -contains $_.Name }" in text
    assert text.index("Set-NetFirewallProfile") < text.index("Remove-NetFirewallRule")


@pytest.mark.parametrize("name", sorted(CASES))
def test_scripts_parse_as_powershell(name: str) -> None:
    ts = pytest.importorskip("tree_sitter")
    tsp = pytest.importorskip("tree_sitter_powershell")
    parser = ts.Parser(ts.Language(tsp.language()))
    for fname, text in _render(name).files.items():
        if not fname.endswith(".ps1"):
            continue  # the task XML: test_the_scheduled_task_... parses it
        tree = parser.parse(text.encode("ascii"))
        assert not tree.root_node.has_error, f"{name}/{fname} does not parse"


# ------------------------------------------------------------------ what is rendered


def test_complement_ranges_cover_everything_but_the_servers() -> None:
    ip = ipaddress.ip_address
    assert complement([ip("10.64.0.1")], 4) == ["0.0.0.0-10.64.0.0", "10.64.0.2-255.255.255.255"]
    assert complement([ip("0.0.0.0"), ip("255.255.255.255")], 4) == ["0.0.0.1-255.255.255.254"]
    assert complement([ip("10.0.0.1"), ip("10.0.0.2")], 4) == ["0.0.0.0-10.0.0.0", "10.0.0.3-255.255.255.255"]
    assert complement([ip("10.0.0.1"), ip("10.0.0.3")], 4)[1] == "10.0.0.2"
    assert complement([], 6) == ["::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]


def test_a_linux_unit_name_is_never_taken_as_a_service_name() -> None:
    """full.toml exempts system.slice/sshd.service and names no Windows subject: nothing
    becomes a Service condition; the exemption is reported as not applied, by its key."""
    r = _render("full")
    assert "Service = " not in r.files["apply.ps1"] and "exempt0" not in r.files["apply.ps1"]
    assert "exempt[0].windows" in {u.feature for u in r.unsupported}


def test_unsupported_names_every_feature_windows_cannot_express() -> None:
    assert [u.feature for u in _render("full").unsupported] == [
        "tunnel.windows", "exempt[0].windows", "exempt[1].windows", "exempt[2].windows", "lan.networks",
    ]
    assert "not applied on Windows" in str(_render("full").unsupported[1])
    assert [u.feature for u in _render("full-mapped").unsupported] == ["lan.networks"]
    assert _render("minimal").unsupported == ()


def test_mapped_identities_become_program_and_service_conditions() -> None:
    fw = winparse.parse(_render("full-mapped").files["apply.ps1"])
    by_name = {r.name: r.fields for r in fw.rules}
    assert by_name["ksbpf-out-endpoint0"]["Program"] == WG_EXE
    assert "Program" not in by_name["ksbpf-in-endpoint0"]
    assert by_name["ksbpf-in-exempt0-listen0"]["Service"] == "sshd"
    assert "Program" not in by_name["ksbpf-in-exempt0-listen0"]
    # service and program both named: a socket must match both.
    assert by_name["ksbpf-out-exempt1-allow0"]["Service"] == "W32Time"
    assert by_name["ksbpf-out-exempt1-allow0"]["Program"] == r"%SystemRoot%\System32\svchost.exe"
    assert by_name["ksbpf-out-exempt2-allow0"]["Program"] == r"C:\Tools\backup.exe"
    # IPv6 is blocked in this policy: "any" becomes all of IPv4 so no allow lets IPv6 out.
    assert by_name["ksbpf-out-exempt2-allow0"]["RemoteAddress"] == ["0.0.0.0-255.255.255.255"]


# ------------------------------------------------------------------ hostile values

HOSTILE_NAMES = [
    "wg0\n", "wg0'", "wg0''", "wg0;", "wg$x", "wg`x", "wg0 ", "$(calc)", "", "a" * 16, "wg0\r",
    "wg\x00", "w\u2019g", "w\u2018g", "wg0*x", "wg[0]",
]
HOSTILE_PROGRAMS = [
    r"C:\x'; Remove-Item -Recurse C:\ ; '", "C:\\x\u2019; calc", r"C:\x`$(calc)", r"C:\..\x.exe", r"\\server\share\x.exe",
    "C:\\a\nb.exe", r"C:\a$b.exe", r"C:\a;b.exe", "x.exe", r"C:\a\"b.exe", "", r"C:\a|b.exe",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_interface_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        render_windows(Policy(Tunnel(("wg0", name))))


@pytest.mark.parametrize("cgroup", ['system.slice/a\';calc;\'.service', "a\nb.service", "../x.service", "a/$(x).service", "a b.service"])
def test_hostile_cgroups_are_refused(cgroup: str) -> None:
    with pytest.raises(ValueError):
        render_windows(Policy(Tunnel(("wg0",)), exemptions=(Exemption(cgroup, allow=(PortSpec("tcp", 1, 2),)),)))


MAPPED = CASES["full-mapped"].policy


def _with_endpoint(**kw: object) -> Policy:
    return replace(MAPPED, tunnel=replace(MAPPED.tunnel, **kw))  # type: ignore[arg-type]


def _with_exempt(i: int, **kw: object) -> Policy:
    exemptions = list(MAPPED.exemptions)
    exemptions[i] = replace(exemptions[i], **kw)  # type: ignore[arg-type]
    return replace(MAPPED, exemptions=tuple(exemptions))


@pytest.mark.parametrize("path", HOSTILE_PROGRAMS)
def test_hostile_program_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError):
        render_windows(_with_endpoint(windows_endpoint_program=path))
    with pytest.raises(ValueError):
        render_windows(_with_exempt(2, windows_program=path))


@pytest.mark.parametrize("name", ["x'; calc; '", "a b", "", "x\n", "W32Time$(calc)", "a" * 300, 1])
def test_hostile_service_names_are_refused(name: object) -> None:
    with pytest.raises(ValueError):
        render_windows(_with_endpoint(windows_endpoint_service=name))
    with pytest.raises(ValueError):
        render_windows(_with_exempt(0, windows_service=name))


def test_values_of_the_wrong_type_are_refused() -> None:
    ep = Endpoint(ipaddress.ip_address("192.0.2.1"), "1'; calc; '", "udp")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        render_windows(Policy(Tunnel(("wg0",), (ep,), 1)))
    with pytest.raises(ValueError):
        render_windows(replace(FULL, dns=replace(FULL.dns, servers=("1.1.1.1'; calc; '",))))  # type: ignore[arg-type]


def test_program_paths_render_literally() -> None:
    path = r"C:\Program Files (x86)\WireGuard\wireguard.exe"
    script = render_windows(_with_endpoint(windows_endpoint_program=path)).files["apply.ps1"]
    assert f"Program = '{path}'" in script
    assert re.search(r"Program = '[^']*'(?!;| \})", script) is None


def test_one_identity_stands_for_one_grant() -> None:
    # A hand-built Policy skips validation: the renderer refuses shared subjects itself.
    with pytest.raises(ValueError, match="already stands for"):
        render_windows(_with_endpoint(windows_endpoint_program=r"C:\TOOLS\Backup.exe"))
    with pytest.raises(ValueError, match="could not keep their grants apart"):
        render_windows(_with_exempt(0, windows_service=None, windows_program=r"%SystemRoot%\System32\svchost.exe"))
    twins = Policy(Tunnel(("wg0",)), exemptions=(
        Exemption("a.slice/x.service", allow=(PortSpec("tcp", 1, 1),)),
        Exemption("b.slice/x.service", allow=(PortSpec("tcp", 2, 2),)),
    ))
    r = render_windows(twins)
    assert [u.feature for u in r.unsupported] == ["exempt[0].windows", "exempt[1].windows"]
    assert "Service = " not in r.files["apply.ps1"]


def test_the_scheduled_task_runs_apply_at_boot_and_when_a_network_connects() -> None:
    import xml.etree.ElementTree as ET

    r = _render("full-mapped")
    ns = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}
    root = ET.fromstring(r.files["ksbpf-task.xml"])
    assert root.find("t:Triggers/t:BootTrigger/t:Enabled", ns).text == "true"  # type: ignore[union-attr]
    sub = root.find("t:Triggers/t:EventTrigger/t:Subscription", ns).text  # type: ignore[union-attr]
    query = ET.fromstring(sub)  # type: ignore[arg-type]
    select = query.find("Query/Select")
    assert select is not None and select.get("Path") == "Microsoft-Windows-NetworkProfile/Operational"
    assert select.text == "*[System[(EventID=10000)]]"
    assert root.find("t:Principals/t:Principal/t:UserId", ns).text == "S-1-5-18"  # type: ignore[union-attr]  # SYSTEM
    exe = root.find("t:Actions/t:Exec/t:Command", ns).text  # type: ignore[union-attr]
    args = root.find("t:Actions/t:Exec/t:Arguments", ns).text  # type: ignore[union-attr]
    assert exe is not None and exe.endswith("\\powershell.exe")
    assert args == '-NoProfile -NonInteractive -ExecutionPolicy Bypass -File "C:\\Program Files\\ksbpf\\apply.ps1"'
    # The emergency key disables the task, or it would engage again at the next network event.
    assert "Disable-ScheduledTask -TaskName 'ksbpf'" in r.files["rollback.ps1"]
    assert r.files["rollback.ps1"].index("Disable-ScheduledTask") < r.files["rollback.ps1"].index("Set-NetFirewallProfile")


def test_every_character_outside_the_name_alphabet_is_refused() -> None:
    import string

    allowed = set(string.ascii_letters + string.digits + "_.@-")
    for c in string.printable + "\u2018\u2019\u201a\u201b\u201c\u201d\u00a0\u2028\x00\x7f":
        policy = Policy(Tunnel((f"wg{c}0",)))
        if c in allowed:
            fw = winparse.parse(render_windows(policy).files["apply.ps1"])
            assert fw.tunnel_patterns == [f"wg{c}0"], c
        else:
            with pytest.raises(ValueError):
                render_windows(policy)


def test_the_state_folder_is_trusted_only_when_system_and_administrators_alone_own_it() -> None:
    """%ProgramData% lets standard users create folders: a planted ksbpf\\profiles.xml must
    never be read. apply.ps1 checks the folder before its first use; rollback.ps1 reads
    none of its files unless the folder is trusted, and then falls back to Windows' own
    defaults (outbound allowed, inbound blocked) rather than to what the file says."""
    files = _render("full").files
    apply, rollback = files["apply.ps1"], files["rollback.ps1"]
    for text in (apply, rollback):
        assert "$Trusted = @('S-1-5-18', 'S-1-5-32-544')" in text
        assert "$Sec.SetAccessRuleProtection($true, $false)" in text  # no inherited access
        assert "if (-not $Acl.AreAccessRulesProtected)" in text
        assert "if ($Trusted -notcontains $Owner)" in text and "if ($Trusted -notcontains $Sid)" in text
    # apply: the check comes before anything under $State is touched.
    first_use = min(apply.index(needle) for needle in ("Join-Path $State", "Export-Clixml", "Import-Clixml"))
    assert apply.index("Assert-KsbpfState $State $true") < first_use
    assert "New-Item -ItemType Directory -Force" not in apply  # -Force would adopt a planted folder
    # rollback: every read of a state file is behind the trust check.
    assert rollback.index("$StateTrusted = Assert-KsbpfState $State $false") < rollback.index("Import-Clixml")
    reads = [line for line in rollback.splitlines() if "Test-Path $" in line and "File" in line]
    assert reads and all("$StateTrusted -and" in line for line in reads), reads
    assert "-DefaultOutboundAction Allow" in rollback
