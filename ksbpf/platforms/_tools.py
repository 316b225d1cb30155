"""Running the platform's tools by name (found through PATH) and keeping a state folder."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ksbpf.errors import BackendError


@dataclass(frozen=True)
class Layer:
    """One part of what a platform adapter engages, as `ksctl status` shows it."""

    engaged: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"engaged": self.engaged, "detail": self.detail}


def run(layer: str, argv: Sequence[str], *, stdin: str | None = None, check: bool = True,
        timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """argv[0] by name through PATH; a missing tool or (with check) a non-zero exit is a
    BackendError naming the command and what the tool said."""
    try:
        proc = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise BackendError(layer, f"{argv[0]} not found in PATH") from None
    except subprocess.TimeoutExpired:
        raise BackendError(layer, f"{' '.join(argv)} did not finish in {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise BackendError(layer, f"{' '.join(argv)} failed (exit {proc.returncode})" + (f": {said[-1]}" if said else ""))
    return proc


def write_private(path: Path, text: str) -> None:
    """Write `path` for its owner alone, replacing it whole (tmp + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def state_folder(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path
