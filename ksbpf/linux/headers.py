"""Kernel header trees for BCC: find one, prepare one, and say plainly why BCC cannot compile.

BCC compiles `bpf/*.c` against kernel headers at load time. Where to look, in order:

1. the policy's `[bpf] kernel_source` (or an explicit argument),
2. `BCC_KERNEL_SOURCE` in the environment,
3. `/lib/modules/$(uname -r)/build` (BCC's own default; it handles Debian's split
   `build`/`source` pair there by itself),
4. the tree `ksctl doctor --prepare-headers` builds, `/var/lib/ksbpf/kernel-headers`.

Debian ships headers in two halves, `linux-headers-VER-common` (the sources) and
`linux-headers-VER-amd64` (generated files and .config); BCC_KERNEL_SOURCE names one
directory, so `prepare_headers` merges the halves into one tree of symlinks. The programs
only use stable UAPI, so headers of another kernel version compile correct programs for
cgroup_skb and cgroup/sock; `doctor` (ksbpf.linux.bpf.environment) still says when the
versions differ.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_HEADERS_DIR = Path("/var/lib/ksbpf/kernel-headers")
DEBIAN_HEADERS_ROOT = Path("/usr/src")
ENV_VAR = "BCC_KERNEL_SOURCE"
STAMP = ".ksbpf-headers"

_DEBIAN_COMMON_RE = re.compile(r"^linux-headers-(?P<version>.+)-common$")
_UTS_RE = re.compile(r'#define\s+UTS_RELEASE\s+"(?P<release>[^"]+)"')


@dataclass(frozen=True)
class KernelSource:
    """A header tree BCC can compile against, and where the choice came from."""

    path: Path
    origin: str
    release: str | None  # the kernel the headers belong to, from utsrelease.h

    @property
    def env(self) -> dict[str, str]:
        """Environment for the compiling process. BCC's own default needs none."""
        return {} if self.origin == "running kernel" else {ENV_VAR: str(self.path)}

    def __str__(self) -> str:
        return str(self.path)

    def describe(self) -> str:
        rel = f" ({self.release})" if self.release else ""
        return f"{self.path}{rel} from {self.origin}"


@dataclass
class Lookup:
    """The result of `resolve_kernel_source`: the chosen tree, or every reason none fits."""

    source: KernelSource | None
    rejected: list[str] = field(default_factory=list)

    def explain(self) -> str:
        if self.source is not None:
            return self.source.describe()
        if not self.rejected:
            return "no kernel header tree found"
        return "no usable kernel header tree: " + "; ".join(self.rejected)


def kernel_release() -> str:
    return os.uname().release


def _arch() -> str:
    machine = os.uname().machine
    return {"x86_64": "x86", "i686": "x86", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "powerpc",
            "s390x": "s390", "riscv64": "riscv"}.get(machine, machine)


def tree_release(path: Path) -> str | None:
    try:
        text = (path / "include/generated/utsrelease.h").read_text(errors="replace")
    except OSError:
        return None
    m = _UTS_RE.search(text)
    return m.group("release") if m else None


def tree_problem(path: Path) -> str | None:
    """Why BCC cannot compile against `path`, or None if it looks complete."""
    if not path.is_dir():
        return f"{path} is not a directory"
    if not (path / "include/linux/kconfig.h").is_file():
        if (path / "include/generated/autoconf.h").is_file():
            return (f"{path} has only generated headers (Debian's -{_flavour_hint(path)} half): "
                    "merge it with the -common half, e.g. `ksctl doctor --prepare-headers DIR`")
        return f"{path} has no include/linux/kconfig.h (not a kernel header tree)"
    if not (path / "include/generated/autoconf.h").is_file():
        return (f"{path} has no include/generated/autoconf.h (Debian's -common half alone?): "
                "merge it with the flavour half, e.g. `ksctl doctor --prepare-headers DIR`")
    if not (path / "arch" / _arch() / "include").is_dir():
        return f"{path} has no arch/{_arch()}/include"
    return None


def _flavour_hint(path: Path) -> str:
    name = path.resolve().name
    return name.rsplit("-", 1)[-1] if "-" in name else "flavour"


def _running_kernel_tree(release: str) -> Path:
    return Path("/lib/modules") / release / "build"


def resolve_kernel_source(
    setting: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    release: str | None = None,
    prepared: Path = DEFAULT_HEADERS_DIR,
) -> Lookup:
    """Pick the header tree BCC should use (see the module docstring for the order).

    An explicit setting that does not work is not silently skipped: it is the answer's
    only candidate, so the operator learns their setting is wrong.
    """
    environ = os.environ if env is None else env
    release = release or kernel_release()
    rejected: list[str] = []
    candidates: list[tuple[Path, str]] = []
    if setting:
        candidates.append((Path(setting), "[bpf] kernel_source"))
    elif environ.get(ENV_VAR):
        candidates.append((Path(environ[ENV_VAR]), ENV_VAR))
    else:
        candidates.append((_running_kernel_tree(release), "running kernel"))
        candidates.append((prepared, "prepared tree"))
    for path, origin in candidates:
        if origin == "running kernel":
            # BCC itself pairs /lib/modules/R/build with .../source (Debian's split halves).
            problem = _running_tree_problem(path)
        else:
            problem = tree_problem(path)
        if problem is None:
            return Lookup(KernelSource(path, origin, tree_release(path) or _release_of_build(path)), rejected)
        rejected.append(f"{origin}: {problem}")
    return Lookup(None, rejected)


