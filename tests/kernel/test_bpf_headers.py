"""Header trees against the real BCC: a tree prepare_headers merges from Debian's split
packages compiles the programs; a wrong setting is reported with the fix."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ksbpf.linux import headers
from ksbpf.linux.bpf import environment as bpf_env

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF needs root"),
    pytest.mark.skipif(not headers.debian_header_pairs(), reason="no Debian linux-headers-*-common/-flavour installed"),
]


def test_prepared_tree_compiles_and_loads_the_programs(tmp_path: Path) -> None:
    tree = tmp_path / "kernel-headers"
    report = bpf_env.doctor(str(tree), prepare=tree)
    assert report.ok, str(report)
    assert report.source is not None and report.source.path == tree
    names = [c.name for c in report.checks]
    assert "prepare headers" in names and "compile + verifier" in names


def test_a_wrong_setting_fails_with_the_reason_and_the_fix(tmp_path: Path) -> None:
    report = bpf_env.doctor(str(tmp_path / "typo"))
    assert not report.ok
    text = str(report)
    assert "typo" in text and "--prepare-headers" in text and "nftables and routing still enforce" in text
    assert "compile + verifier" not in [c.name for c in report.checks]


@pytest.mark.skipif(headers.find_kernel_source() is None, reason="no header tree configured on this host")
def test_doctor_checks_for_the_cli() -> None:
    checks = bpf_env.doctor_checks(None)
    assert [name for name, _, _ in checks][-1] == "compile + verifier"
    assert all(isinstance(ok, bool) for _, ok, _ in checks)
