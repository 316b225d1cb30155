"""`ksctl lab up|down|demo`: what ksbpf.cli calls."""

from __future__ import annotations

from ksbpf.lab.addresses import DEFAULT_LAB, STATE_DIR
from ksbpf.lab.demo import demo
from ksbpf.lab.lab import Lab

__all__ = ["demo", "lab_down", "lab_up", "list_labs"]


def list_labs() -> list[str]:
    return sorted(p.stem for p in STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []


def lab_up(name: str | None = None, *, routed: bool = False) -> str:
    """`ksctl lab up`: build a lab that outlives this process, write its policy file, and
    return a description for a person (`Lab.load(name)` gives the object)."""
    lab = Lab.create(name or DEFAULT_LAB, routed=routed)
    (lab.state_dir / "policy.toml").write_text(lab.policy_toml())
    return lab.describe()


def lab_down(name: str | None = None) -> bool:
    """`ksctl lab down`: tear a lab down; False if there was none by that name."""
    name = name or DEFAULT_LAB
    if not Lab.state_file(name).exists():
        return False
    Lab.load(name).close()
    return True
