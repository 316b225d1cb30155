"""ksctl up|down|status on Windows: the rendering of ksbpf.render.windows run through
`powershell.exe -NoProfile -NonInteractive -ExecutionPolicy Bypass -File`.

The scripts are written to the install folder (%ProgramFiles%\\ksbpf, writable by
administrators alone: a script run elevated must not come from a folder a user can
change) and run whole: apply.ps1 fails closed first (default Block on every profile before
any rule) and stops at its first error; rollback.ps1 runs every step and restores what
apply.ps1 saved. `status` asks the firewall for ksbpf's rules and the profiles' defaults
as JSON and compares them with the rendered rules.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ksbpf.errors import BackendError, KsbpfError
from ksbpf.platforms._tools import Layer, run, state_folder, write_private
from ksbpf.policy import Policy, loads_policy
from ksbpf.render.base import Rendered
from ksbpf.render.windows import ROLLBACK_SCRIPT, STATUS_SCRIPT, render_windows

POWERSHELL = ["powershell.exe", "-NoProfile", "-NonInteractive", "-ExecutionPolicy", "Bypass", "-File"]
_RULE = re.compile(r"^    @\{ Name = '([^']+)'; .*?Action = '(Allow|Block)'(.*)\}$", re.MULTILINE)


def default_dir() -> Path:
    return Path(os.environ.get("ProgramFiles", r"C:\Program Files")) / "ksbpf"


def _said(text: str) -> str:
    """The error PowerShell printed: its first line, not the position and category lines
    below it (`At ...`, `+ ...`); the last warning when there is no error."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if not ln.startswith(("WARNING:", "At ", "+"))]
    return f": {errors[0]}" if errors else (f": {lines[-1]}" if lines else "")


@dataclass
class UpResult:
    output: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Windows:
    install_dir: Path = field(default_factory=default_dir)

    def render(self, policy: Policy) -> Rendered:
        try:
            return render_windows(policy)
        except ValueError as e:
            raise BackendError("firewall", str(e)) from None

    def _run(self, script: str, what: str) -> tuple[int, str, str]:
        proc = run("firewall", [*POWERSHELL, str(self.install_dir / script)], check=False, timeout=600)
        if proc.returncode != 0:
            raise BackendError("firewall", f"{what} failed (exit {proc.returncode})" + _said(proc.stderr or proc.stdout))
        return proc.returncode, proc.stdout, proc.stderr

    def up(self, policy: Policy, policy_text: str) -> UpResult:
        rendered = self.render(policy)
        state_folder(self.install_dir)
        for name, text in rendered.files.items():
            write_private(self.install_dir / name, text)
        write_private(self.install_dir / "policy.toml", policy_text)
        _, out, err = self._run("apply.ps1", "apply.ps1")
        return UpResult([ln for ln in out.splitlines() if ln.strip()],
                        [ln for ln in err.splitlines() if ln.strip()] + [str(u) for u in rendered.unsupported])

    def down(self) -> list[str]:
        state_folder(self.install_dir)
        write_private(self.install_dir / "rollback.ps1", ROLLBACK_SCRIPT)
        try:
            self._run("rollback.ps1", "rollback.ps1")
        except BackendError as e:
            return [e.reason]
        return []

    def status(self) -> tuple[dict[str, Layer], list[str]]:
        state_folder(self.install_dir)
        write_private(self.install_dir / "status.ps1", STATUS_SCRIPT)
        _, out, _ = self._run("status.ps1", "reading the firewall")
        try:
            held = json.loads(out)
        except ValueError:
            raise BackendError("firewall", "the firewall's state did not read back as JSON") from None
        layers: dict[str, Layer] = {}
        profiles = held.get("Profiles") or []
        blocking = [p["Name"] for p in profiles if p["DefaultInboundAction"] == "Block"
                    and p["DefaultOutboundAction"] == "Block" and p["Enabled"] == "True"]
        layers["profiles"] = Layer(bool(profiles) and len(blocking) == len(profiles),
                                   f"default Block both ways on {', '.join(blocking) or 'no profile'}")
        rules = {r["Name"]: r for r in held.get("Rules") or [] if r.get("Enabled") == "True"}
        unsupported: list[str] = []
        apply = self.install_dir / "apply.ps1"
        if not apply.exists():
            layers["rules"] = Layer(False, f"not applied by ksctl up ({len(rules)} rules in group ksbpf)")
            return layers, unsupported
        rendered_rules = _RULE.findall(apply.read_text(encoding="utf-8"))
        tunnel = [name for name, _, rest in rendered_rules if "$TunnelAliases" in rest]
        text_apply = apply.read_text(encoding="utf-8")
        m = re.search(r"^\$TunnelPatterns = @\((.*)\)$", text_apply, re.MULTILINE)
        patterns = re.findall(r"'([^']*)'", m.group(1)) if m else []
        # Interface names and globs hold no wildcard but a trailing '*': fnmatch reads them as -like does.
        tunnels = [a for a in held.get("Adapters") or [] if any(fnmatch.fnmatch(a.lower(), p.lower()) for p in patterns)]
        want = {name for name, _, _ in rendered_rules}
        missing, extra = sorted(want - set(rules)), sorted(set(rules) - want)
        skipped = bool(missing) and set(missing) <= set(tunnel) and not tunnels
        detail = f"{len(rules)} of {len(want)} rendered rules"
        if missing:
            detail += ("; the tunnel's rules wait for its adapter" if skipped else f"; MISSING {', '.join(missing[:5])}")
        if extra:
            detail += f"; NOT rendered: {', '.join(extra[:5])}"
        blocks = [name for name, action, _ in rendered_rules if action == "Block" and name not in tunnel]
        layers["rules"] = Layer((not missing or skipped) and not extra and all(b in rules for b in blocks), detail)
        text = self.install_dir / "policy.toml"
        if text.exists():
            try:
                unsupported = [str(u) for u in self.render(loads_policy(text.read_text(encoding="utf-8"), str(text))).unsupported]
            except KsbpfError as e:  # the policy up applied no longer renders: say so, report the rest
                unsupported = [f"the applied policy cannot be rendered again: {e}"]
        return layers, unsupported
