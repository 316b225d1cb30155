"""Stand-ins for the macOS and Windows tools (pfctl, sysctl, launchctl, powershell.exe):
small programs that hold state like the real tools, in a JSON file named by
$KSBPF_STANDIN_STATE, and fail where the real ones would. Tests put them first on PATH
(install()). Every call that changes something counts; $KSBPF_STANDIN_STATE's "fail_at" = N
makes the N-th such call fail, changing nothing, as a busy or refusing tool would. After
each change the state is appended to "journal", so a test can check every step."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOOLS = {"pfctl": "pfctl.py", "sysctl": "sysctl.py", "launchctl": "launchctl.py", "powershell.exe": "powershell.py"}


def install(bin_dir: Path, state_file: Path, state: dict[str, Any]) -> dict[str, str]:
    """Write the stand-ins into bin_dir and the initial state; return the environment to run
    them with (bin_dir first on PATH)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for tool, script in TOOLS.items():
        path = bin_dir / tool
        path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / script}" "$@"\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    state_file.write_text(json.dumps(state))
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env["KSBPF_STANDIN_STATE"] = str(state_file)
    return env


def load(state_file: Path) -> dict[str, Any]:
    return json.loads(state_file.read_text())  # type: ignore[no-any-return]