def _running_tree_problem(build: Path) -> str | None:
    if not build.exists():
        return f"{build} does not exist (no headers installed for the running kernel)"
    if tree_problem(build) is None:
        return None
    source = build.parent / "source"
    if source.is_dir() and (source / "include/linux/kconfig.h").is_file() and (
        build / "include/generated/autoconf.h"
    ).is_file():
        return None
    return tree_problem(build)


def _release_of_build(path: Path) -> str | None:
    return tree_release(path) or (path.parent.name if path.name == "build" else None)


def find_kernel_source(
    setting: str | None = None, *, env: Mapping[str, str] | None = None, release: str | None = None
) -> KernelSource | None:
    """The header tree to compile against (the policy's [bpf] kernel_source first), or
    None; `resolve_kernel_source` says why not."""
    return resolve_kernel_source(setting, env=env, release=release).source


# --------------------------------------------------------------------------- preparing


@dataclass(frozen=True)
class DebianHeaders:
    version: str  # e.g. 6.1.0-56
    common: Path
    flavour: Path  # e.g. .../linux-headers-6.1.0-56-amd64

    @property
    def release(self) -> str:
        return f"{self.version}-{self.flavour.name.rsplit('-', 1)[-1]}"


def _version_key(version: str) -> tuple[int | str, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.-]", version))


def debian_header_pairs(root: Path = DEBIAN_HEADERS_ROOT) -> list[DebianHeaders]:
    """Installed Debian -common/-flavour header pairs, newest first."""
    pairs: list[DebianHeaders] = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    for common in entries:
        m = _DEBIAN_COMMON_RE.match(common.name)
        if not m or not common.is_dir():
            continue
        version = m.group("version")
        for flavour in entries:
            if (
                flavour != common
                and flavour.name.startswith(f"linux-headers-{version}-")
                and flavour.is_dir()
                and (flavour / "include/generated/autoconf.h").is_file()
            ):
                pairs.append(DebianHeaders(version, common, flavour))
    pairs.sort(key=lambda p: _version_key(p.version), reverse=True)
    return pairs


def _mirror(src: Path, dest: Path) -> None:
    """Overlay `src` onto `dest` as a tree of absolute symlinks (cp -rs, but with symlinks
    inside `src`, e.g. Debian's relative `scripts` link, resolved so they stay valid)."""
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        target_dir = dest / rel
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in list(dirnames):
            p = Path(dirpath) / name
            if p.is_symlink():
                dirnames.remove(name)
                _link(p.resolve(), target_dir / name)
        for name in filenames:
            _link((Path(dirpath) / name).resolve(), target_dir / name)


def _link(target: Path, at: Path) -> None:
    if at.is_symlink() or at.is_file():
        at.unlink()
    elif at.is_dir():
        shutil.rmtree(at)
    at.symlink_to(target)


def prepare_headers(
    dest: Path | str = DEFAULT_HEADERS_DIR,
    *,
    release: str | None = None,
    root: Path = DEBIAN_HEADERS_ROOT,
) -> KernelSource:
    """Build one merged header tree at `dest` from Debian's split halves and return it.

    Picks the pair for the running kernel if installed, else the newest. The tree is built
    next to `dest` and renamed into place, so a reader never sees half a tree.
    Raises FileNotFoundError (naming the package to install) when no pair is installed.
    """
    dest = Path(dest)
    release = release or kernel_release()
    pairs = debian_header_pairs(root)
    if not pairs:
        raise FileNotFoundError(
            f"no Debian kernel headers under {root} (install linux-headers-amd64 or "
            f"linux-headers-{release})"
        )
    pair = next((p for p in pairs if p.release == release), pairs[0])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        _mirror(pair.common, tmp)
        _mirror(pair.flavour, tmp)
        (tmp / STAMP).write_text(f"common={pair.common}\nflavour={pair.flavour}\nrelease={pair.release}\n")
        problem = tree_problem(tmp)
        if problem:
            raise FileNotFoundError(f"merged {pair.common.name} and {pair.flavour.name}, but: {problem}")
        old = None
        if dest.exists() or dest.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old.", dir=dest.parent))
            os.rename(dest, old / "tree")
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return KernelSource(dest, "prepared tree", tree_release(dest) or pair.release)


# --------------------------------------------------------------------------- doctor
# The report ksbpf.linux.bpf.environment.doctor() fills (it needs the BPF layer; this
# module does not).


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class DoctorReport:
    checks: list[Check] = field(default_factory=list)
    source: KernelSource | None = None

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    def __str__(self) -> str:
        lines = [f"{'ok  ' if c.ok else 'FAIL'}  {c.name}: {c.detail}" for c in self.checks]
        if self.ok:
            lines.append("=> BCC can compile and load the ksbpf programs here.")
        else:
            failed = next(c for c in self.checks if not c.ok)
            lines.append(f"=> BCC cannot compile the ksbpf programs here: {failed.name}: {failed.detail}")
            lines.append("   nftables and routing still enforce; the BPF layer stays off until this is fixed.")
        return "\n".join(lines)
