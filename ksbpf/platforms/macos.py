"""ksctl up|down|status on macOS: the PF rendering (ksbpf.render.pf) applied with pfctl.

`up`, in this order (each step named in an error; nothing is rolled back, and no step
leaves an allow without the block it comes with):
1. write the anchor and the main ruleset (/etc/pf.conf's text calling the anchor) to the
   state folder and have pfctl parse both (-n): a ruleset pfctl refuses changes nothing;
2. keep what was found (PF enabled or not, the main ruleset's rules, check_interface) the
   first time, for `down`;
3. net.inet.ip.check_interface=1 (the IPv4 strong host model);
4. `pfctl -a ksbpf -f FILE`: the whole anchor in one transaction, its blocks and passes
   together. Until the main ruleset calls it, it filters nothing;
5. only if the main ruleset does not call the anchor yet: `pfctl -f` of the main ruleset
   (one transaction). /etc/pf.conf is never written;
6. `pfctl -E`: PF enabled by reference; the token is kept and any older one of ksbpf's released;
7. `pfctl -F states`: a state matches before any rule and could carry a flow past the anchor;
8. read back: PF enabled, the main ruleset calls the anchor, and the anchor holds what
   pfctl reads from the rendered file.
`down` runs every step even if one fails: unload the LaunchDaemon (or it re-engages within
a minute), load /etc/pf.conf if `up` replaced the main ruleset, flush the anchor, release
the token, restore check_interface; then it compares the main ruleset and PF's status with
what `up` found and names any difference.
Interface groups: xnu's PF has none (see ksbpf.render.pf); a glob is the unit family.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ksbpf.errors import BackendError, KsbpfError
from ksbpf.platforms._tools import Layer, run, state_folder, write_private
from ksbpf.policy import Policy, loads_policy
from ksbpf.render.base import Rendered
from ksbpf.render.pf import ANCHOR, LAUNCHD_LABEL, LAUNCHD_PLIST, STATE_DIR, render_pf

PF_CONF = Path("/etc/pf.conf")
LAUNCHD_DIR = Path("/Library/LaunchDaemons")
CHECK_INTERFACE = "net.inet.ip.check_interface"
ANCHOR_CALL = f'anchor "{ANCHOR}" all'  # how pfctl -s rules prints the main ruleset's call
_TOKEN = re.compile(r"^Token\s*:\s*([0-9]+)\s*$", re.MULTILINE)


def rule_lines(text: str) -> list[str]:
    """The rules in pfctl's listing (-s rules, -n -v -f): no rule numbers, counters or blanks."""
    out = []
    for line in text.splitlines():
        if not line.strip() or line.startswith((" ", "\t", "[")):
            continue
        out.append(re.sub(r"^@\d+\s+", "", line).strip())
    return out


