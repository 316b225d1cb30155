"""Writes the generated boot lockdown (ksbpf.render.lockdown) to <state dir>/lockdown.nft,
where units/ksbpf-lockdown.service loads it at the next boot.

Written on every successful apply (`ksctl up`, ksbpfd's start and reload) and by
`ksctl check --write-lockdown`. Atomically (temporary file, fsync, rename; mode 0600): a
boot never sees half a file, and one that does not load makes the unit fall back to the
static lockdown. A failure to write is logged and never fails the apply that asked for it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ksbpf.policy import Policy
from ksbpf.render.lockdown import listen_exemptions, render_lockdown

FILENAME = "lockdown.nft"
log = logging.getLogger("ksbpf.lockdown")


def lockdown_path(state_dir: Path) -> Path:
    return Path(state_dir) / FILENAME


def write_lockdown(policy: Policy | None, state_dir: Path) -> Path:
    """Render and write; raises OSError or ValueError (a policy the renderer refuses)."""
    text = render_lockdown(policy)
    path = lockdown_path(state_dir)
    try:
        if path.read_text(encoding="ascii") == text:  # a reload that changed no admin exemption
            os.chmod(path, 0o600)
            return path
    except (OSError, UnicodeDecodeError):
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{FILENAME}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode does not apply to a leftover tmp
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # the rename itself must survive a power cut before the next boot
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def write_lockdown_logged(policy: Policy | None, state_dir: Path) -> Path | None:
    """write_lockdown for an apply path: logs, never raises."""
    try:
        path = write_lockdown(policy, state_dir)
    except (OSError, ValueError) as e:
        log.error("boot lockdown %s not written: %s (the previous one, or the static one, stays in use)",
                  lockdown_path(state_dir), e)
        return None
    n = len(listen_exemptions(policy))
    log.info("boot lockdown written to %s (%s)", path,
             f"{n} inbound admin exemption(s) open" if n else "loopback only: the policy has no listen exemptions")
    return path
