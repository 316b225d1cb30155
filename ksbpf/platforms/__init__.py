"""ksctl on macOS and Windows: thin adapters that apply, remove and read back the PF and
Windows renderings with the platform's own tools (pfctl, sysctl, launchctl;
powershell.exe), called by name through PATH. Standard library only: nothing here or in
what it imports may need a Linux module (tests/unit/test_platforms.py runs every path
with them made unimportable)."""

from __future__ import annotations

import os
import sys

PLATFORMS = ("linux", "macos", "windows")


def current() -> str:
    """The platform ksctl works on: KSBPF_PLATFORM if set (tests), else from sys.platform."""
    forced = os.environ.get("KSBPF_PLATFORM")
    if forced:
        if forced not in PLATFORMS:
            raise ValueError(f"KSBPF_PLATFORM={forced!r}: one of {', '.join(PLATFORMS)}")
        return forced
    if sys.platform == "darwin":
        return "macos"
    if sys.platform == "win32":
        return "windows"
    return "linux"
