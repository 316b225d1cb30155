"""powershell.exe stand-in for the scripts ksbpf renders (apply.ps1, rollback.ps1, the
status query), holding Windows Defender Firewall's state: the profiles' settings, the rules
(ksbpf's, the local store's own, group policy's), the adapters and their metrics, the
%ProgramData%\\ksbpf state folder with its owner and files, the scheduled task.

It runs a script statement by statement (a statement: lines up to balanced brackets),
each matched against the statements this model knows; one it does not know is refused
(exit 64), so the script cannot grow an effect the model does not account for. Function
definitions (the state folder's ACL guard) are read as definitions; their calls are
modelled: a folder that exists with an owner other than SYSTEM or Administrators is
refused, as Test-KsbpfOwned refuses it. Errors: under $ErrorActionPreference = 'Stop' the
first failing call ends the script (exit 1); in a `try { } catch { }` the catch runs and the
script goes on. Every call that changes the firewall or the folder counts as one change
(one per rule for cmdlets fed several rules), for the fail-at-N switch.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

from _state import Tool, winparse

TRUSTED = ("S-1-5-18", "S-1-5-32-544")
PROFILES = ("Domain", "Private", "Public")


class Thrown(Exception):
    pass


def statements(script: str) -> list[str]:
    """Top-level statements, comments dropped, each with its nested blocks."""
    out, cur, depth = [], "", 0
    i, quote = 0, ""
    while i < len(script):
        c = script[i]
        if quote:
            cur += c
            if c == "`" and quote == '"':
                cur += script[i + 1]
                i += 1
            elif c == quote:
                if quote == "'" and script[i + 1:i + 2] == "'":
                    cur += "'"
                    i += 1
                else:
                    quote = ""
        elif c in "'\"":
            quote = c
            cur += c
        elif c == "#":
            while i < len(script) and script[i] != "\n":
                i += 1
            continue
        elif c in "({[":
            depth += 1
            cur += c
        elif c in ")}]":
            depth -= 1
            cur += c
        elif c == "\n" and depth == 0 and not cur.rstrip().endswith("|"):
            if cur.strip():
                out.append(cur.strip())
            cur = ""
        else:
            cur += c
        i += 1
    if cur.strip():
        out.append(cur.strip())
    return out


class Shell:
    def __init__(self, tool: Tool, script: str) -> None:
        self.t = tool
        self.fw: dict[str, Any] = tool.state["fw"]
        self.script = script
        self.stop = False
        self.vars: dict[str, Any] = {}
        self.out: list[str] = []

    # ------------------------------------------------------------------ effects

    def change(self, what: list[str]) -> None:
        before = self.t.state.get("calls", 0)
        try:
            self.t.change(what)
        except SystemExit:
            raise Thrown(f"{what[0]}: the call failed (injected at change {before + 1})") from None

    def done(self, what: list[str]) -> None:
        self.t.record(what)

    def folder(self) -> dict[str, Any] | None:
        return self.fw.get("programdata")  # type: ignore[no-any-return]

    def assert_state(self, create: bool) -> bool:
        f = self.folder()
        if f is None:
            if not create:
                return False
            self.change(["New-Item", "ksbpf"])
            self.fw["programdata"] = {"owner": "S-1-5-32-544", "protected": True, "files": {}}
            self.done(["New-Item", "ksbpf"])
            return True
        if f["owner"] not in TRUSTED or not f["protected"]:
            raise Thrown(f"ksbpf: refusing to use the state folder (owned by {f['owner']})")
        return True

    def rules(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.fw["rules"] if all(r.get(k) == v for k, v in match.items())]

    # ------------------------------------------------------------------ statements

    def run(self) -> int:
        for st in statements(self.script):
            try:
                self.statement(st)
            except Thrown as e:
                print(f"{e}\nAt line:1 char:1\n+ throw\n    + CategoryInfo          : OperationStopped", file=sys.stderr)
                return 1
            except SystemExit as e:
                return int(e.code or 0)
        return 0

    def statement(self, st: str) -> None:
        noop = (r"#Requires -RunAsAdministrator", r"Set-StrictMode -Version 3\.0", r"\$Group = 'ksbpf'",
                r"\$\w+ = Join-Path \$(?:env:ProgramData|State) '[\w.-]+'", r"\$Trusted = @\('S-1-5-18', 'S-1-5-32-544'\)",
                r"function (?:Test-KsbpfOwned|Assert-KsbpfState)\(.*", r"\$TunnelMetric = \d+", r"\$Made = 0",
                r"\$Failed = \$false", r"\$StateTrusted = \$false")
        if any(re.fullmatch(p, st, re.S) for p in noop):
            return
        if m := re.fullmatch(r"\$ErrorActionPreference = '(\w+)'", st):
            self.stop = m.group(1) == "Stop"
            return
        if st == "Assert-KsbpfState $State $true | Out-Null":
            self.assert_state(True)
            return
        if st.startswith("try { $StateTrusted = Assert-KsbpfState $State $false }"):
            try:
                self.vars["StateTrusted"] = self.assert_state(False)
            except Thrown as e:
                print(f"WARNING: {e}", file=sys.stderr)
                self.vars["Failed"] = True
            return
        if m := re.fullmatch(r"\$TunnelPatterns = (@\(.*\))", st):
            self.vars["patterns"] = winparse._ps_values(m.group(1))
            return
        if st.startswith("$TunnelAliases = @(Get-NetAdapter -IncludeHidden"):
            self.vars["aliases"] = [a for a in self.fw["adapters"] if any(winparse.like(p, a) for p in self.vars["patterns"])]
            return
        if st.startswith("if ($TunnelAliases.Count -eq 0)"):
            if not self.vars["aliases"]:
                print("WARNING: ksbpf: no adapter matches the tunnel patterns: everything stays blocked", file=sys.stderr)
            return
        if st.startswith("$Rules = @(") and not st.startswith("$Rules = @(Get-NetFirewallRule"):
            self.vars["rules"] = winparse.parse(self.script).rules
            return
        if st.startswith("if (-not (Test-Path $ProfilesFile))"):
            files = self.folder()["files"]  # type: ignore[index]
            if "profiles.xml" not in files:
                self.change(["Export-Clixml", "profiles.xml"])
                files["profiles.xml"] = json.loads(json.dumps(self.fw["profiles"]))
                self.done(["Export-Clixml", "profiles.xml"])
            return
        if m := re.fullmatch(r"Set-NetFirewallProfile -Profile @\('Domain', 'Private', 'Public'\) -Enabled True "
                             r"-DefaultInboundAction (Allow|Block) -DefaultOutboundAction (Allow|Block)", st):
            self.change(["Set-NetFirewallProfile"])
            for p in PROFILES:
                self.fw["profiles"][p] = {"Enabled": True, "DefaultInboundAction": m.group(1), "DefaultOutboundAction": m.group(2)}
            self.done(["Set-NetFirewallProfile"])
            return
        if st.startswith("$Already = @(if (Test-Path $DisabledFile)"):
            self.vars["already"] = self.folder()["files"].get("disabled-rules.xml", [])  # type: ignore[index]
            return
        if st.startswith("$Foreign = @(Get-NetFirewallRule -PolicyStore PersistentStore -Enabled True -Action Allow"):
            self.vars["foreign"] = [r for r in self.rules(Store="PersistentStore", Enabled=True, Action="Allow")
                                    if r.get("Group") != "ksbpf"]
            return
        if st.startswith("if ($Foreign.Count -gt 0)"):
            foreign = self.vars["foreign"]
            if foreign:
                self.change(["Export-Clixml", "disabled-rules.xml"])
                names = list(dict.fromkeys([*self.vars["already"], *(r["Name"] for r in foreign)]))
                self.folder()["files"]["disabled-rules.xml"] = names  # type: ignore[index]
                self.done(["Export-Clixml", "disabled-rules.xml"])
                for r in foreign:
                    self.change(["Disable-NetFirewallRule", r["Name"]])
                    r["Enabled"] = False
                    self.done(["Disable-NetFirewallRule", r["Name"]])
            return
        if st in ("Get-NetFirewallRule -Group $Group -Action Allow -ErrorAction SilentlyContinue | Remove-NetFirewallRule",
                  "Get-NetFirewallRule -Group $Group -ErrorAction SilentlyContinue | Remove-NetFirewallRule"):
            only = {"Action": "Allow"} if "-Action Allow" in st else {}
            for r in self.rules(Group="ksbpf", **only):
                self.change(["Remove-NetFirewallRule", r["Name"]])
                self.fw["rules"].remove(r)
                self.done(["Remove-NetFirewallRule", r["Name"]])
            return
        if st.startswith("foreach ($Rule in $Rules)"):
            made = 0
            for rule in self.vars["rules"]:
                fields = dict(rule.fields)
                if fields.get("InterfaceAlias") == "$TunnelAliases":
                    if not self.vars["aliases"]:
                        continue
                    fields["InterfaceAlias"] = list(self.vars["aliases"])
                if self.rules(Name=fields["Name"]):
                    raise Thrown(f"New-NetFirewallRule: a rule named {fields['Name']} exists already")
                self.change(["New-NetFirewallRule", str(fields["Name"])])
                self.fw["rules"].append({**fields, "Group": "ksbpf", "Enabled": True, "Store": "PersistentStore"})
                self.done(["New-NetFirewallRule", str(fields["Name"])])
                made += 1
            self.vars["made"] = made
            return
        if st.startswith("if ($TunnelAliases.Count -gt 0) {") and "$MetricsFile" in st:
            aliases = self.vars["aliases"]
            if aliases:
                files = self.folder()["files"]  # type: ignore[index]
                saved = files.get("metrics.xml", {})
                new = {k: v for k, v in self.fw["metrics"].items() if k.split("/")[0] in aliases and k not in saved}
                if new:
                    self.change(["Export-Clixml", "metrics.xml"])
                    files["metrics.xml"] = {**saved, **json.loads(json.dumps(new))}
                    self.done(["Export-Clixml", "metrics.xml"])
                self.change(["Set-NetIPInterface", *aliases])
                for k in self.fw["metrics"]:
                    if k.split("/")[0] in aliases:
                        self.fw["metrics"][k] = {"AutomaticMetric": "Disabled", "InterfaceMetric": 1}
                self.done(["Set-NetIPInterface", *aliases])
            return
        if st.startswith("$Have = @(Get-NetFirewallRule -Group $Group"):
            self.vars["have"] = len(self.rules(Group="ksbpf"))
            return
        if st.startswith("if ($Have -ne $Made)"):
            if self.vars["have"] != self.vars["made"]:
                raise Thrown(f"ksbpf: made {self.vars['made']} rules but the firewall holds {self.vars['have']}")
            return
        if st.startswith("foreach ($P in Get-NetFirewallProfile)"):
            for name, p in self.fw["profiles"].items():
                if p["DefaultOutboundAction"] != "Block" or p["DefaultInboundAction"] != "Block":
                    raise Thrown(f"ksbpf: profile {name} does not block by default")
            return
        if st.startswith("$Others = @(Get-NetFirewallRule -PolicyStore ActiveStore"):
            self.vars["others"] = [r for r in self.rules(Enabled=True, Action="Allow") if r.get("Group") != "ksbpf"]
            return
        if st.startswith("if ($Others.Count -gt 0)"):
            if self.vars["others"]:
                print(f"WARNING: ksbpf: {len(self.vars['others'])} allow rules from group policy or app containers "
                      "stay active", file=sys.stderr)
            return
        if m := re.fullmatch(r"try \{ (Enable|Disable)-ScheduledTask -TaskName 'ksbpf' -ErrorAction Stop \| Out-Null \} catch \{ \}", st):
            task = self.fw.get("tasks", {}).get("ksbpf")
            if task is not None:
                try:
                    self.change([f"{m.group(1)}-ScheduledTask", "ksbpf"])
                    task["Enabled"] = m.group(1) == "Enable"
                    self.done([f"{m.group(1)}-ScheduledTask", "ksbpf"])
                except Thrown:
                    pass  # the script catches and ignores it
            return
        if m := re.fullmatch(r'"ksbpf: kill switch engaged \(\$Made rules\)"', st):
            print(f"ksbpf: kill switch engaged ({self.vars['made']} rules)")
            return
        # ---- rollback
        if st.startswith("try {") and "if ($StateTrusted -and (Test-Path $ProfilesFile))" in st:
            self.guarded(self.restore_profiles, "profiles")
            return
        if st.startswith("try {") and "Get-NetFirewallRule -Group $Group -ErrorAction SilentlyContinue | Remove-NetFirewallRule -ErrorAction Stop" in st:
            def remove() -> None:
                for r in self.rules(Group="ksbpf"):
                    self.change(["Remove-NetFirewallRule", r["Name"]])
                    self.fw["rules"].remove(r)
                    self.done(["Remove-NetFirewallRule", r["Name"]])
            self.guarded(remove, "rules")
            return
        if st.startswith("try {") and "if ($StateTrusted -and (Test-Path $DisabledFile))" in st:
            def enable() -> None:
                names = self.folder()["files"].get("disabled-rules.xml") if self.vars.get("StateTrusted") else None  # type: ignore[index]
                for r in self.rules(Store="PersistentStore"):
                    if names and r["Name"] in names:
                        self.change(["Enable-NetFirewallRule", r["Name"]])
                        r["Enabled"] = True
                        self.done(["Enable-NetFirewallRule", r["Name"]])
            self.guarded(enable, "re-enabling rules")
            return
        if st.startswith("if ($StateTrusted -and (Test-Path $MetricsFile))"):
            saved = self.folder()["files"].get("metrics.xml") if self.vars.get("StateTrusted") else None  # type: ignore[index]
            for key, m2 in (saved or {}).items():
                try:
                    self.change(["Set-NetIPInterface", key])
                    if key in self.fw["metrics"]:
                        self.fw["metrics"][key] = m2
                    self.done(["Set-NetIPInterface", key])
                except Thrown as e:
                    print(f"WARNING: ksbpf: metric of {key}: {e}", file=sys.stderr)  # not counted as failed, as the script
            return
        if st.startswith("if ($Failed) {"):
            if self.vars.get("Failed"):
                print("WARNING: ksbpf: rollback incomplete, see above", file=sys.stderr)
                raise SystemExit(1)
            return
        if st == "Remove-Item -Recurse -Force -Path $State -ErrorAction SilentlyContinue":
            if self.folder() is not None:
                try:
                    self.change(["Remove-Item", "ksbpf"])
                    self.fw["programdata"] = None
                    self.done(["Remove-Item", "ksbpf"])
                except Thrown:
                    pass  # SilentlyContinue
            return
        if st == "'ksbpf: kill switch removed'":
            print("ksbpf: kill switch removed")
            return
        # ---- status
        if st.startswith("$Rules = @(Get-NetFirewallRule -Group 'ksbpf'"):
            self.vars["status_rules"] = [{"Name": r["Name"], "Action": r["Action"], "Direction": r["Direction"],
                                          "Enabled": str(r["Enabled"])} for r in self.rules(Group="ksbpf")]
            return
        if st.startswith("$Profiles = @(Get-NetFirewallProfile"):
            self.vars["status_profiles"] = [{"Name": n, "Enabled": str(p["Enabled"]), "DefaultInboundAction": p["DefaultInboundAction"],
                                             "DefaultOutboundAction": p["DefaultOutboundAction"]} for n, p in self.fw["profiles"].items()]
            return
        if st.startswith("$Adapters = @(Get-NetAdapter"):
            self.vars["status_adapters"] = list(self.fw["adapters"])
            return
        if st.startswith("ConvertTo-Json -Depth 4 -Compress -InputObject"):
            print(json.dumps({"Rules": self.vars["status_rules"], "Profiles": self.vars["status_profiles"],
                              "Adapters": self.vars["status_adapters"]}))
            return
        self.t.fail(f"powershell stand-in: unmodelled statement: {st[:200]!r}", 64)

    def guarded(self, fn: Any, what: str) -> None:
        """try { ...; -ErrorAction Stop } catch { Write-Warning; $Failed = $true }"""
        try:
            fn()
        except Thrown as e:
            print(f"WARNING: ksbpf: {what}: {e}", file=sys.stderr)
            self.vars["Failed"] = True

    def restore_profiles(self) -> None:
        saved = self.folder()["files"].get("profiles.xml") if self.vars.get("StateTrusted") else None  # type: ignore[index]
        if saved:
            for name, p in saved.items():
                self.change(["Set-NetFirewallProfile", name])
                self.fw["profiles"][name] = dict(p)
                self.done(["Set-NetFirewallProfile", name])
        else:
            self.change(["Set-NetFirewallProfile", "defaults"])
            for name in PROFILES:
                self.fw["profiles"][name] = {**self.fw["profiles"][name], "DefaultInboundAction": "Block",
                                             "DefaultOutboundAction": "Allow"}
            self.done(["Set-NetFirewallProfile", "defaults"])


def main(argv: list[str]) -> None:
    t = Tool("powershell.exe")
    want = ["-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-File"]
    if argv[:-1] != want:
        t.fail(f"powershell stand-in: expected {' '.join(want)} SCRIPT, got {argv}", 64)
    with open(argv[-1], encoding="utf-8") as f:
        script = f.read()
    code = Shell(t, script).run()
    t.save()
    sys.exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
