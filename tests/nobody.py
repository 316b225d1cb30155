"""Running a test's child as nobody from a checkout other users cannot enter (a clone in
/root, mode 0700): neither the venv's python nor the checkout is reachable for it. Such a
child gets the interpreter the venv was made from (the venv has --system-site-packages, so
it sees the same Debian packages) and a world-readable copy of the package, laid out as
installed (ksbpf/bpf, ksbpf/nft)."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = os.path.realpath(sys.executable)


@functools.cache
def package_copy() -> str:
    """A directory for the child's PYTHONPATH; removed when the test run ends."""
    d = Path(tempfile.mkdtemp(prefix="ksbpf-nobody-"))
    atexit.register(shutil.rmtree, d, True)
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "ksbpf", d / "ksbpf", ignore=skip)
    shutil.copytree(REPO / "bpf", d / "ksbpf" / "bpf", ignore=skip, dirs_exist_ok=True)
    shutil.copytree(REPO / "nft", d / "ksbpf" / "nft", ignore=skip, dirs_exist_ok=True)
    for p in [d, *d.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return str(d)
