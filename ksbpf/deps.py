"""The Python modules and shared libraries ksbpf takes from Debian packages, and a clear
failure when one is missing: the package to install, not a traceback (nor, for ksbpfd
under Type=notify, a start timeout in a restart loop)."""

from __future__ import annotations

import ctypes
import importlib

from ksbpf.errors import KsbpfError

# top-level module -> the Debian package that provides it for /usr/bin/python3
DEBIAN_PACKAGES = {
    "nftables": "python3-nftables",
    "pyroute2": "python3-pyroute2",
    "bcc": "python3-bpfcc",
    "systemd": "python3-systemd",
    "prometheus_client": "python3-prometheus-client",
}
# shared library (soname) -> the Debian package that provides it
DEBIAN_LIBRARIES = {
    "libbpf.so.1": "libbpf1",
}


class MissingDependency(KsbpfError):
    """A Python module ksbpf needs cannot be imported, or a shared library (named by its
    soname) cannot be loaded: exit 5 (systemd's NOTINSTALLED)."""

    def __init__(self, module: str, detail: str = "", hint: str = "") -> None:
        self.module = module
        library = module in DEBIAN_LIBRARIES
        self.package = DEBIAN_LIBRARIES[module] if library else DEBIAN_PACKAGES.get(module.split(".")[0], "")
        install = f"install the Debian package {self.package}" if self.package else "install it"
        why = f" ({detail})" if detail else ""
        what = f"the library {module} cannot be loaded" if library else f"the Python module {module} cannot be imported"
        super().__init__(f"{what}{why}: {install}" + (f" {hint}" if hint else ""))


def from_import_error(e: ImportError) -> MissingDependency | None:
    """The MissingDependency an ImportError stands for, or None when it names no module of
    DEBIAN_PACKAGES (then it is a bug of ours, and its traceback is the right report)."""
    top = (e.name or "").split(".")[0]
    if top not in DEBIAN_PACKAGES:
        return None
    return MissingDependency(e.name or top, str(e))


def require(*modules: str, hint: str = "") -> None:
    """Import each module now, so that a missing one fails before anything is changed."""
    for module in modules:
        try:
            importlib.import_module(module)
        except (ImportError, OSError) as e:  # OSError: bcc finds no libbcc.so
            raise MissingDependency(module, str(e), hint) from None


def locate(module: str, hint: str = "") -> None:
    """Like require, without importing: for bcc, which only the BPF loader child imports
    (its libraries are large; the long-lived process never maps them)."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError) as e:
        raise MissingDependency(module, str(e), hint) from None
    if not found:
        raise MissingDependency(module, f"No module named {module!r}", hint)


def load_library(soname: str, hint: str = "") -> ctypes.CDLL:
    """dlopen a shared library of DEBIAN_LIBRARIES (errno kept for each call), or a
    MissingDependency naming its package."""
    try:
        return ctypes.CDLL(soname, use_errno=True)
    except OSError as e:
        raise MissingDependency(soname, str(e), hint) from None
