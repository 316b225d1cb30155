"""The Debian package's maintainer scripts in a real Debian 12 root (not booted: systemd-nspawn
runs single commands in it, as a chroot would, with a network namespace of its own and
nothing in it): the install prepares the merged kernel header tree and enables nothing; the
/usr/src dpkg trigger and the kernel postinst hook prepare it again (a headers package
installed later), and a tree whose headers are gone is removed. The booted system (units,
upgrade, purge) is tests/kernel/test_boot.py's.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kernel.debian_root import (
    BootCgroup,
    OverlayRoot,
    archives_dir,
    base_root,
    nspawn_run,
    package_deb,
    skip_reason,
)

TREE = "/var/lib/ksbpf/kernel-headers"
STAMP = f"{TREE}/.ksbpf-headers"


@dataclass
class Installed:
    root: Path
    cgroup: BootCgroup
    output: str
    cache: Path

    def sh(self, script: str) -> tuple[int, str]:
        r = nspawn_run(self.root, self.cgroup, ["/bin/sh", "-c", script], network=False, timeout=600,
                       binds=(f"{self.cache}:/var/cache/apt/archives",))
        # nspawn's own notice about its propagation directory is no output of the script
        out = "\n".join(line for line in (r.stdout + r.stderr).splitlines() if "nspawn/propagate" not in line)
        return r.returncode, out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cgroup = BootCgroup(f"ksbpf-pkg-{secrets.token_hex(3)}")
    overlay: OverlayRoot | None = None
    try:
        overlay = OverlayRoot(base_root())
        deb = package_deb()
        shutil.copy(deb, overlay.path / "root" / deb.name)
        # The boot test's package cache, as hard links: apt locks its cache directory, and a
        # boot test running at the same time must not make this one wait (nor the reverse).
        cache = overlay.dir / "archives"
        shutil.copytree(archives_dir(), cache, copy_function=_link_or_copy, ignore=shutil.ignore_patterns("lock", "partial"))
        (cache / "partial").mkdir(exist_ok=True)
        binds = (f"{cache}:/var/cache/apt/archives",)
        argv = ["apt-get", "install", "-y", "-q", f"/root/{deb.name}"]
        # With the network only to fill the package cache (nothing is fetched once it holds everything).
        fetch = nspawn_run(overlay.path, cgroup, [*argv[:3], "--download-only", *argv[3:]], binds=binds, network=True)
        assert fetch.returncode == 0, fetch.stdout + fetch.stderr
        r = nspawn_run(overlay.path, cgroup, argv, binds=binds, network=False)
        assert r.returncode == 0, r.stdout + r.stderr
        yield Installed(overlay.path, cgroup, r.stdout + r.stderr, cache)
    finally:
        if overlay is not None:
            overlay.cleanup()
        cgroup.cleanup()


def test_install_prepares_headers_and_enables_nothing(installed: Installed) -> None:
    assert "ksbpf: kernel headers for BCC: /var/lib/ksbpf/kernel-headers" in installed.output, installed.output
    assert "nothing is enabled" in installed.output
    rc, out = installed.sh(f"cat {STAMP}; stat -c '%a %U' /var/lib/ksbpf; "
                           "systemctl is-enabled ksbpf.service ksbpf-lockdown.service")
    assert "common=/usr/src/linux-headers-" in out and "flavour=/usr/src/linux-headers-" in out, out
    assert "700 root" in out
    assert out.count("disabled") == 2, out
    # The installed package runs with Debian's python3 and checks the shipped example.
    rc, out = installed.sh("ksctl check --config /usr/share/doc/ksbpf/examples/policy.toml")
    assert rc == 0 and "valid" in out, out
    rc, out = installed.sh("bash -c 'source /usr/share/bash-completion/completions/ksctl && complete -p ksctl'")
    assert rc == 0 and "_ksctl" in out, out


def test_trigger_and_kernel_hook_prepare_the_tree_again(installed: Installed) -> None:
    rc, out = installed.sh(f"rm -rf {TREE}; dpkg-trigger --no-await /usr/src && dpkg --triggers-only --pending; "
                           f"cat {STAMP}")
    assert rc == 0 and "Processing triggers for ksbpf" in out and "release=" in out, out
    rc, out = installed.sh(f"rm -rf {TREE}; release=$(ls /usr/src | sed -n 's/^linux-headers-\\(.*-amd64\\)$/\\1/p' "
                           f"| head -n 1); run-parts --arg=\"$release\" /etc/kernel/postinst.d; cat {STAMP}")
    assert rc == 0 and "release=" in out, out


def test_headers_removed_the_tree_goes_and_nothing_fails(installed: Installed) -> None:
    rc, out = installed.sh("mkdir -p /root/src-away && mv /usr/src/linux-headers-* /root/src-away/ && "
                           "dpkg-trigger --no-await /usr/src && dpkg --triggers-only --pending; "
                           f"test -e {TREE} && echo TREE-LEFT; mv /root/src-away/* /usr/src/")
    assert rc == 0, out
    assert "no kernel header tree for BCC" in out and "TREE-LEFT" not in out, out
