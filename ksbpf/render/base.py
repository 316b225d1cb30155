"""What every renderer returns: the rendered artefact plus what it could not express."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Unsupported:
    """A policy feature the platform cannot express, and why. Never dropped quietly."""

    feature: str  # a policy key path, e.g. "exempt[0].cgroup"
    reason: str

    def __str__(self) -> str:
        return f"{self.feature}: {self.reason}"


@dataclass(frozen=True)
class Rendered:
    platform: str
    # name -> text (e.g. "anchor", "load", "rollback"); the Linux renderer gives JSON text.
    files: dict[str, str]
    unsupported: tuple[Unsupported, ...] = field(default_factory=tuple)
