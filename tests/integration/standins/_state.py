"""The state file the stand-ins share, and the fail-at-step-N switch."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.unit import pfparse, winparse  # noqa: E402 - after the repository is on sys.path

__all__ = ["Tool", "pfparse", "winparse"]


class Tool:
    def __init__(self, name: str) -> None:
        self.name = name
        self.path = Path(os.environ["KSBPF_STANDIN_STATE"])
        self.state: dict[str, Any] = json.loads(self.path.read_text())

    def change(self, argv: list[str]) -> None:
        """Count a call that changes something; the fail_at-th one fails (exit 1, nothing changed)."""
        self.state["calls"] = self.state.get("calls", 0) + 1
        self.state.setdefault("log", []).append([self.name, *argv])
        if self.state.get("fail_at") == self.state["calls"]:
            self.save()
            self.fail(f"{self.name}: the call failed (injected at change {self.state['calls']})")

    def record(self, argv: list[str]) -> None:
        snap = {k: copy.deepcopy(v) for k, v in self.state.items() if k not in ("journal", "log")}
        snap["argv"] = [self.name, *argv]
        self.state.setdefault("journal", []).append(snap)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.state))
        os.replace(tmp, self.path)

    def fail(self, message: str, code: int = 1) -> None:
        print(message, file=sys.stderr)
        sys.exit(code)
