"""Reading a policy file the kill switch may trust: one that only root can write (the
file, checked on what was opened, and every directory above it), with a kernel header
tree (`[bpf] kernel_source`) held to the same rule. ksbpfd, `ksctl up` and `ksctl check`
read the policy through here; ksbpf.policy parses what was read."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ksbpf.errors import PolicyError
from ksbpf.policy import Policy, PolicyParser, loads_policy

MAX_POLICY_BYTES = 16 << 20


def check_policy_file_mode(st: os.stat_result, path: Path) -> None:
    """Only root may be able to change what the kill switch enforces."""
    if st.st_uid != 0:
        raise PolicyError(f"owned by uid {st.st_uid}; the policy must be owned by root", source=str(path))
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PolicyError(
            f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); chmod go-w it", source=str(path)
        )


def check_policy_dir_mode(st: os.stat_result, path: Path, directory: Path | None = None) -> None:
    """Whoever can write a directory on the way can replace what is below it (unless it is
    sticky, as /tmp is: then only the owner of an entry may rename it)."""
    where = directory if directory is not None else path.parent
    if st.st_uid != 0:
        raise PolicyError(f"its directory {where} is owned by uid {st.st_uid}, not root", source=str(path))
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise PolicyError(
            f"its directory {where} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
            source=str(path),
        )


def check_ancestors(real: Path, path: Path) -> None:
    """Every directory from `real` (a resolved directory) up to / is root's alone."""
    for d in (real, *real.parents):
        check_policy_dir_mode(os.stat(d), path, d)


def check_kernel_source(tree: str, path: Path) -> None:
    """A header tree anyone but root can write would be compiled into a program loaded as
    root: the tree, everything in it, and the directories above it must be root's alone."""
    real = Path(os.path.realpath(tree))
    if not real.exists():
        return  # nothing to compile from: the BPF layer reports missing headers, the others enforce
    try:
        check_ancestors(real, path)
        for dirpath, dirnames, filenames in os.walk(real):
            for name in (*dirnames, *filenames):
                entry = os.path.join(dirpath, name)
                st = os.lstat(entry)
                if stat.S_ISLNK(st.st_mode):
                    continue  # a symlink's own mode means nothing; its target is walked or checked where it lies
                if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                    raise PolicyError(f"{entry} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}: "
                                      "only root may be able to write the headers compiled into the BPF programs",
                                      source=str(path), key="bpf.kernel_source")
    except PolicyError as e:
        if e.key == "bpf.kernel_source":
            raise
        raise PolicyError(f"kernel_source {tree}: {e.reason}", source=str(path), key="bpf.kernel_source") from None
    except OSError as e:
        raise PolicyError(f"kernel_source {tree}: {e.strerror}", source=str(path), key="bpf.kernel_source") from None


def read_policy_file(path: str | Path, parser: PolicyParser | None = None) -> tuple[Policy, str]:
    """Read and validate a policy file once, refusing one that anyone but root could write
    (the file, checked on what was opened, and every directory above it). Returns the policy
    and the exact text it was parsed from, which is what gets recorded as applied. `parser`:
    the daemon's, which re-parses only what changed since the last read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise PolicyError(f"cannot read: {e.strerror}", source=str(path)) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PolicyError("not a regular file", source=str(path))
        check_policy_file_mode(st, path)
        data = f.read(MAX_POLICY_BYTES + 1)
    try:
        check_ancestors(Path(os.path.realpath(path)).parent, path)
    except OSError as e:
        raise PolicyError(f"cannot check its directories: {e.strerror}", source=str(path)) from None
    if len(data) > MAX_POLICY_BYTES:
        raise PolicyError(f"larger than {MAX_POLICY_BYTES} bytes", source=str(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError("not UTF-8 text", source=str(path)) from None
    policy = parser.loads(text, str(path)) if parser is not None else loads_policy(text, str(path))
    if policy.bpf.kernel_source:
        check_kernel_source(policy.bpf.kernel_source, path)
    return policy, text
