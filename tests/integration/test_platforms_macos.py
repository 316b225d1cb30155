"""ksctl's macOS adapter (ksbpf.platforms.macos) and the rendered load.sh/rollback.sh, run
against stand-ins for pfctl, sysctl and launchctl that hold PF's state (tests/integration/standins).

What is shown: the anchor is never in force half-loaded (at every step PF either does not
evaluate ksbpf's anchor or evaluates all of it, and then every generated packet is decided
as verdict() decides it); a failure at any step leaves nothing half-loaded and `down` then
restores what `up` found; `down` restores exactly what `up` found; status reads back.
Not shown: anything about the real pfctl on a real Mac (none was used).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ksbpf.errors import BackendError
from ksbpf.platforms.macos import MacOS
from ksbpf.render.base import Rendered
from ksbpf.render.pf import STOCK_PF_CONF, render_pf
from tests.integration import standins
from tests.integration.test_adapters_agree import compare
from tests.unit import pfparse
from tests.unit.adapter_world import GOLDEN, Case, cases

CASES = {c.name: c for c in cases()}
PF_CONF = "# Default PF configuration file.\n#\n" + STOCK_PF_CONF
# What ksbpf may change and cannot give back: the state table it flushes, the token counter.
NOT_RESTORED = ("states", "next_token", "calls", "log", "journal", "fail_at")


def initial(pf_conf: Path, **over: Any) -> dict[str, Any]:
    st: dict[str, Any] = {
        "enabled": False, "refs": [], "next_token": 18446744073709551, "main": PF_CONF,
        "anchors": {}, "sysctl": {"net.inet.ip.check_interface": "0"}, "states": 7,
        "launchd": [], "paths": {"/etc/pf.conf": str(pf_conf)},
    }
    st.update(over)
    return st


@pytest.fixture
def mac(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    pf_conf = tmp_path / "pf.conf"
    pf_conf.write_text(PF_CONF)
    state_file = tmp_path / "standin.json"

    def start(**over: Any) -> tuple[MacOS, Path]:
        env = standins.install(tmp_path / "bin", state_file, initial(pf_conf, **over))
        monkeypatch.setenv("PATH", env["PATH"])
        monkeypatch.setenv("KSBPF_STANDIN_STATE", env["KSBPF_STANDIN_STATE"])
        return MacOS(state_dir=tmp_path / "state", pf_conf=pf_conf, launchd_dir=tmp_path / "LaunchDaemons"), state_file

    return start


def comparable(st: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in st.items() if k not in NOT_RESTORED}


def in_force(snap: dict[str, Any]) -> bool:
    """PF evaluates ksbpf's anchor: enabled, and the main ruleset calls it."""
    return bool(snap["enabled"]) and any(r.anchor == "ksbpf" for r in pfparse.parse(snap["main"]).rules)


def check_every_step(case: Case, journal: list[dict[str, Any]]) -> None:
    rendered = render_pf(case.policy, pf_conf=PF_CONF)
    whole = rendered.files["ksbpf.anchor"]
    for snap in journal:
        anchor = snap["anchors"].get("ksbpf", "")
        assert anchor in ("", whole), f"anchor half-loaded after {snap['argv']}"
        if in_force(snap) and anchor:
            # The kernel's state at this step, as rendered files, against verdict().
            files = {**rendered.files, "pf.conf": snap["main"], "ksbpf.anchor": anchor}
            assert snap["sysctl"]["net.inet.ip.check_interface"] == "1", "the strong host model before the anchor"
            out = compare(case, "macos", Rendered("macos", files, rendered.unsupported), first_only=True)
            assert not out.mismatches, (snap["argv"], out.mismatches)


