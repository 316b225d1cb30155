"""ksctl check, ksctl init --from-wireguard, the exit codes, help text on every option, and
a missing Python dependency as a clear failure of ksctl and ksbpfd (no traceback)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import tests.nobody
from ksbpf import cli, daemon
from ksbpf.audit import report as audit
from ksbpf.deps import DEBIAN_PACKAGES, MissingDependency, from_import_error, locate, require
from ksbpf.policy import Endpoint, loads_policy
from ksbpf.wgconf import WireGuardConfigError, interface_from_path, parse_wg_quick, render_policy

REPO = Path(__file__).resolve().parents[2]

# Real-looking keys (wg genkey / wg pubkey / wg genpsk output): none may ever be printed.
PRIVATE = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk="
PUBLIC1 = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg="
PUBLIC2 = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
PSK = "/UwcSPg38hW/D9Y3tcS1FOV0K1wuURMbS0sesJEP5ak="
KEYS = (PRIVATE, PUBLIC1, PUBLIC2, PSK)

WG0 = f"""\
[Interface]
# the laptop's side
PrivateKey = {PRIVATE}
Address = 10.64.0.2/32, fd00:64::2/128
DNS = 10.64.0.1, fd00:64::1, corp.example

[Peer]
PublicKey = {PUBLIC1}
PresharedKey = {PSK}
AllowedIPs = 0.0.0.0/0, ::/0
Endpoint = 198.51.100.7:51820

