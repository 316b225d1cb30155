"""The macOS renderer: golden files, the shape of the load and rollback steps, what it
reports as unsupported, and that hostile values never reach the text."""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ksbpf.errors import PolicyError
from ksbpf.policy import Dns, Endpoint, Exemption, Lan, Policy, PortSpec, Tunnel, loads_policy
from ksbpf.render.pf import GLOB_UNITS, render_pf, tunnel_interfaces
from tests.unit import pfparse
from tests.unit.adapter_world import GOLDEN_CASES, cases, check_golden

CASES = {c.name: c for c in cases()}
FULL = CASES["full"].policy


def _render(name: str):  # type: ignore[no-untyped-def]
    return render_pf(CASES[name].policy)


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden(name: str) -> None:
    r = _render(name)
    check_golden("macos", name, r.files, [str(u) for u in r.unsupported])


def test_rendering_is_deterministic_and_pure() -> None:
    events: list[str] = []

    def hook(event: str, _args: object) -> None:
        if armed and event in ("open", "subprocess.Popen", "os.system", "socket.connect", "os.exec"):
            events.append(event)

    armed = False
    sys.addaudithook(hook)
    armed = True
    first = _render("full-mapped")
    second = _render("full-mapped")
    armed = False
    assert first == second
    assert events == [], f"render_pf did I/O: {events}"


# ------------------------------------------------------------------ the anchor


def test_anchor_holds_no_options_and_the_main_ruleset_calls_it_first() -> None:
    r = _render("full")
    anchor, main = r.files["ksbpf.anchor"], r.files["pf.conf"]
    assert not [ln for ln in anchor.splitlines() if ln.startswith("set ")], "pfctl -a drops `set` lines silently"
    lines = [ln for ln in main.splitlines() if ln and not ln.startswith("#")]
    assert lines[:2] == ["set skip on lo0", "set block-policy drop"]
    filters = [ln for ln in lines if ln.startswith("anchor ")]
    assert filters == ['anchor "ksbpf"', 'anchor "com.apple/*"'], "ksbpf must decide before Apple's anchors"
    # Options, then translation anchors, then filters: the order pfctl insists on.
    assert lines.index('rdr-anchor "com.apple/*"') < lines.index('anchor "ksbpf"')


def test_every_rule_is_quick_stateless_and_each_direction_ends_in_a_block() -> None:
    for name in CASES:
        rs = pfparse.parse(_render(name).files["ksbpf.anchor"])  # the model refuses `keep state`
        assert all(r.quick for r in rs.rules), name
        outs = [r for r in rs.rules if r.direction == "out"]
        ins = [r for r in rs.rules if r.direction == "in"]
        assert outs[-1].text == "block drop out quick all" and ins[-1].text == "block drop in quick all", name


def test_globs_become_explicit_units_because_xnu_pf_has_no_groups() -> None:
    assert tunnel_interfaces(["utun*", "wg0"]) == [f"utun{i}" for i in range(GLOB_UNITS)] + ["wg0"]
    assert tunnel_interfaces(["abcdefghijklm*"])[-1] == "abcdefghijklm31"  # 15 characters, IFNAMSIZ - 1
    assert all(len(n) <= 15 for n in tunnel_interfaces(["abcdefghijklmn*"]))
    anchor = _render("wildcard").files["ksbpf.anchor"]
    assert 'ksbpf_tunnel = "{ utun0 utun1 ' in anchor and " wg31 }" in anchor


# ------------------------------------------------------------------ load and rollback