def test_up_engages_and_status_reads_back_and_down_restores_what_up_found(mac) -> None:  # type: ignore[no-untyped-def]
    case = CASES["full-mapped"]
    plat, state_file = mac()
    before = standins.load(state_file)
    result = plat.up(case.policy, (GOLDEN / "policies" / "full-mapped.toml").read_text())
    assert result.steps == ["check", "check_interface", "anchor", "main", "enable", "states", "readback"]
    st = standins.load(state_file)
    assert st["enabled"] and len(st["refs"]) == 1 and st["states"] == 0
    assert st["anchors"]["ksbpf"] == render_pf(case.policy).files["ksbpf.anchor"]
    assert (plat.state_dir / "token").read_text().strip() == st["refs"][0]
    # The anchor went in before the main ruleset that calls it, and PF was enabled last.
    changes = [" ".join(c) for c in st["log"]]
    assert changes.index(f"pfctl -a ksbpf -f {plat.state_dir / 'anchor.conf'}") < changes.index(
        f"pfctl -f {plat.state_dir / 'main.conf'}") < changes.index("pfctl -E")
    check_every_step(case, st["journal"])
    layers, unsupported = plat.status()
    assert all(layer.engaged for layer in layers.values()), layers
    assert "as rendered" in layers["anchor"].detail and unsupported == []
    # /etc/pf.conf is read, never written.
    assert plat.pf_conf.read_text() == PF_CONF

    assert plat.down() == []
    after = standins.load(state_file)
    assert comparable(after) == comparable(before)
    assert not plat.state_dir.exists()
    layers, _ = plat.status()
    assert not any(layer.engaged for layer in layers.values())


def test_a_second_up_swaps_its_reference_and_leaves_the_main_ruleset(mac) -> None:  # type: ignore[no-untyped-def]
    case = CASES["full"]
    plat, state_file = mac()
    plat.up(case.policy, "")
    first = standins.load(state_file)
    plat.up(case.policy, "")
    st = standins.load(state_file)
    assert len(st["refs"]) == 1 and st["refs"] != first["refs"], "the old reference is released"
    assert not any(c[:2] == ["pfctl", "-f"] for c in st["log"][len(first["log"]):]), "the main ruleset calls the anchor already"
    assert plat.down() == []
    assert not standins.load(state_file)["enabled"]


def test_someone_elses_reference_keeps_pf_enabled_after_down(mac) -> None:  # type: ignore[no-untyped-def]
    plat, state_file = mac(enabled=True, refs=["42"])
    before = standins.load(state_file)
    plat.up(CASES["minimal"].policy, "")
    assert plat.down() == []
    after = standins.load(state_file)
    assert after["enabled"] and after["refs"] == ["42"]
    assert comparable(after) == comparable(before)


def _changes_of_a_clean_up(mac) -> int:  # type: ignore[no-untyped-def]
    plat, state_file = mac()
    plat.up(CASES["full-mapped"].policy, "")
    return int(standins.load(state_file)["calls"])


def test_a_failure_at_any_step_leaves_nothing_half_loaded_and_down_restores(mac) -> None:  # type: ignore[no-untyped-def]
    case = CASES["full-mapped"]
    n = _changes_of_a_clean_up(mac)
    assert n == 5  # sysctl -w, the anchor, the main ruleset, -E, -F states
    for fail_at in range(1, n + 1):
        plat, state_file = mac(fail_at=fail_at)
        shutil.rmtree(plat.state_dir, ignore_errors=True)
        before = standins.load(state_file)
        with pytest.raises(BackendError, match="step "):
            plat.up(case.policy, "")
        st = standins.load(state_file)
        check_every_step(case, st.get("journal", []))
        # Whatever is left is either not evaluated or the whole anchor; down gives back what up found.
        problems = plat.down()
        assert problems == [], (fail_at, problems)
        assert comparable(standins.load(state_file)) == comparable(before), fail_at


