"""Finding and preparing kernel header trees, on fake trees in tmp_path (no root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ksbpf.linux import headers
from ksbpf.linux.headers import ENV_VAR

ARCH = headers._arch()


def fake_debian(root: Path, version: str = "6.1.0-56", flavour: str = "amd64") -> tuple[Path, Path]:
    common = root / f"linux-headers-{version}-common"
    flav = root / f"linux-headers-{version}-{flavour}"
    kbuild = root / "lib" / "kbuild-scripts"
    kbuild.mkdir(parents=True, exist_ok=True)
    (common / "include/linux").mkdir(parents=True)
    (common / "include/linux/kconfig.h").write_text("/* kconfig */\n")
    (common / f"arch/{ARCH}/include/asm").mkdir(parents=True)
    (common / f"arch/{ARCH}/include/asm/page.h").write_text("")
    (common / "Makefile").write_text("common\n")
    (flav / "include/generated").mkdir(parents=True)
    (flav / "include/generated/autoconf.h").write_text("#define CONFIG_X 1\n")
    (flav / "include/generated/utsrelease.h").write_text(f'#define UTS_RELEASE "{version}-{flavour}"\n')
    (flav / f"arch/{ARCH}/include/generated").mkdir(parents=True)
    (flav / "Makefile").write_text("flavour\n")
    # Debian's relative links, valid only where the package put them.
    rel = os.path.relpath(kbuild, common)
    (common / "scripts").symlink_to(rel)
    (flav / "scripts").symlink_to(os.path.relpath(kbuild, flav))
    return common, flav


def test_prepare_merges_the_split_halves(tmp_path: Path) -> None:
    src = tmp_path / "usr-src"
    fake_debian(src)
    fake_debian(src, "5.10.0-9")
    dest = tmp_path / "var" / "kernel-headers"
    ks = headers.prepare_headers(dest, release="6.18.0-other", root=src)
    assert ks.path == dest and ks.release == "6.1.0-56-amd64" and ks.origin == "prepared tree"
    assert headers.tree_problem(dest) is None
    # The flavour's files win where both have one (cp -rsf order); links are absolute.
    assert (dest / "Makefile").read_text() == "flavour\n"
    assert (dest / "scripts").resolve() == (src / "lib/kbuild-scripts").resolve()
    assert os.path.isabs(os.readlink(dest / "include/linux/kconfig.h"))
    assert "release=6.1.0-56-amd64" in (dest / headers.STAMP).read_text()
    # Again: replaced in place, nothing left beside it.
    headers.prepare_headers(dest, release="5.10.0-9-amd64", root=src)
    assert headers.tree_release(dest) == "5.10.0-9-amd64"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["kernel-headers"]


def test_prepare_without_debian_headers_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="linux-headers-amd64"):
        headers.prepare_headers(tmp_path / "dest", root=tmp_path / "empty")


def test_the_split_halves_alone_are_refused_with_the_fix(tmp_path: Path) -> None:
    common, flav = fake_debian(tmp_path)
    assert "Debian's -amd64 half" in (headers.tree_problem(flav) or "")
    assert "--prepare-headers" in (headers.tree_problem(flav) or "")
    assert "autoconf.h" in (headers.tree_problem(common) or "")
    assert "not a directory" in (headers.tree_problem(tmp_path / "nope") or "")


def test_resolution_order(tmp_path: Path) -> None:
    src = tmp_path / "src"
    fake_debian(src)
    good_a = headers.prepare_headers(tmp_path / "a", root=src).path
    good_b = headers.prepare_headers(tmp_path / "b", root=src).path
    prepared = headers.prepare_headers(tmp_path / "prepared", root=src).path
    kw = {"release": "0.0.0-nonexistent", "prepared": prepared}

    # The policy's setting first, then BCC_KERNEL_SOURCE, then the prepared tree.
    got = headers.resolve_kernel_source(str(good_a), env={ENV_VAR: str(good_b)}, **kw)  # type: ignore[arg-type]
    assert got.source is not None and got.source.path == good_a and got.source.origin == "[bpf] kernel_source"
    assert got.source.env == {ENV_VAR: str(good_a)}
    got = headers.resolve_kernel_source(None, env={ENV_VAR: str(good_b)}, **kw)  # type: ignore[arg-type]
    assert got.source is not None and got.source.path == good_b and got.source.origin == ENV_VAR
    got = headers.resolve_kernel_source(None, env={}, **kw)  # type: ignore[arg-type]
    assert got.source is not None and got.source.path == prepared and got.source.origin == "prepared tree"
    assert "no headers installed for the running kernel" in got.rejected[0]


def test_a_broken_setting_is_reported_not_skipped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    fake_debian(src)
    prepared = headers.prepare_headers(tmp_path / "prepared", root=src).path
    got = headers.resolve_kernel_source(str(tmp_path / "typo"), env={}, release="x", prepared=prepared)
    assert got.source is None
    assert "[bpf] kernel_source" in got.explain() and "typo" in got.explain()


def test_nothing_found_explains_every_candidate(tmp_path: Path) -> None:
    got = headers.resolve_kernel_source(None, env={}, release="0.0-none", prepared=tmp_path / "none")
    assert got.source is None
    text = got.explain()
    assert "/lib/modules/0.0-none/build" in text and str(tmp_path / "none") in text
    assert headers.find_kernel_source(None, env={ENV_VAR: str(tmp_path / "none")}) is None


def test_debian_pairs_newest_first(tmp_path: Path) -> None:
    fake_debian(tmp_path, "5.10.0-9")
    fake_debian(tmp_path, "6.1.0-56")
    fake_debian(tmp_path, "6.1.0-100")
    assert [p.version for p in headers.debian_header_pairs(tmp_path)] == ["6.1.0-100", "6.1.0-56", "5.10.0-9"]
    assert headers.debian_header_pairs(tmp_path)[0].release == "6.1.0-100-amd64"


def test_doctor_report_text() -> None:
    r = headers.DoctorReport()
    r.add("kernel", True, "6.18")
    assert "BCC can compile" in str(r)
    r.add("kernel headers", False, "none found")
    assert not r.ok and "cannot compile" in str(r) and "kernel headers: none found" in str(r)
    assert "nftables and routing still enforce" in str(r)