def _commands(script: str) -> list[str]:
    body = re.sub(r"<<'(\w+)'\n.*?\n\1\n", "\n", script, flags=re.S)  # drop heredoc bodies
    return [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def _heredoc(script: str, tag: str) -> str:
    m = re.search(rf"<<'{tag}'\n(.*?\n){tag}\n", script, flags=re.S)
    assert m, tag
    return m.group(1)


def test_load_checks_then_loads_the_anchor_before_the_main_ruleset_then_enables_then_kills_states() -> None:
    r = _render("full")
    load = r.files["load.sh"]
    assert _heredoc(load, "KSBPF_ANCHOR") == r.files["ksbpf.anchor"]
    assert _heredoc(load, "KSBPF_MAIN") == r.files["pf.conf"]
    cmds = _commands(load)

    def at(prefix: str) -> int:
        return next(i for i, c in enumerate(cmds) if c.startswith(prefix))

    assert cmds[0] == "set -eu"
    assert at('pfctl -n -f "$STATE/main.conf"') < at('pfctl -a ksbpf -f - < "$STATE/anchor.conf"')
    assert at('pfctl -n -a ksbpf -f "$STATE/anchor.conf"') < at('pfctl -a ksbpf -f - < "$STATE/anchor.conf"')
    assert at("pfctl -a ksbpf -f -") < at('pfctl -f - < "$STATE/main.conf"') < at("token=$(pfctl -E")
    assert at("token=$(pfctl -E") < at("pfctl -F states") < at("pfctl -s info |")
    # The no-change check (the LaunchDaemon runs load.sh every minute) comes after both
    # rulesets parse and before anything changes.
    assert at("pfctl -n -a ksbpf") < at('if [ -f "$STATE/token" ]') < at("sysctl -w")
    assert at("sysctl -w net.inet.ip.check_interface=1") < at("pfctl -a ksbpf -f -"), "host setting before PF changes"
    assert "pfctl -d" not in cmds, "enable with a reference, never toggle PF for everyone"


def test_rollback_restores_the_system_ruleset_releases_the_reference_and_the_sysctl() -> None:
    cmds = _commands(_render("full").files["rollback.sh"])
    assert cmds[0] == "set -u", "the emergency key runs every step even if one fails"
    assert cmds.index("pfctl -f /etc/pf.conf || rc=1") < cmds.index("pfctl -a ksbpf -F rules || rc=1")
    assert any('pfctl -X "$token"' in c for c in cmds)
    assert any("net.inet.ip.check_interface=" in c for c in cmds)


@pytest.mark.parametrize("script", ["load.sh", "rollback.sh"])
def test_scripts_are_valid_sh(script: str, tmp_path: Path) -> None:
    sh = shutil.which("dash") or shutil.which("sh")
    assert sh is not None
    f = tmp_path / script
    f.write_text(_render("full-mapped").files[script])
    subprocess.run([sh, "-n", str(f)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-s", "sh", str(f)], check=True)


# ------------------------------------------------------------------ unsupported


def test_unsupported_names_every_feature_pf_cannot_express() -> None:
    assert [u.feature for u in _render("full").unsupported] == [
        "tunnel.macos.endpoint_user", "exempt[0].macos.user", "exempt[1].macos.user", "exempt[2].macos.user",
    ]
    assert [u.feature for u in _render("wildcard").unsupported] == [
        "tunnel.interfaces[0]", "tunnel.interfaces[1]", "tunnel.macos.endpoint_user",
    ]
    assert _render("minimal").unsupported == ()
    assert _render("full-mapped").unsupported == ()


def test_mapped_identities_become_user_rules() -> None:
    anchor = _render("full-mapped").files["ksbpf.anchor"]
    assert 'pass out quick inet proto udp to 198.51.100.7 port 51820 user "_wireguard" no state' in anchor
    assert "block drop out quick inet proto udp to 198.51.100.7 port 51820\n" in anchor
    assert 'pass in quick proto tcp from { 10.0.0.0/8 192.168.1.0/24 } to any port 22 user "_sshd" no state' in anchor
    assert 'pass out quick proto tcp to any port 6000:6010 user "backup" no state' in anchor


def test_an_exemption_without_a_macos_user_is_reported_not_applied_by_its_key() -> None:
    r = _render("full")
    assert [u.feature for u in r.unsupported] == [
        "tunnel.macos.endpoint_user", "exempt[0].macos.user", "exempt[1].macos.user", "exempt[2].macos.user"]
    assert "not applied on macOS" in str(r.unsupported[1])
    assert " user " not in r.files["ksbpf.anchor"].replace("# exempt", "")
    assert _render("full-mapped").unsupported == ()


def test_the_main_ruleset_is_the_systems_pf_conf_with_the_anchor_first_among_filter_rules() -> None:
    from ksbpf.render.pf import STOCK_PF_CONF, main_ruleset

    mine = 'ext = "en0"\nset limit states 10000\nnat on $ext from 10.0.0.0/8 to any -> ($ext)\n' \
           'pass in quick on $ext proto tcp to port 22 \\\n  keep state\nanchor "com.apple/*"\n'
    lines = main_ruleset(mine).splitlines()
    at = lines.index('anchor "ksbpf"')
    assert lines[at + 1].startswith("pass in quick"), lines  # before the user's first filter rule
    assert lines.index("set skip on lo0") < lines.index('ext = "en0"')
    assert [ln for ln in lines if not ln.startswith(("#", "set skip on lo0", "set block-policy")) and ln != 'anchor "ksbpf"'] \
        == mine.splitlines(), "every line of /etc/pf.conf is kept, in order"
    # A continuation line is never split from its rule.
    assert main_ruleset('pass in quick on en0 \\\nall no state\n').splitlines()[-3:] == [
        'anchor "ksbpf"', "pass in quick on en0 \\", "all no state"]
    stock = main_ruleset(None)
    assert stock == main_ruleset(STOCK_PF_CONF)
    assert stock.index("\nanchor \"ksbpf\"") < stock.index("\nanchor \"com.apple/*\"")
    assert stock.index('rdr-anchor "com.apple/*"') < stock.index('anchor "ksbpf"')
    assert render_pf(FULL, pf_conf=mine).files["pf.conf"] == main_ruleset(mine)


def test_the_launchdaemon_runs_the_loader_at_boot_and_keeps_checking() -> None:
    import plistlib

    r = _render("full-mapped")
    plist = plistlib.loads(r.files["org.ksbpf.pf.plist"].encode())
    assert plist["Label"] == "org.ksbpf.pf"
    assert plist["ProgramArguments"] == ["/bin/sh", "/Library/Application Support/ksbpf/load.sh"]
    assert plist["RunAtLoad"] is True and plist["StartInterval"] == 60
    # The emergency key unloads it first, or it would engage again within a minute.
    rollback = r.files["rollback.sh"]
    assert rollback.index("launchctl bootout system/org.ksbpf.pf") < rollback.index("pfctl -f /etc/pf.conf")


# ------------------------------------------------------------------ hostile values

HOSTILE_NAMES = [
    "wg0\n", "wg0\npass all", 'wg0"', "wg0'", "wg0;", "wg$x", "wg`x`", "wg0 }", "wg0{", "$(reboot)",
    "", "a" * 16, "wg0\r", "wg\x00", "wg 0", "wg#", "wg0*x", "*", "wg0**", "w\u2019g",
]
HOSTILE_CGROUPS = [
    'system.slice/a";rm -rf /.service', "a\nb", "../etc", "a/../b", "a/$(x)", "a b", "a/`x`", "a;b", "a'b", "",
]


def _policy(**tunnel: object) -> Policy:
    return Policy(tunnel=replace(Tunnel(("wg0",)), **tunnel))  # type: ignore[arg-type]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_interface_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        render_pf(_policy(interfaces=("wg0", name)))


@pytest.mark.parametrize("cgroup", HOSTILE_CGROUPS)
def test_hostile_cgroups_are_refused(cgroup: str) -> None:
    ep = (Endpoint(ipaddress.ip_address("192.0.2.1"), 51820, "udp"),)
    with pytest.raises(ValueError):
        render_pf(_policy(endpoints=ep, endpoint_cgroups=(cgroup,)))
    with pytest.raises(ValueError):
        render_pf(Policy(Tunnel(("wg0",)), exemptions=(Exemption(cgroup, allow=(PortSpec("tcp", 1, 2),)),)))


@pytest.mark.parametrize(
    "bad",
    [
        {"dns": Dns(("10.0.0.1; pass all",))},  # type: ignore[arg-type]  # a string where an address belongs
        {"dns": Dns((ipaddress.ip_address("fe80::1%en0;pass"),))},  # ipaddress accepts any zone text
        {"lan": Lan(True, ("192.168.0.0/16\npass",))},  # type: ignore[arg-type]
        {"lan": Lan("yes", ())},  # type: ignore[arg-type]
        {"tunnel": Tunnel(("wg0",), (Endpoint(ipaddress.ip_address("192.0.2.1"), "53 }", "udp"),), 1)},  # type: ignore[arg-type]
        {"tunnel": Tunnel(("wg0",), (Endpoint(ipaddress.ip_address("192.0.2.1"), True, "udp"),), 1)},  # type: ignore[arg-type]
        {"tunnel": Tunnel(("wg0",), (Endpoint(ipaddress.ip_address("192.0.2.1"), 70000, "udp"),), 1)},
        {"tunnel": Tunnel(("wg0",), (Endpoint(ipaddress.ip_address("192.0.2.1"), 53, "udp all"),), 1)},  # type: ignore[arg-type]
        {"exemptions": (Exemption("a", allow=(PortSpec("tcp", 10, 5),)),)},
        {"exemptions": (Exemption("a", allow=(PortSpec("tcp", 1, 2),), to=("0.0.0.0/0 port 22",)),)},  # type: ignore[arg-type]
    ],
)
def test_values_of_the_wrong_type_or_shape_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        render_pf(replace(Policy(Tunnel(("wg0",))), **bad))  # type: ignore[arg-type]


MAPPED = CASES["full-mapped"].policy


@pytest.mark.parametrize("user", ['_wg" all', "a b", "x\n", "", "$(id)", "-x", "a" * 40, 7])
def test_hostile_user_names_are_refused(user: object) -> None:
    with pytest.raises(ValueError):
        render_pf(replace(MAPPED, tunnel=replace(MAPPED.tunnel, macos_endpoint_user=user)))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        render_pf(replace(MAPPED, exemptions=(replace(MAPPED.exemptions[0], macos_user=user), *MAPPED.exemptions[1:])))  # type: ignore[arg-type]


def test_a_policy_from_toml_that_slips_a_newline_past_validation_is_still_refused() -> None:
    # Policy validation uses re.match with `$`, which also matches before a final newline.
    try:
        p = loads_policy('[tunnel]\ninterfaces = ["wg0\\n"]\n')
    except PolicyError:
        return
    with pytest.raises(ValueError):
        render_pf(p)


def test_every_emitted_line_is_one_the_pf_model_understands() -> None:
    # The model refuses syntax it does not know: nothing unexpected reaches pfctl.
    for name in CASES:
        r = _render(name)
        pfparse.parse(r.files["ksbpf.anchor"])
        pfparse.parse(r.files["pf.conf"])
        assert all(c == "\n" or " " <= c <= "~" for f in r.files.values() for c in f)


def test_renderer_imports_no_kernel_library() -> None:
    code = "import sys, ksbpf.render.pf, ksbpf.render.windows; print(','.join(m for m in ('nftables','pyroute2','bcc') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_one_user_stands_for_one_grant() -> None:
    # A hand-built Policy skips validation: the renderer refuses shared users itself.
    ex = MAPPED.exemptions
    with pytest.raises(ValueError, match="already stands for"):
        render_pf(replace(MAPPED, exemptions=(ex[0], replace(ex[1], macos_user="_sshd"), ex[2])))
    with pytest.raises(ValueError, match="already stands for"):
        render_pf(replace(MAPPED, exemptions=(ex[0], ex[1], replace(ex[2], macos_user="_wireguard"))))


def test_every_character_outside_the_name_alphabet_is_refused() -> None:
    import string

    allowed = set(string.ascii_letters + string.digits + "_.@-")
    for c in string.printable + "\u2018\u2019\u201c\u201d\u00a0\u2028\x00\x7f":
        policy = Policy(Tunnel((f"wg{c}0",)))
        if c in allowed:
            anchor = render_pf(policy).files["ksbpf.anchor"]
            assert pfparse.parse(anchor).rules, c
        else:
            with pytest.raises(ValueError):
                render_pf(policy)
