"""ksctl up|down|status|render on macOS and Windows, run as a whole through ksbpf.cli.main
in a Python where the Linux libraries (nftables, pyroute2, bcc, systemd, prometheus_client)
and ksbpf.linux.* cannot be imported, against the tool stand-ins (tests/integration/standins)."""

from __future__ import annotations

import json
import plistlib
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from ksbpf.render.pf import STOCK_PF_CONF
from tests.integration import standins
from tests.integration.test_platforms_macos import initial as mac_initial
from tests.integration.test_platforms_windows import CASES
from tests.integration.test_platforms_windows import initial as win_initial
from tests.unit.adapter_world import GOLDEN

BLOCKED = ("nftables", "pyroute2", "bcc", "systemd", "prometheus_client")
RUNNER = f"""
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r} or name == "ksbpf.linux" or name.startswith("ksbpf.linux."):
            raise ImportError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Blocked())
for name in {BLOCKED!r}:
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{{name}} could still be imported")
from ksbpf.cli import main
rc = main(sys.argv[1:])
sys.stdout.flush()
print("MODULES " + json.dumps(sorted(m for m in sys.modules if m.startswith("ksbpf"))), file=sys.stderr)
sys.exit(rc)
"""


def ksctl(env: dict[str, str], *args: str) -> tuple[int, str, str, list[str]]:
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    err, _, mods = proc.stderr.rpartition("MODULES ")
    modules = json.loads(mods) if mods else []
    assert not [m for m in modules if m.startswith("ksbpf.linux")], modules
    return proc.returncode, proc.stdout, err if mods else proc.stderr, modules


@pytest.fixture
def env(tmp_path: Path):  # type: ignore[no-untyped-def]
    def make(platform: str, state: dict[str, Any]) -> dict[str, str]:
        e = standins.install(tmp_path / "bin", tmp_path / "standin.json", state)
        e["KSBPF_PLATFORM"] = platform
        return e

    return make


def test_macos_render_up_status_down_without_any_linux_library(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pf_conf = tmp_path / "pf.conf"
    pf_conf.write_text(STOCK_PF_CONF)
    e = env("macos", mac_initial(pf_conf))
    policy = str(GOLDEN / "policies" / "full-mapped.toml")
    state = str(tmp_path / "state")

    rc, out, err, _ = ksctl(e, "render", "--config", policy, "--output", str(tmp_path / "out"))
    assert rc == 0, err
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["ksbpf.anchor", "load.sh", "org.ksbpf.pf.plist", "pf.conf", "rollback.sh"]
    plist = plistlib.loads((tmp_path / "out" / "org.ksbpf.pf.plist").read_bytes())
    assert plist["RunAtLoad"] is True and plist["ProgramArguments"][-1].endswith("/load.sh")

    rc, out, err, _ = ksctl(e, "--state-dir", state, "up", "--config", policy)
    assert rc == 0, err
    assert "on macos" in out and "PF rules in anchor ksbpf" in out
    st = standins.load(tmp_path / "standin.json")
    assert st["enabled"] and st["anchors"]["ksbpf"]

    rc, out, err, _ = ksctl(e, "--state-dir", state, "status", "--json")
    assert rc == 0, err
    status = json.loads(out)
    assert status["platform"] == "macos" and all(layer["engaged"] for layer in status["layers"].values())

    rc, out, err, _ = ksctl(e, "--state-dir", state, "down")
    assert rc == 0, err
    assert not standins.load(tmp_path / "standin.json")["enabled"]
    rc, out, err, _ = ksctl(e, "--state-dir", state, "status")
    assert rc == 1 and "NOT" in out

    rc, _, err, _ = ksctl(e, "exempt", "--cgroup", "x.service", "--allow", "tcp/1")
    assert rc == 2 and "works on Linux only" in err


def test_windows_render_up_status_down_without_any_linux_library(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    e = env("windows", win_initial(CASES["full-mapped"]))
    policy = str(GOLDEN / "policies" / "full-mapped.toml")
    install = str(tmp_path / "Program Files" / "ksbpf")

    rc, out, err, _ = ksctl(e, "render", "--config", policy, "--output", str(tmp_path / "out"))
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["apply.ps1", "ksbpf-task.xml", "rollback.ps1"]
    ET.parse(tmp_path / "out" / "ksbpf-task.xml")
    assert "lan.networks" in err, "what Windows cannot express is reported"

    rc, out, err, _ = ksctl(e, "--state-dir", install, "up", "--config", policy)
    assert rc == 0, err
    assert "ksbpf: kill switch engaged (" in out
    rc, out, err, _ = ksctl(e, "--state-dir", install, "status")
    assert rc == 0, err
    assert "profiles" in out and "not applied on windows: lan.networks" in out

    rc, out, err, _ = ksctl(e, "--state-dir", install, "down")
    assert rc == 0, err
    fw = standins.load(tmp_path / "standin.json")["fw"]
    assert not [r for r in fw["rules"] if r.get("Group") == "ksbpf"]
    rc, out, _, _ = ksctl(e, "--state-dir", install, "status")
    assert rc == 1


def test_a_failing_up_exits_1_naming_the_step(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pf_conf = tmp_path / "pf.conf"
    pf_conf.write_text("")
    e = env("macos", mac_initial(pf_conf, fail_at=2))
    rc, _, err, _ = ksctl(e, "--state-dir", str(tmp_path / "state"), "up", "--config", str(GOLDEN / "policies" / "full.toml"))
    assert rc == 1 and "step anchor" in err, err


def test_the_platform_override_is_checked(env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    e = env("beos", {})
    rc, _, err, _ = ksctl(e, "status")
    assert rc == 2 and "KSBPF_PLATFORM" in err
