"""pfctl(8) stand-in holding PF's state: enabled or not and the enable references (tokens),
the main ruleset, the anchors' rules, the state table. Rulesets are read with the test PF
model (tests/unit/pfparse.py), which refuses syntax it does not know, as pfctl refuses
syntax errors: nothing is loaded then. Each -f replaces the main ruleset or one anchor
whole, as pfctl's transactions do. Listing (-s rules, -n -v) prints one rule per line,
macros expanded; `anchor "x"` prints as `anchor "x" all`.

Modelled: -n, -v, -a ANCHOR, -f FILE|-, -E, -X TOKEN, -F rules|states, -s info|rules.
"""

from __future__ import annotations

import sys

from _state import Tool, pfparse


def listing(text: str) -> list[str]:
    rules = []
    for r in pfparse.parse(text).rules:
        line = " ".join(r.text.split())
        rules.append(f"{line} all" if r.anchor is not None else line)
    return rules


def main(argv: list[str]) -> None:
    t = Tool("pfctl")
    st = t.state
    opts: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-n", "-v", "-E"):
            opts[a] = True
        elif a in ("-a", "-f", "-X", "-F", "-s") and i + 1 < len(argv):
            opts[a] = argv[i + 1]
            i += 1
        else:
            t.fail(f"pfctl: unmodelled argument {a!r}", 64)
        i += 1
    anchor = opts.get("-a")
    if "-s" in opts:
        what = opts["-s"]
        if what == "info":
            print(f"Status: {'Enabled' if st['enabled'] else 'Disabled'} for 0 days 00:00:01           Debug: Urgent")
        elif what == "rules":
            text = st["anchors"].get(anchor, "") if anchor else st["main"]
            print("\n".join(listing(text)))
        else:
            t.fail(f"pfctl: unmodelled -s {what}", 64)
        return
    if "-f" in opts:
        src = str(opts["-f"])
        path = st.get("paths", {}).get(src, src)  # the test's stand-in for /etc/pf.conf
        try:
            text = sys.stdin.read() if src == "-" else open(path, encoding="utf-8").read()
        except OSError as e:
            t.fail(f"pfctl: {src}: {e.strerror}")
        try:
            rules = listing(text)
        except (pfparse.PfSyntaxError, ValueError, IndexError) as e:
            t.fail(f"{src}: syntax error: {e}\npfctl: Syntax error in config file: pf rules not loaded")
        if "-v" in opts:
            print("\n".join(rules))
        if "-n" in opts:
            return
        t.change(argv)
        if anchor:
            st["anchors"][anchor] = text
        else:
            st["main"] = text
        t.record(argv)
        return
    if "-E" in opts:
        t.change(argv)
        token = str(st["next_token"])
        st["next_token"] += 1
        st["refs"].append(token)
        was = st["enabled"]
        st["enabled"] = True
        print(("pf already enabled" if was else "pf enabled") + f"\nToken : {token}", file=sys.stderr)
        t.record(argv)
        return
    if "-X" in opts:
        t.change(argv)
        token = str(opts["-X"])
        if token not in st["refs"]:
            t.fail("pfctl: DIOCSTOPREF: No such file or directory")
        st["refs"].remove(token)
        if not st["refs"]:
            st["enabled"] = False
            print("pf disabled", file=sys.stderr)
        t.record(argv)
        return
    if "-F" in opts:
        t.change(argv)
        if opts["-F"] == "states":
            print(f"{st['states']} states cleared", file=sys.stderr)
            st["states"] = 0
        elif opts["-F"] == "rules":
            if anchor:
                st["anchors"].pop(anchor, None)  # PF removes an emptied anchor nothing calls
            else:
                st["main"] = ""
            print("rules cleared", file=sys.stderr)
        else:
            t.fail(f"pfctl: unmodelled -F {opts['-F']}", 64)
        t.record(argv)
        return
    t.fail(f"pfctl: unmodelled arguments {argv}", 64)


if __name__ == "__main__":
    main(sys.argv[1:])
