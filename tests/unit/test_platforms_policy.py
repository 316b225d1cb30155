"""The macOS and Windows subjects in the policy file: [exempt.macos], [exempt.windows],
[tunnel.macos], [tunnel.windows]. Parsed whole and incrementally alike, refused by key,
and ignored by the Linux renderers."""

from __future__ import annotations

import random

import pytest

from ksbpf.errors import PolicyError
from ksbpf.policy import PolicyParser, loads_policy
from ksbpf.render.nft import render_nft, to_json

BASE = """\
[tunnel]
interfaces = ["wg0", "utun*"]
endpoints = ["198.51.100.7:51820/udp"]
endpoint_mark = 0xca6c
"""
TUNNEL_SUBJECTS = """\
[tunnel.macos]
endpoint_user = "_wireguard"
[tunnel.windows]
endpoint_service = "WireGuardTunnel"
endpoint_program = 'C:\\Program Files\\WireGuard\\wireguard.exe'
"""


def _exempt(i: int, mac: str | None = None, svc: str | None = None, prog: str | None = None) -> str:
    text = f'\n[[exempt]]\ncgroup = "system.slice/e{i}.service"\nallow = ["udp/{100 + i}"]\n'
    if mac:
        text += f'[exempt.macos]\nuser = "{mac}"\n'
    if svc or prog:
        text += "[exempt.windows]\n" + (f'service = "{svc}"\n' if svc else "") + (f"program = '{prog}'\n" if prog else "")
    return text


def _outcome(fn, text: str):  # type: ignore[no-untyped-def]
    try:
        return ("ok", fn(text, "p.toml"))
    except PolicyError as e:
        return ("error", e.reason, e.key)


def test_the_keys_parse_into_typed_fields() -> None:
    p = loads_policy(BASE + TUNNEL_SUBJECTS + _exempt(0, "_ntp", "W32Time") + _exempt(1, None, None, r"C:\Program Files\App\app.exe"))
    assert p.tunnel.macos_endpoint_user == "_wireguard"
    assert p.tunnel.windows_endpoint_service == "WireGuardTunnel"
    assert p.tunnel.windows_endpoint_program == r"C:\Program Files\WireGuard\wireguard.exe"
    e0, e1 = p.exemptions
    assert (e0.macos_user, e0.windows_service, e0.windows_program) == ("_ntp", "W32Time", None)
    assert (e1.macos_user, e1.windows_service, e1.windows_program) == (None, None, r"C:\Program Files\App\app.exe")
    assert e0.as_dict()["macos"] == {"user": "_ntp"} and e0.as_dict()["windows"] == {"service": "W32Time"}
    assert "macos" not in e1.as_dict()
    # WireGuard's tunnel services are named WireGuardTunnel$NAME: `$` is a literal in the
    # single-quoted PowerShell string it is rendered into.
    wg = loads_policy(BASE + '[tunnel.windows]\nendpoint_service = "WireGuardTunnel$wg0"\n')
    assert wg.tunnel.windows_endpoint_service == "WireGuardTunnel$wg0"
    from ksbpf.render.windows import render_windows

    assert "Service = 'WireGuardTunnel$wg0'" in render_windows(wg).files["apply.ps1"]


@pytest.mark.parametrize(("text", "key"), [
    (BASE + '[tunnel.macos]\nendpoint_user = "a b"\n', "tunnel.macos.endpoint_user"),
    (BASE + "[tunnel.macos]\nendpoint_user = 7\n", "tunnel.macos.endpoint_user"),
    (BASE + '[tunnel.macos]\nuser = "_x"\n', "tunnel.macos.user"),
    (BASE + "[tunnel.macos]\n", "tunnel.macos"),
    (BASE + "[tunnel.windows]\nendpoint_program = 'wireguard.exe'\n", "tunnel.windows.endpoint_program"),
    (BASE + "[tunnel.windows]\nendpoint_service = \"x'; calc\"\n", "tunnel.windows.endpoint_service"),
    (BASE + _exempt(0, "_a") + '[exempt.macos]\nuser = "_b"\n', None),  # a table defined twice: TOML error
    (BASE + _exempt(0) + '[exempt.macos]\nuid = "_b"\n', "exempt[0].macos.uid"),
    (BASE + _exempt(0) + "[exempt.windows]\nprogram = 'C:\\..\\x.exe'\n", "exempt[0].windows.program"),
    (BASE + _exempt(0) + '[exempt.windows]\nservice = ""\n', "exempt[0].windows.service"),
    (BASE + _exempt(0) + "[exempt.linux]\nx = 1\n", "exempt[0].linux"),
    (BASE + _exempt(0, "_a") + _exempt(1, "_a"), "exempt[1].macos.user"),
    (BASE + TUNNEL_SUBJECTS + _exempt(0, "_wireguard"), "exempt[0].macos.user"),
    (BASE + _exempt(0, svc="W32Time") + _exempt(1, svc="w32time"), "exempt[1].windows"),
    (BASE + _exempt(0, prog=r"C:\a.exe") + _exempt(1, svc="S", prog=r"C:\A.exe"), "exempt[1].windows"),
    (BASE + TUNNEL_SUBJECTS + _exempt(0, svc="WireGuardTunnel"), "tunnel.windows"),
])
def test_bad_subjects_are_refused_by_key_alike_whole_and_incrementally(text: str, key: str | None) -> None:
    whole = _outcome(loads_policy, text)
    assert whole[0] == "error", whole
    if key is not None:
        assert whole[2] == key, whole
    parser = PolicyParser()
    assert _outcome(parser.loads, BASE) == _outcome(loads_policy, BASE)  # warm the cache
    assert _outcome(parser.loads, text) == whole


def test_the_incremental_parser_agrees_and_takes_the_chunked_path() -> None:
    rng = random.Random(13)
    parser = PolicyParser()
    exempts = [_exempt(i, f"_u{i}" if i % 2 else None, f"S{i}" if i % 3 == 0 else None,
                       rf"C:\P\p{i}.exe" if i % 3 == 1 else None) for i in range(12)]
    for _ in range(60):
        op = rng.randrange(4)
        i = rng.randrange(len(exempts))
        if op == 0:
            exempts[i] = _exempt(100 + rng.randrange(50), rng.choice([None, "_x", "_y"]), rng.choice([None, "S1", "T"]))
        elif op == 1:
            exempts.insert(i, _exempt(200 + rng.randrange(50), None, None, rng.choice([None, r"C:\x.exe"])))
        elif op == 2 and len(exempts) > 2:
            del exempts[i]
        else:
            rng.shuffle(exempts)
        text = BASE + rng.choice(["", TUNNEL_SUBJECTS]) + "".join(exempts)
        assert _outcome(parser.loads, text) == _outcome(loads_policy, text), text
    # A valid policy with nested platform tables is served by the chunk cache, not the full path.
    text = BASE + TUNNEL_SUBJECTS + _exempt(1, "_a", "A") + _exempt(2, "_b", None, r"C:\b.exe")
    assert parser._loads_chunked(text, "p.toml") == loads_policy(text, "p.toml")


def test_the_linux_rendering_ignores_the_subjects() -> None:
    plain = loads_policy(BASE + _exempt(0) + _exempt(1))
    named = loads_policy(BASE + TUNNEL_SUBJECTS + _exempt(0, "_a", "A") + _exempt(1, None, None, r"C:\b.exe"))
    assert to_json(render_nft(named, {})) == to_json(render_nft(plain, {}))
