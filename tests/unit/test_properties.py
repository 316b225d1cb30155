"""Property tests (hypothesis): generated policies and requests, sized for the unit suite.

- the parser refuses bad input only with PolicyError, and the incremental parser agrees
  with loads_policy on every generated text;
- a control request of any JSON shape is answered or refused as bad_request, never a
  crash of the session.
A generated policy's PF and Windows renderings against verdict(), packet by packet, are in
tests/integration/test_properties_platforms.py (it takes seconds per example); the kernel's
side (nftables against verdict() on generated policies) is in
tests/kernel/test_properties_kernel.py.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ksbpf.control import BadRequest, validate_request
from ksbpf.errors import PolicyError
from ksbpf.policy import Policy, PolicyParser, loads_policy

PROFILE = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ generated policies

ADDR4 = ["198.51.100.7", "203.0.113.9", "192.0.2.1"]
ADDR6 = ["2001:db8::7", "2001:db8:1::1"]
CGROUPS = ["system.slice/sshd.service", "system.slice/chronyd.service", "user.slice/backup", "app.slice/x"]
NETS = ["192.168.1.0/24", "10.0.0.0/8", "fd00:1::/64", "fe80::/10", "203.0.113.0/24", "2001:db8::/32"]


def _q(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


@st.composite
def port_specs(draw: Any) -> str:
    proto = draw(st.sampled_from(["tcp", "udp"]))
    first = draw(st.sampled_from([22, 53, 123, 443, 853, 6000, 51820]))
    if draw(st.booleans()):
        return f"{proto}/{first}"
    return f"{proto}/{first}-{first + draw(st.integers(0, 20))}"


@st.composite
def exemption_tables(draw: Any, cgroup: str) -> str:
    allow = draw(st.lists(port_specs(), max_size=2))
    listen = draw(st.lists(port_specs(), max_size=2, min_size=0 if allow else 1))
    lines = ["[[exempt]]", f"cgroup = {json.dumps(cgroup)}"]
    if allow:
        lines.append(f"allow = {_q(allow)}")
        to = draw(st.lists(st.sampled_from(NETS), max_size=2, unique=True))
        if to:
            lines.append(f"to = {_q(to)}")
    if listen:
        lines.append(f"listen = {_q(listen)}")
        from_ = draw(st.lists(st.sampled_from(NETS), max_size=2, unique=True))
        if from_:
            lines.append(f"from = {_q(from_)}")
    # The subjects on macOS and Windows (one per cgroup, so never shared), or none: then the
    # exemption is reported as not applied there and its packets are left out by key.
    n = CGROUPS.index(cgroup)
    if draw(st.booleans()):
        lines += ["[exempt.macos]", f'user = "_u{n}"']
    windows = draw(st.sampled_from(["", f'service = "S{n}"', f"program = 'C:\\P\\p{n}.exe'",
                                    f"service = \"S{n}\"\nprogram = 'C:\\P\\p{n}.exe'"]))
    if windows:
        lines += ["[exempt.windows]", windows]
    return "\n".join(lines) + "\n"


@st.composite
def policy_texts(draw: Any) -> str:
    ifaces = draw(st.lists(st.sampled_from(["wg0", "wg1", "tun*", "utun*", "wgx"]), min_size=1, max_size=2, unique=True))
    eps = draw(st.lists(st.one_of(
        st.builds(lambda a, p, pr: f"{a}:{p}/{pr}", st.sampled_from(ADDR4), st.sampled_from([51820, 443, 1194]),
                  st.sampled_from(["udp", "tcp"])),
        st.builds(lambda a, p: f"[{a}]:{p}/udp", st.sampled_from(ADDR6), st.sampled_from([51820, 443]))),
        max_size=3, unique=True))
    out = ["[tunnel]", f"interfaces = {_q(ifaces)}"]
    if eps:
        out.append(f"endpoints = {_q(eps)}")
        mark = draw(st.sampled_from([None, "0xca6c", "51820"]))
        cgroups = draw(st.sampled_from([[], ["system.slice/wg-quick@wg0.service"]]))
        if mark is None and not cgroups:
            mark = "0xca6c"
        if mark is not None:
            out.append(f"endpoint_mark = {mark}")
        if cgroups:
            out.append(f"endpoint_cgroups = {_q(cgroups)}")
        if draw(st.booleans()):
            out += ["[tunnel.macos]", 'endpoint_user = "_wg"']
        windows = draw(st.sampled_from(["", 'endpoint_service = "WG"', "endpoint_program = 'C:\\WG\\wg.exe'"]))
        if windows:
            out += ["[tunnel.windows]", windows]
    dns = draw(st.lists(st.sampled_from(["10.64.0.1", "fd00:64::1", "192.168.1.53"]), max_size=2, unique=True))
    if dns:
        out += ["[dns]", f"servers = {_q(dns)}"]
    if draw(st.booleans()):
        out += ["[lan]", f"allow = {'true' if draw(st.booleans()) else 'false'}",
                f"networks = {_q(draw(st.lists(st.sampled_from(NETS[:4]), max_size=2, unique=True)))}"]
    out += ["[ipv6]", f'mode = "{draw(st.sampled_from(["tunnel", "block"]))}"']
    text = "\n".join(out) + "\n"
    for cg in draw(st.lists(st.sampled_from(CGROUPS), max_size=3, unique=True)):
        text += draw(exemption_tables(cg))
    return text


def _parse(text: str) -> Policy:
    try:
        return loads_policy(text, "generated.toml")
    except PolicyError as e:
        raise AssertionError(f"a generated policy was refused: {e}\n{text}") from None


# ------------------------------------------------------------------ the parser


@PROFILE
@given(policy_texts(), st.data())
def test_incremental_parser_agrees_with_loads_policy(text: str, data: Any) -> None:
    parser = PolicyParser()
    assert parser.loads(text, "p") == loads_policy(text, "p")
    # An edit of one line, good or bad: both parse it the same, or refuse it with the same words.
    lines = text.splitlines(keepends=True)
    i = data.draw(st.integers(0, len(lines) - 1))
    lines[i] = data.draw(st.sampled_from(["", "x = 1\n", '[[exempt]]\ncgroup = "a.service"\nallow = ["udp/9"]\n',
                                          lines[i] * 2, lines[i].replace("=", "= =")]))
    edited = "".join(lines)
    outcomes: list[tuple[str, object]] = []
    for parse in (parser.loads, loads_policy):
        try:
            outcomes.append(("ok", parse(edited, "p")))
        except PolicyError as e:
            outcomes.append(("error", str(e)))
    assert outcomes[0] == outcomes[1], edited


@PROFILE
@given(st.text(alphabet=st.sampled_from(list('[]{}="\'\n .,#ab01:/*-_tunelxmpcgrosiwfd\\')), max_size=300))
def test_any_text_is_a_policy_or_a_policy_error(text: str) -> None:
    try:
        loads_policy(text)
    except PolicyError as e:
        assert str(e)  # names what is wrong


# ------------------------------------------------------------------ control requests

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {"op": st.sampled_from(["status", "exempt", "unexempt", "reload", "down", "nope"])},
    optional={"exemption": json_values | st.fixed_dictionaries({"cgroup": st.sampled_from([*CGROUPS, "/", "../x"])},
                                                               optional={"allow": st.lists(port_specs()), "to": json_values}),
              "cgroup": json_values | st.sampled_from(CGROUPS), "brief": json_values, "config": json_values},
)


@PROFILE
@given(st.one_of(request_like, json_values))
def test_any_request_is_answered_or_refused_as_bad_request(req: Any) -> None:
    try:
        out = validate_request(json.dumps(req))
    except BadRequest as e:
        assert e.source == "control request" and str(e)
        return
    except PolicyError as e:  # the exemption's own parser: refused as bad_request all the same
        assert str(e)
        return
    assert out["op"] == req["op"]


@PROFILE
@given(st.binary(max_size=200))
def test_any_bytes_are_answered_or_refused(raw: bytes) -> None:
    try:
        validate_request(raw)
    except PolicyError:
        pass