@dataclass
class UpResult:
    rules: int
    steps: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class MacOS:
    state_dir: Path = Path(STATE_DIR)
    pf_conf: Path = PF_CONF
    launchd_dir: Path = LAUNCHD_DIR

    # ------------------------------------------------------------------ render

    def system_pf_conf(self) -> str | None:
        try:
            return self.pf_conf.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            raise BackendError("pf", f"cannot read {self.pf_conf}: {e}") from None

    def render(self, policy: Policy) -> Rendered:
        try:
            return render_pf(policy, pf_conf=self.system_pf_conf())
        except ValueError as e:
            raise BackendError("pf", str(e)) from None

    # ------------------------------------------------------------------ helpers

    def _f(self, name: str) -> Path:
        return self.state_dir / name

    def _pfctl(self, step: str, *args: str, check: bool = True) -> str:
        try:
            proc = run("pf", ["pfctl", *args], check=check)
        except BackendError as e:
            raise BackendError("pf", f"step {step}: {e.reason}") from None
        return proc.stdout + proc.stderr

    def _enabled(self) -> bool:
        return "Status: Enabled" in run("pf", ["pfctl", "-s", "info"]).stdout

    # ------------------------------------------------------------------ up

    def up(self, policy: Policy, policy_text: str) -> UpResult:
        rendered = self.render(policy)
        state_folder(self.state_dir)
        anchor, main = self._f("anchor.conf"), self._f("main.conf")
        write_private(anchor, rendered.files["ksbpf.anchor"])
        write_private(main, rendered.files["pf.conf"])
        write_private(self._f("policy.toml"), policy_text)
        result = UpResult(rules=0)

        self._pfctl("check", "-n", "-f", str(main))
        self._pfctl("check", "-n", "-a", ANCHOR, "-f", str(anchor))
        result.steps.append("check")

        found = self._f("found.json")
        if not found.exists():
            main_rules = rule_lines(run("pf", ["pfctl", "-s", "rules"]).stdout)
            write_private(found, json.dumps({"enabled": self._enabled(), "main_rules": main_rules}))
        if not self._f("check_interface").exists():
            value = run("host", ["sysctl", "-n", CHECK_INTERFACE]).stdout.strip()
            write_private(self._f("check_interface"), value + "\n")
        try:
            run("host", ["sysctl", "-w", f"{CHECK_INTERFACE}=1"])
        except BackendError as e:
            raise BackendError("host", f"step check_interface: {e.reason}") from None
        result.steps.append("check_interface")

        # The anchor before the main ruleset: until the main ruleset calls it, it filters nothing.
        self._pfctl("anchor", "-a", ANCHOR, "-f", str(anchor))
        result.steps.append("anchor")
        if ANCHOR_CALL not in rule_lines(run("pf", ["pfctl", "-s", "rules"]).stdout):
            self._pfctl("main", "-f", str(main))
            write_private(self._f("main_replaced"), "1\n")
            result.steps.append("main")

        said = self._pfctl("enable", "-E")
        m = _TOKEN.search(said)
        if m is None:
            raise BackendError("pf", "step enable: pfctl -E printed no token")
        old = self._read("token")
        write_private(self._f("token"), m.group(1) + "\n")
        if old and old != m.group(1):
            self._pfctl("enable", "-X", old, check=False)  # ours from before: PF stays on by the new one
        result.steps.append("enable")

        self._pfctl("states", "-F", "states")
        result.steps.append("states")

        if not self._enabled():
            raise BackendError("pf", "step readback: PF is not enabled")
        if ANCHOR_CALL not in rule_lines(run("pf", ["pfctl", "-s", "rules"]).stdout):
            raise BackendError("pf", f"step readback: the main ruleset does not call anchor {ANCHOR}")
        held = run("pf", ["pfctl", "-a", ANCHOR, "-s", "rules"]).stdout
        want = rule_lines(self._pfctl("readback", "-n", "-v", "-a", ANCHOR, "-f", str(anchor)))
        if rule_lines(held) != want:
            raise BackendError("pf", f"step readback: anchor {ANCHOR} holds {len(rule_lines(held))} rules, "
                               f"not the {len(want)} rendered")
        write_private(self._f("loaded.rules"), held)
        write_private(self._f("loaded.anchor"), rendered.files["ksbpf.anchor"])
        result.steps.append("readback")
        result.rules = len(want)
        result.warnings = [str(u) for u in rendered.unsupported]
        return result

    def _read(self, name: str) -> str:
        try:
            return self._f(name).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------ down

    def down(self) -> list[str]:
        """Remove everything `up` did; every step runs. Returns the problems (empty: done)."""
        problems: list[str] = []

        def step(name: str, argv: list[str]) -> None:
            try:
                run("pf" if argv[0] == "pfctl" else "host", argv)
            except BackendError as e:
                problems.append(f"{name}: {e.reason}")

        if (self.launchd_dir / LAUNCHD_PLIST).exists():
            step("launchd", ["launchctl", "bootout", f"system/{LAUNCHD_LABEL}"])
        if self._f("main_replaced").exists():
            step("main", ["pfctl", "-f", str(self.pf_conf)])  # first: then nothing calls the anchor
        step("anchor", ["pfctl", "-a", ANCHOR, "-F", "rules"])
        token = self._read("token")
        if token.isdigit():
            step("enable", ["pfctl", "-X", token])
        old = self._read("check_interface")
        if old in ("0", "1"):
            step("check_interface", ["sysctl", "-w", f"{CHECK_INTERFACE}={old}"])
        found = self._read("found.json")
        if found and not problems:
            was = json.loads(found)
            now = rule_lines(run("pf", ["pfctl", "-s", "rules"], check=False).stdout)
            if now != was["main_rules"]:
                problems.append(f"main ruleset: /etc/pf.conf loaded, but up had found other rules "
                                f"({len(was['main_rules'])} then, {len(now)} now; a service that added its "
                                "own anchor at run time adds it again when restarted)")
            if self._enabled() != was["enabled"]:
                problems.append(f"PF is {'enabled' if not was['enabled'] else 'disabled'} now and was not when "
                                "up ran (someone else holds or released a reference)")
        if not problems or all(p.startswith(("main ruleset:", "PF is")) for p in problems):
            for f in sorted(self.state_dir.glob("*")) if self.state_dir.is_dir() else []:
                f.unlink()
            if self.state_dir.is_dir():
                self.state_dir.rmdir()
        return problems

    # ------------------------------------------------------------------ status

    def status(self) -> tuple[dict[str, Layer], list[str]]:
        """The layers as PF holds them now, and what the applied policy cannot do here."""
        layers: dict[str, Layer] = {}
        enabled = self._enabled()
        token = self._read("token")
        layers["pf"] = Layer(enabled, ("enabled" if enabled else "NOT enabled")
                             + (f", ksbpf holds reference {token}" if token else ", ksbpf holds no reference"))
        calls = ANCHOR_CALL in rule_lines(run("pf", ["pfctl", "-s", "rules"]).stdout)
        held = rule_lines(run("pf", ["pfctl", "-a", ANCHOR, "-s", "rules"]).stdout)
        anchor = self._f("anchor.conf")
        if not anchor.exists():
            layers["anchor"] = Layer(False, f"not applied by ksctl up ({len(held)} rules in anchor {ANCHOR})")
        else:
            want = rule_lines(run("pf", ["pfctl", "-n", "-v", "-a", ANCHOR, "-f", str(anchor)]).stdout)
            same = held == want
            what = f"{len(held)} rules" + (", as rendered" if same else f", NOT the {len(want)} rendered")
            layers["anchor"] = Layer(calls and same and bool(held),
                                     what + ("" if calls else f"; the main ruleset does NOT call anchor {ANCHOR}"))
        value = run("host", ["sysctl", "-n", CHECK_INTERFACE]).stdout.strip()
        layers["host"] = Layer(value == "1", f"{CHECK_INTERFACE}={value}")
        unsupported: list[str] = []
        text = self._read("policy.toml")
        if text:
            try:
                unsupported = [str(u) for u in self.render(loads_policy(text, str(self._f("policy.toml")))).unsupported]
            except KsbpfError as e:  # the policy up applied no longer renders: say so, report the rest
                unsupported = [f"the applied policy cannot be rendered again: {e}"]
        return layers, unsupported
