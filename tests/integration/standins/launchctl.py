"""launchctl(1) stand-in: bootout system/LABEL unloads a loaded job (else exit 3, as launchctl does)."""

from __future__ import annotations

import sys

from _state import Tool


def main(argv: list[str]) -> None:
    t = Tool("launchctl")
    jobs = t.state.setdefault("launchd", [])
    if len(argv) == 2 and argv[0] == "bootout" and argv[1].startswith("system/"):
        t.change(argv)
        label = argv[1].removeprefix("system/")
        if label not in jobs:
            t.fail(f"Boot-out failed: 3: No such process ({label})", 3)
        jobs.remove(label)
        t.record(argv)
        return
    t.fail(f"launchctl: unmodelled arguments {argv}", 64)


if __name__ == "__main__":
    main(sys.argv[1:])
