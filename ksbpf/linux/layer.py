"""What every Linux layer reports, and the shape the engine drives.

The engine drives three layers in this order: nftables, routing, BPF. Each implements
`Layer`; the conformance is checked by mypy where each layer is defined (a module-level
`type[Layer]` assignment), so a layer that drifts from the Protocol fails `mypy`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple, Protocol

from ksbpf.policy import Policy


class LayerName(StrEnum):
    """The layers, in the order `up` engages them. A str: status keys and JSON stay
    "nftables", "routing", "bpf"."""

    NFTABLES = "nftables"
    ROUTING = "routing"
    BPF = "bpf"


class LayerStatus(NamedTuple):
    """(engaged, detail): a tuple, so `engaged, detail = layer.status()` reads it too."""

    engaged: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"engaged": self.engaged, "detail": self.detail}


class Layer(Protocol):
    """What the engine calls on every layer. A layer's own extras (exemption changes,
    tunnel following, counters) are called on its concrete type."""

    @property
    def name(self) -> LayerName: ...

    def is_supported(self) -> tuple[bool, str]:
        """(usable here, why): the library or kernel features the layer needs."""
        ...

    def apply(self, policy: Policy) -> object:
        """Enforce `policy`, idempotently; raises BackendError when the layer refused it.
        What it returns is the layer's own account (the BPF layer's ApplyStats); the
        engine reads status() instead."""
        ...

    def reset(self) -> None:
        """Remove everything the layer put in place (only `down` calls it)."""
        ...

    def status(self) -> LayerStatus:
        """The layer's own check of everything apply() puts in place."""
        ...
