"""sysctl(8) stand-in: -n NAME prints a value, -w NAME=VALUE sets one; unknown names fail."""

from __future__ import annotations

import sys

from _state import Tool


def main(argv: list[str]) -> None:
    t = Tool("sysctl")
    values = t.state.setdefault("sysctl", {})
    if len(argv) == 2 and argv[0] == "-n":
        if argv[1] not in values:
            t.fail(f"sysctl: unknown oid '{argv[1]}'")
        print(values[argv[1]])
        return
    if len(argv) == 2 and argv[0] == "-w" and "=" in argv[1]:
        name, value = argv[1].split("=", 1)
        if name not in values:
            t.fail(f"sysctl: unknown oid '{name}'")
        t.change(argv)
        values[name] = value
        print(f"{name}: {value}")
        t.record(argv)
        return
    t.fail(f"sysctl: unmodelled arguments {argv}", 64)


if __name__ == "__main__":
    main(sys.argv[1:])