[peer]
publickey = {PUBLIC2}
endpoint = [2001:db8::7]:443
allowedips = 10.0.0.0/8
"""

POLICY = """\
[tunnel]
interfaces = ["wg0"]
endpoints = ["198.51.100.7:51820/udp"]
endpoint_mark = 0xca6c
[dns]
servers = ["10.64.0.1"]
[[exempt]]
cgroup = "system.slice/ssh.service"
listen = ["tcp/22"]
from = ["10.0.0.0/8"]
"""


def no_key_in(text: str) -> None:
    for key in KEYS:
        for i in range(0, len(key) - 8):
            assert key[i:i + 8] not in text, f"a piece of a key was printed: {key[i:i + 8]!r}"


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# =========================================================================== init


def test_init_prints_a_policy_the_real_parser_takes_with_the_expected_fields(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text(WG0)
    code, out, err = run_main(capsys, "init", "--from-wireguard", str(conf))
    assert code == 0, err
    no_key_in(out + err)
    policy = loads_policy(out, "init output")
    assert policy.tunnel.interfaces == ("wg0",)
    assert policy.tunnel.endpoints == (
        Endpoint(ipaddress.ip_address("198.51.100.7"), 51820, "udp"),
        Endpoint(ipaddress.ip_address("2001:db8::7"), 443, "udp"),
    )
    assert policy.tunnel.endpoint_mark == 0xCA6C == 51820  # wg-quick's default: its table number
    assert [str(s) for s in policy.dns.servers] == ["10.64.0.1", "fd00:64::1"]
    assert policy.ipv6.mode == "tunnel"
    assert policy.lan.allow is False and policy.exemptions == ()
    # what it cannot know is left as comments, and said
    assert "# [[exempt]]" in out and '# listen = ["tcp/22"]' in out and "# allow = true" in out
    assert "search domains ignored: corp.example" in out
    assert "peer 1 (line 7)" in out and "peer 2 (line 13)" in out


def test_init_fwmark_dns_and_ipv6_variants() -> None:
    conf = parse_wg_quick("[Interface]\nAddress = 10.0.0.2/24\nFwMark = 0x1234\n"
                          "[Peer]\nEndpoint = 192.0.2.9:51820\nAllowedIPs = 10.0.0.0/24\n", "wg1.conf", "wg1")
    policy = loads_policy(render_policy(conf).text)
    assert policy.tunnel.endpoint_mark == 0x1234 and policy.ipv6.mode == "block" and policy.dns.servers == ()
    for value, mark in (("off", 0xCA6C), ("0", 0xCA6C), ("4660", 0x1234), ("0X1234", 0x1234)):
        c = parse_wg_quick(f"[Interface]\nFwMark = {value}\n[Peer]\nAllowedIPs = ::/0\nEndpoint = 192.0.2.9:1\n", "w", "wg1")
        assert c.effective_fwmark == mark, value
    # no FwMark and no default route: wg-quick sets no mark, WireGuard's packets would be dropped
    draft = render_policy(parse_wg_quick("[Interface]\n[Peer]\nEndpoint = 192.0.2.9:51820\nAllowedIPs = 10.0.0.0/8\n",
                                         "wg2.conf", "wg2"))
    assert draft.warnings and "FwMark = 0xca6c" in draft.warnings[0]
    assert "# WARNING: no FwMark" in draft.text
    loads_policy(draft.text)
    # Table = off: wg-quick adds no default route, so no mark either
    off = parse_wg_quick("[Interface]\nTable = off\n[Peer]\nAllowedIPs = 0.0.0.0/0\nEndpoint = 192.0.2.9:1\n", "w", "wg3")
    assert not off.wg_quick_sets_fwmark
    # no endpoint at all (a server side): still a valid policy
    loads_policy(render_policy(parse_wg_quick("[Interface]\nListenPort = 51820\n", "wg4.conf", "wg4")).text)


def test_init_resolves_host_names_or_refuses_them_naming_peer_and_host() -> None:
    text = "[Interface]\n[Peer]\nEndpoint = 192.0.2.1:51820\n[Peer]\nEndpoint = vpn.example.net:51820\nAllowedIPs = 0.0.0.0/0\n"
    conf = parse_wg_quick(text, "/etc/wireguard/wg0.conf", "wg0")
    asked: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        asked.append((host, port))
        return [ipaddress.ip_address("203.0.113.5"), ipaddress.ip_address("2001:db8::5"), ipaddress.ip_address("203.0.113.5")]

    policy = loads_policy(render_policy(conf, resolver).text)
    assert asked == [("vpn.example.net", 51820)]
    assert [str(e) for e in policy.tunnel.endpoints] == ["192.0.2.1:51820/udp", "203.0.113.5:51820/udp",
                                                         "[2001:db8::5]:51820/udp"]
    with pytest.raises(WireGuardConfigError) as e:
        render_policy(conf, None)
    assert "peer 2 (line 4)" in str(e.value) and "vpn.example.net" in str(e.value) and "--no-resolve" in str(e.value)
    assert str(e.value).startswith("/etc/wireguard/wg0.conf:5: Endpoint: ")

    def broken(host: str, port: int) -> list[ipaddress.IPv4Address]:
        raise OSError(-2, "Name or service not known")

    with pytest.raises(WireGuardConfigError, match=r"peer 2 \(line 4\): cannot resolve host vpn.example.net"):
        render_policy(conf, broken)


@pytest.mark.parametrize(("text", "where", "what"), [
    ("[Peer]\nEndpoint = 1.2.3.4:5\n", "wg0.conf", "no [Interface]"),
    ("", "wg0.conf", "no [Interface]"),
    ("[Interface]\n[Peer]\nEndpoint = 198.51.100.7\n", "wg0.conf:3: Endpoint", "not HOST:PORT"),
    ("[Interface]\n[Peer]\nEndpoint = 198.51.100.7:70000\n", "wg0.conf:3: Endpoint", "bad port"),
    ("[Interface]\n[Peer]\nEndpoint = [2001:db8::1:51820\n", "wg0.conf:3: Endpoint", "[ADDRESS]:PORT"),
    ("[Interface]\n[Peer]\nEndpoint = bad_host!:1\n", "wg0.conf:3: Endpoint", "neither an IP address nor a host name"),
    ("[Interface]\n[Peer]\nEndpoint = 1.2.3:51820\n", "wg0.conf:3: Endpoint", "neither"),
    ("[Interface]\nAddress = 10.0.0.300/24\n", "wg0.conf:2: Address", "10.0.0.300"),
    ("[Interface]\nDNS = 10.0.0.1, 1.2.3.999\n", "wg0.conf:2: DNS", "not an IP address"),
    ("[Interface]\nFwMark = mark\n", "wg0.conf:2: FwMark", "not a number"),
    ("[Interface]\nFwMark = 0x4b000001\n", "wg0.conf:2: FwMark", "reserves"),
    ("[Interface]\n[Interface]\n", "wg0.conf:2: [Interface]", "second"),
    ("[Interface]\n[Wat]\n", "wg0.conf:2: section", "not [Interface] or [Peer]"),
    ("Address = 10.0.0.1/24\n[Interface]\n", "wg0.conf:1: Address", "outside"),
])
def test_bad_wg_quick_files_name_file_line_and_key(text: str, where: str, what: str) -> None:
    with pytest.raises(WireGuardConfigError) as e:
        parse_wg_quick(text, "wg0.conf", "wg0")
    assert str(e.value).startswith(where + ":") and what in str(e.value), str(e.value)


def test_a_malformed_key_line_is_refused_without_being_echoed() -> None:
    for line in (f"PrivateKey {PRIVATE}", f"{PRIVATE}", f"[{PSK}]"):
        with pytest.raises(WireGuardConfigError) as e:
            parse_wg_quick(f"[Interface]\n{line}\n", "wg0.conf", "wg0")
        assert str(e.value).startswith("wg0.conf:2: ")
        no_key_in(str(e.value))


def test_interface_name_comes_from_the_file_name() -> None:
    assert interface_from_path("/etc/wireguard/wg0.conf") == "wg0"
    assert interface_from_path("mullvad-se4.conf") == "mullvad-se4"
    for bad in ("/etc/wireguard/wg0.cfg", "/etc/wireguard/a-name-too-long-for-linux.conf", "/x/.conf",
                "/etc/wireguard/lo.conf", "/etc/wireguard/w=g.conf"):
        with pytest.raises(WireGuardConfigError):
            interface_from_path(bad)


def test_init_cli_errors_are_exit_2_and_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "wg9.conf"
    code, out, err = run_main(capsys, "init", "--from-wireguard", str(missing))
    assert code == 2 and out == "" and f"{missing}: cannot read: No such file or directory" in err
    bad = tmp_path / "wg0.conf"
    bad.write_text(f"[Interface]\nPrivateKey = {PRIVATE}\n[Peer]\nPublicKey = {PUBLIC1}\nEndpoint = 198.51.100.7:x\n")
    code, out, err = run_main(capsys, "init", "--from-wireguard", str(bad))
    assert code == 2 and out == "" and f"{bad}:5: Endpoint: bad port 'x'" in err
    no_key_in(out + err)
    host = tmp_path / "wg1.conf"
    host.write_text(f"[Interface]\nPrivateKey = {PRIVATE}\n[Peer]\nEndpoint = localhost:51820\nAllowedIPs = 0.0.0.0/0\n")
    code, out, err = run_main(capsys, "init", "--no-resolve", "--from-wireguard", str(host))
    assert code == 2 and "peer 1 (line 3): localhost is a host name" in err
    code, out, err = run_main(capsys, "init", "--from-wireguard", str(host))  # /etc/hosts resolves it
    assert code == 0, err
    assert "127.0.0.1:51820/udp" in out and "localhost as resolved now" in out
    no_key_in(out + err)


@pytest.mark.skipif(os.geteuid() != 0, reason="ksctl check accepts only a policy file owned by root, as ksbpfd does")
def test_init_output_passes_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "wg0.conf"
    conf.write_text(WG0)
    _, out, _ = run_main(capsys, "init", "--from-wireguard", str(conf))
    policy = tmp_path / "policy.toml"
    policy.write_text(out)
    policy.chmod(0o600)
    code, out, err = run_main(capsys, "check", "--config", str(policy))
    assert code == 0, err


# =========================================================================== check


@pytest.mark.skipif(os.geteuid() != 0, reason="ksctl check accepts only a policy file owned by root, as ksbpfd does")
def test_check_valid_policy_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "policy.toml"
    p.write_text(POLICY)
    p.chmod(0o644)
    code, out, err = run_main(capsys, "check", "--config", str(p))
    assert code == 0, err
    assert out.startswith(f"{p}: valid\n")
    assert "wg0" in out and "198.51.100.7:51820/udp" in out and "tcp/22 from 10.0.0.0/8 (system.slice/ssh.service)" in out


def test_check_bad_policy_is_exit_2_with_file_key_and_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "policy.toml"
    p.write_text(POLICY.replace('listen = ["tcp/22"]', 'listen = ["tcp/99999"]'))
    code, out, err = run_main(capsys, "check", "--config", str(p))
    assert code == 2 and out == ""
    assert err.startswith(f"ksctl: {p}: exempt[0].listen[0]: ") and "99999" in err
    code, _, err = run_main(capsys, "check", "--config", str(tmp_path / "nope.toml"))
    assert code == 2 and "nope.toml: cannot read" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="a file owned by root is the daemon's rule")
def test_check_refuses_a_file_ksbpfd_would_refuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "policy.toml"
    p.write_text(POLICY)
    p.chmod(0o666)
    code, _, err = run_main(capsys, "check", "--config", str(p))
    assert code == 2 and "would refuse this file" in err and "writable by group or others" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="writes a state directory as root")
def test_check_write_lockdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "policy.toml"
    p.write_text(POLICY)
    state = tmp_path / "state"
    code, out, err = run_main(capsys, "--state-dir", str(state), "check", "--config", str(p), "--write-lockdown")
    assert code == 0, err
    written = state / "lockdown.nft"
    assert f"boot lockdown written to {written}" in out
    assert "tcp dport { 22 }" in written.read_text() and (written.stat().st_mode & 0o777) == 0o600
    # --netns: the engine's state directory for that namespace
    code, out, err = run_main(capsys, "--state-dir", str(state), "--netns", "ns1", "check", "--config", str(p),
                              "--write-lockdown")
    assert code == 0 and (state / "netns" / "ns1" / "lockdown.nft").exists()


def test_state_dir_is_the_engines() -> None:
    from ksbpf.linux.engine import DEFAULT_STATE_DIR, state_dir_for

    assert cli.DEFAULT_STATE_DIR == str(DEFAULT_STATE_DIR)
    for netns in (None, "ns1"):
        ns = argparse.Namespace(state_dir=None, netns=netns)
        assert cli._state_dir(ns) == str(state_dir_for(netns))
        ns = argparse.Namespace(state_dir="/x", netns=netns)
        assert cli._state_dir(ns) == str(state_dir_for(netns, Path("/x")))


# =========================================================================== subprocesses: no kernel library, non-root

BLOCKER = """\
import os, sys
BLOCKED = {m for m in os.environ.get("KSBPF_TEST_BLOCK", "").split(",") if m}


