"""What every Linux layer reports, and the shape the engine drives."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ksbpf.policy import Policy


@dataclass(frozen=True)
class LayerStatus:
    engaged: bool
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {"engaged": self.engaged, "detail": self.detail}


class Layer(Protocol):
    name: str

    def is_supported(self) -> tuple[bool, str]: ...

    def apply(self, policy: Policy) -> None: ...

    def reset(self) -> None: ...

    def status(self) -> LayerStatus: ...
