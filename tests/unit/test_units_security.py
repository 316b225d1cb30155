"""systemd's own rating of the units' sandboxes (`systemd-analyze security --offline=yes`):
both stay at 2.5 or lower, so a change that widens a sandbox fails here and has to say why."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "units"
LIMIT = 2.5


def exposure(unit: Path) -> tuple[float, str]:
    r = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", r.stdout + r.stderr)
    assert m, f"no rating for {unit.name}:\n{r.stdout}\n{r.stderr}"
    return float(m.group(1)), r.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", ["ksbpf.service", "ksbpf-lockdown.service"])
def test_sandbox_exposure_stays_low(unit: str) -> None:
    score, report = exposure(UNITS / unit)
    failed = "\n".join(line for line in report.splitlines() if line.startswith("✗"))
    assert score <= LIMIT, f"{unit}: exposure {score} > {LIMIT}; what is open:\n{failed}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_rating_can_fail(tmp_path: Path) -> None:
    """The same unit without its system call filter and with every capability rates worse."""
    text = (UNITS / "ksbpf.service").read_text()
    loose = re.sub(r"^(SystemCallFilter|SystemCallErrorNumber|CapabilityBoundingSet|ProtectProc|IPAddress\w+)=.*\n",
                   "", text, flags=re.M)
    (tmp_path / "ksbpf.service").write_text(loose)
    assert exposure(tmp_path / "ksbpf.service")[0] > LIMIT


def test_every_setting_left_off_says_why() -> None:
    """The sandbox options the daemon cannot have are named in a comment with the reason."""
    text = (UNITS / "ksbpf.service").read_text()
    for option in ("ProtectKernelTunables", "ProtectKernelModules", "MemoryDenyWriteExecute", "PrivateNetwork",
                   "PrivateUsers", "ProcSubset"):
        assert re.search(rf"^# Not [^\n]*\b{option}\b[^\n]*:", text, re.M), f"{option}: off without a reason"