def test_status_notices_an_anchor_that_is_not_what_was_rendered(mac) -> None:  # type: ignore[no-untyped-def]
    import json

    plat, state_file = mac()
    plat.up(CASES["full"].policy, "")
    st = standins.load(state_file)
    st["anchors"]["ksbpf"] = "pass out quick all no state\n"  # someone loaded their own rules
    state_file.write_text(json.dumps(st))
    layers, _ = plat.status()
    assert not layers["anchor"].engaged and "NOT the" in layers["anchor"].detail
    st["main"] = PF_CONF  # and the main ruleset no longer calls the anchor
    state_file.write_text(json.dumps(st))
    layers, _ = plat.status()
    assert "does NOT call anchor ksbpf" in layers["anchor"].detail


def test_status_lists_what_the_applied_policy_cannot_do_on_macos(mac) -> None:  # type: ignore[no-untyped-def]
    plat, _ = mac()
    plat.up(CASES["full"].policy, (GOLDEN / "policies" / "full.toml").read_text())
    _, unsupported = plat.status()
    assert any(u.startswith("exempt[0].macos.user: not set") for u in unsupported), unsupported


def test_a_ruleset_pfctl_refuses_changes_nothing(mac) -> None:  # type: ignore[no-untyped-def]
    plat, state_file = mac()
    plat.pf_conf.write_text(PF_CONF + "pass out quick all keep state\n")  # the PF model refuses keep state
    with pytest.raises(BackendError, match="step check"):
        plat.up(CASES["full"].policy, "")
    assert "calls" not in standins.load(state_file)


def test_down_unloads_the_launchdaemon_first(mac, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    plat, state_file = mac(launchd=["org.ksbpf.pf"])
    plat.launchd_dir.mkdir()
    (plat.launchd_dir / "org.ksbpf.pf.plist").write_text(render_pf(CASES["full"].policy).files["org.ksbpf.pf.plist"])
    plat.up(CASES["full"].policy, "")
    n = len(standins.load(state_file)["log"])
    assert plat.down() == []
    log = standins.load(state_file)["log"][n:]
    assert log[0] == ["launchctl", "bootout", "system/org.ksbpf.pf"]
    assert standins.load(state_file)["launchd"] == []


# ------------------------------------------------------------------ the rendered scripts


def _sh(script: str, tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    f = tmp_path / "script.sh"
    f.write_text(script)
    return subprocess.run(["sh", str(f)], env=env, capture_output=True, text=True)


def test_load_sh_engages_changes_nothing_when_run_again_and_rollback_sh_restores(tmp_path: Path) -> None:
    case = CASES["full-mapped"]
    pf_conf = tmp_path / "pf.conf"
    pf_conf.write_text(PF_CONF)
    state_file = tmp_path / "standin.json"
    env = standins.install(tmp_path / "bin", state_file, initial(pf_conf, launchd=["org.ksbpf.pf"]))
    env["KSBPF_STATE_DIR"] = str(tmp_path / "state")
    files = render_pf(case.policy, pf_conf=PF_CONF).files
    before = standins.load(state_file)
    done = _sh(files["load.sh"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    st = standins.load(state_file)
    assert st["enabled"] and st["anchors"]["ksbpf"] == files["ksbpf.anchor"] and st["main"] == files["pf.conf"]
    check_every_step(case, st["journal"])
    # The LaunchDaemon runs it every minute: engaged as loaded, it changes nothing.
    again = _sh(files["load.sh"], tmp_path, env)
    assert again.returncode == 0, again.stderr
    assert standins.load(state_file)["calls"] == st["calls"]
    # Someone flushed the anchor: the next run loads it again.
    subprocess.run(["pfctl", "-a", "ksbpf", "-F", "rules"], env=env, check=True, capture_output=True)
    assert _sh(files["load.sh"], tmp_path, env).returncode == 0
    assert standins.load(state_file)["anchors"]["ksbpf"] == files["ksbpf.anchor"]
    rolled = _sh(files["rollback.sh"], tmp_path, env)
    assert rolled.returncode == 0, rolled.stderr
    after = standins.load(state_file)
    assert after["launchd"] == []
    assert comparable({**after, "launchd": ["org.ksbpf.pf"]}) == comparable(before)
    assert not (tmp_path / "state").exists()