class _Block:
    # A module of BLOCKED and everything below it cannot be imported, as if not installed.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Block())
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory nobody may read (tmp_path's parents are root's 0700), with the blocker."""
    d = Path(tempfile.mkdtemp(prefix="ksbpf-cli-"))
    try:
        d.chmod(0o755)
        (d / "sitecustomize.py").write_text(BLOCKER)
        (d / "sitecustomize.py").chmod(0o644)
        yield d
    finally:
        shutil.rmtree(d)


def _as_nobody() -> None:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)


def run(argv: list[str], shared: Path, block: tuple[str, ...] = (), nobody: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "INVOCATION_ID", "JOURNAL_STREAM")}
    as_nobody = nobody and os.geteuid() == 0
    # nobody may not enter the checkout (a clone in /root): tests.nobody gives it a readable copy.
    package = tests.nobody.package_copy() if as_nobody else str(REPO)
    env.update(PYTHONPATH=f"{shared}{os.pathsep}{package}", KSBPF_TEST_BLOCK=",".join(block))
    return subprocess.run([tests.nobody.PYTHON if as_nobody else sys.executable, *argv], env=env, capture_output=True,
                          text=True, timeout=60, cwd=shared, preexec_fn=_as_nobody if as_nobody else None)


def test_the_blocker_blocks(shared_dir: Path) -> None:
    r = run(["-c", "import pyroute2"], shared_dir, block=("pyroute2",))
    assert r.returncode == 1 and "No module named 'pyroute2'" in r.stderr
    assert run(["-c", "import pyroute2"], shared_dir).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="ksctl check accepts only a policy file owned by root, as ksbpfd does")
def test_check_imports_no_kernel_library_and_works_as_nobody(shared_dir: Path) -> None:
    p = shared_dir / "policy.toml"
    p.write_text(POLICY)
    p.chmod(0o644)
    r = run(["-m", "ksbpf.cli", "check", "--config", str(p)], shared_dir, block=("nftables", "pyroute2", "bcc"))
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout
    if os.geteuid() == 0:
        r = run(["-m", "ksbpf.cli", "check", "--config", str(p), "--write-lockdown"], shared_dir)
        assert r.returncode == 4 and "needs root" in r.stderr


@pytest.mark.parametrize("module", ["nftables", "pyroute2"])
def test_ksctl_names_the_debian_package_of_a_missing_module(shared_dir: Path, module: str) -> None:
    # As nobody, in a namespace that does not exist: nothing could change even if the guard failed.
    r = run(["-m", "ksbpf.cli", "--netns", "ksbpf-test-absent", "--state-dir", str(shared_dir / "state"), "status"],
            shared_dir, block=(module,))
    assert r.returncode == cli.EXIT_NOT_INSTALLED == 5, r.stdout + r.stderr
    assert f"install the Debian package {DEBIAN_PACKAGES[module]}" in r.stderr and "Traceback" not in r.stderr


def test_ksctl_up_without_bcc_refuses_before_changing_anything(shared_dir: Path) -> None:
    p = shared_dir / "policy.toml"
    p.write_text(POLICY)
    base = ["-m", "ksbpf.cli", "--netns", "ksbpf-test-absent", "--state-dir", str(shared_dir / "state"), "up", "--config", str(p)]
    r = run(base, shared_dir, block=("bcc",))
    assert r.returncode == 5 and "python3-bpfcc" in r.stderr and "--no-bpf" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not (shared_dir / "state").exists()


@pytest.mark.parametrize("module", ["prometheus_client", "systemd", "nftables", "pyroute2", "bcc"])
def test_ksbpfd_missing_dependency_is_one_clear_exit(shared_dir: Path, module: str) -> None:
    p = shared_dir / "policy.toml"
    p.write_text(POLICY)
    argv = ["-m", "ksbpf.daemon", "--config", str(p), "--netns", "ksbpf-test-absent",
            "--state-dir", str(shared_dir / "state"), "--log-target", "stderr"]
    r = run(argv, shared_dir, block=(module,))
    assert r.returncode == daemon.EXIT_MISSING_DEPENDENCY == 5, r.stderr
    assert f"install the Debian package {DEBIAN_PACKAGES[module]}" in r.stderr and "Traceback" not in r.stderr
    assert "cannot start" in r.stderr


def test_ksbpfd_no_bpf_does_not_need_bcc(shared_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("checks that the next step, the root check, is reached")
    p = shared_dir / "policy.toml"
    p.write_text(POLICY)
    r = run(["-m", "ksbpf.daemon", "--config", str(p), "--netns", "ksbpf-test-absent", "--no-bpf",
             "--state-dir", str(shared_dir / "state"), "--log-target", "stderr"], shared_dir, block=("bcc",))
    assert r.returncode == daemon.EXIT_FAILED and "must run as root" in r.stderr, r.stderr


def test_deps_helpers() -> None:
    with pytest.raises(MissingDependency, match="ksbpf_no_such_module cannot be imported"):
        locate("ksbpf_no_such_module")
    with pytest.raises(MissingDependency, match="install it"):
        require("ksbpf_no_such_module")
    locate("json")
    require("json")
    assert from_import_error(ModuleNotFoundError("x", name="systemd.daemon")) is not None
    assert from_import_error(ModuleNotFoundError("x", name="requests")) is None
    assert from_import_error(ImportError("x")) is None


# =========================================================================== exit codes and help


def test_exit_codes_are_one_table_consistent_across_commands() -> None:
    codes = [c for c, _ in cli.EXIT_CODES]
    assert codes == sorted(set(codes)) == list(range(len(codes)))
    assert (audit.EXIT_PASS, audit.EXIT_FAIL, audit.EXIT_BAD_INPUT, audit.EXIT_WARN, audit.EXIT_ERROR) == (
        cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_BAD_INPUT, cli.EXIT_PARTIAL, cli.EXIT_CANNOT_RUN)
    assert (daemon.EXIT_OK, daemon.EXIT_FAILED, daemon.EXIT_BAD_CONFIG, daemon.EXIT_MISSING_DEPENDENCY) == (
        cli.EXIT_OK, cli.EXIT_FAILED, cli.EXIT_BAD_INPUT, cli.EXIT_NOT_INSTALLED)
    helptext = cli.build_parser().format_help()
    for code, what in cli.EXIT_CODES:
        assert f"  {code}  {textwrap.wrap(what, 60)[0]}" in helptext


def test_explain_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "policy.toml"
    p.write_text(POLICY)
    code, out, _ = run_main(capsys, "explain", "--config", str(p), "out", "udp", "1.1.1.1:53", "-i", "eth0")
    assert code == cli.EXIT_DROP == 6 and out.startswith("drop")
    code, out, _ = run_main(capsys, "explain", "--config", str(p), "out", "tcp", "1.1.1.1:443", "-i", "wg0")
    assert code == 0 and out.startswith("allow")


def _parsers(p: argparse.ArgumentParser, path: str = "ksctl") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield path, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{path} {name}")


@pytest.mark.parametrize("build", [cli.build_parser, daemon.build_parser], ids=["ksctl", "ksbpfd"])
def test_every_option_and_subcommand_has_help(build: object) -> None:
    missing = []
    for path, parser in _parsers(build()):  # type: ignore[operator]
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helped = {a.dest for a in action._choices_actions if a.help}
                missing += [f"{path} {name}" for name in action.choices if name not in helped]
            if not action.help:  # argparse.SUPPRESS (hidden on purpose) is a help text
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"without help text: {missing}"
