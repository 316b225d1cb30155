"""The policy core and renderers must not import kernel libraries (STYLE.md, rule 1)."""

import subprocess
import sys

PURE = ["ksbpf.policy", "ksbpf.verdict", "ksbpf.marks", "ksbpf.errors", "ksbpf.render.nft"]
KERNEL_LIBS = ["nftables", "pyroute2", "bcc"]


def test_pure_modules_do_not_import_kernel_libraries() -> None:
    code = (
        "import sys\n"
        f"for m in {PURE!r}:\n"
        "    __import__(m)\n"
        f"bad = [m for m in {KERNEL_LIBS!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"pure modules imported kernel libraries: {out}"
