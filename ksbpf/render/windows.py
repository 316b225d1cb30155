"""Windows: a `Policy` as a PowerShell script for Windows Defender Firewall (apply.ps1)
and its emergency key (rollback.ps1). Pure: text out, no I/O.

How the firewall decides (MS-FASP 2.2.34): if any matching rule blocks, the packet is
blocked, whatever allows it; else if any matching rule allows, it passes; else the
profile's default action applies. Rule order means nothing. So, unlike PF, a "block
everything, then allow the tunnel" pair of rules blocks everything. The script instead:

- sets the default action to Block, both ways, on every profile;
- adds allow rules for exactly what verdict() allows, each narrowed so that it allows
  nothing verdict() drops (LAN: TCP and UDP except the DNS ports, ICMP; IPv6 left out of
  every allow in block mode);
- adds block rules only on the tunnel interface, where "allow everything" needs
  exceptions: DNS to other resolvers, and IPv6 in block mode. A block rule can only narrow,
  never widen, and on the tunnel verdict() has no other way to allow a packet;
- disables every other enabled allow rule of the local store (Windows' own included) while
  ksbpf is engaged: they would open holes the policy does not. rollback.ps1 re-enables
  exactly those.

Tunnel interfaces are matched by alias with PowerShell's -like (a glob `wg*` is a prefix,
as in verdict()), resolved to the adapters present when the script runs: a tunnel adapter
created later is blocked until apply.ps1 runs again. Exemptions need a Windows identity: a
cgroup `.../NAME.service` becomes the Windows service NAME, or `exempt_programs` maps a
cgroup to a program path; the endpoint exception is open to every program unless
`endpoint_program` names the tunnel client.

Host behaviour the rules rely on: firewall rules have no effect on loopback traffic
(Microsoft KB 2771908); the strong host model (Windows' default) drops packets for a local
address arriving on another interface.
`[bpf]` and `[metrics]` configure the Linux engine and daemon, not what passes; they have
no counterpart here. Limits, not per policy and so not in `unsupported`: the firewall does not filter routed
(forwarded) traffic; group-policy and app-container allow rules cannot be disabled locally
(apply.ps1 warns about any that stay active).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ksbpf.policy import Endpoint, IPAddress, IPNetwork, Policy, PortSpec
from ksbpf.render import _guard
from ksbpf.render.base import Rendered, Unsupported
from ksbpf.verdict import DHCP4_CLIENT, DHCP4_SERVER, DHCP6_CLIENT, DHCP6_SERVER, DNS_PORTS, ND_ICMPV6_TYPES

GROUP = "ksbpf"
TUNNEL_METRIC = 1
ALL4 = "0.0.0.0-255.255.255.255"
ALL6 = "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"

_SERVICE_UNIT = re.compile(r"([A-Za-z0-9_.-]{1,200})\.service")
# A drive or an %ENVVAR% root, then path components of plain characters.
_PROGRAM = re.compile(r"(?:[A-Za-z]:|%[A-Za-z_][A-Za-z0-9_]*%)(?:\\[A-Za-z0-9 _.()+-]{1,255})+")

Direction = Literal["Outbound", "Inbound"]
BOTH: tuple[Direction, Direction] = ("Outbound", "Inbound")
TUNNEL = object()  # stands for $TunnelAliases in a rule


def _program(path: object, what: str) -> str:
    parts = path.split("\\")[1:] if isinstance(path, str) else []
    if not isinstance(path, str) or not _PROGRAM.fullmatch(path) or any(p.strip() in (".", "..") for p in parts):
        raise ValueError(f"refusing to render {what} {path!r}: a program path like C:\\Program Files\\X\\x.exe")
    return path


def service_for(cgroup: str) -> str | None:
    """The Windows service a cgroup stands for: `system.slice/sshd.service` -> `sshd`."""
    m = _SERVICE_UNIT.fullmatch(cgroup.rsplit("/", 1)[-1])
    return m.group(1) if m else None


# ------------------------------------------------------------------ address and port sets


def complement(addresses: Iterable[IPAddress], family: int) -> list[str]:
    """Ranges covering every address of `family` but these: the firewall cannot negate."""
    top = (1 << (32 if family == 4 else 128)) - 1
    taken = sorted({int(a) for a in addresses if a.version == family})
    out: list[str] = []
    start = 0
    for n in [*taken, top + 1]:
        if n > start:
            first, last = _addr(start, family), _addr(n - 1, family)
            out.append(first if start == n - 1 else f"{first}-{last}")
        start = n + 1
    return out


def _addr(n: int, family: int) -> str:
    return str(ipaddress.IPv4Address(n) if family == 4 else ipaddress.IPv6Address(n))


def _port_complement(ports: Iterable[int]) -> list[str]:
    out: list[str] = []
    start = 0
    for p in [*sorted(set(ports)), 65536]:
        if p > start:
            out.append(str(start) if start == p - 1 else f"{start}-{p - 1}")
        start = p + 1
    return out


def _ports(spec: PortSpec) -> str:
    return str(spec.first) if spec.first == spec.last else f"{spec.first}-{spec.last}"


# ------------------------------------------------------------------ rules


@dataclass
class _Rule:
    name: str
    display: str
    direction: Direction
    action: Literal["Allow", "Block"]
    params: dict[str, object] = field(default_factory=dict)

    def ps(self) -> str:
        items: list[tuple[str, object]] = [
            ("Name", self.name), ("DisplayName", self.display), ("Direction", self.direction), ("Action", self.action),
            *self.params.items(),
        ]
        return "    @{ " + "; ".join(f"{k} = {_ps_value(v)}" for k, v in items) + " }"


def _ps_quote(s: str) -> str:
    # Single quotes: PowerShell expands nothing inside them. `'` is doubled; anything but
    # printable ASCII was refused before (PowerShell also ends a string at U+2019).
    if not all(" " <= c <= "~" for c in s):
        raise ValueError(f"refusing to quote {s!r} for PowerShell")
    return "'" + s.replace("'", "''") + "'"


def _ps_value(v: object) -> str:
    if v is TUNNEL:
        return "$TunnelAliases"
    if isinstance(v, list):
        return "@(" + ", ".join(_ps_quote(str(x)) for x in v) + ")"
    return _ps_quote(str(v))


class _Rules:
    def __init__(self, policy: Policy, endpoint_program: str | None, identities: Mapping[str, tuple[str, str]]) -> None:
        self.p = policy
        self.endpoint_program = endpoint_program
        self.identities = identities
        self.block6 = policy.ipv6.mode == "block"
        self.families = (4,) if self.block6 else (4, 6)
        self.rules: list[_Rule] = []
        self.seen: set[str] = set()

    def add(self, name: str, display: str, direction: Direction, action: Literal["Allow", "Block"], **params: object) -> None:
        d = "out" if direction == "Outbound" else "in"
        full = f"{GROUP}-{d}-{name}"
        if full in self.seen:
            raise ValueError(f"duplicate rule name {full}")
        self.seen.add(full)
        self.rules.append(_Rule(full, f"{GROUP}: {display}", direction, action, {k: v for k, v in params.items() if v is not None}))

    def any_address(self) -> list[str] | None:
        """`any` in this mode: all of IPv4 only when IPv6 is blocked."""
        return [ALL4] if self.block6 else None

    def nets(self, nets: tuple[IPNetwork, ...]) -> list[str] | Literal[False] | None:
        """RemoteAddress for these networks; False when none is left in this mode."""
        if not nets:
            return self.any_address()
        kept = [str(n) for n in nets if n.version in self.families]
        return kept or False

    def build(self) -> list[_Rule]:
        self._tunnel()
        self._nd_dhcp()
        self._endpoints()
        self._exemptions()
        self._lan()
        # Blocks are created first: an allow never exists without the blocks that narrow it.
        return sorted(self.rules, key=lambda r: r.action != "Block")

    def _tunnel(self) -> None:
        servers = [s for s in self.p.dns.servers if s.version in self.families]
        dns_remote = [*complement(servers, 4), *complement(servers, 6)] if servers else None
        for proto in ("TCP", "UDP"):
            self.add(f"tunnel-dns-{proto.lower()}", f"DNS on the tunnel only to the configured resolvers ({proto})",
                     "Outbound", "Block", InterfaceAlias=TUNNEL, Protocol=proto,
                     RemotePort=[str(p) for p in DNS_PORTS], RemoteAddress=dns_remote)
        if self.block6:
            for d in BOTH:
                self.add("tunnel-ipv6", "no IPv6 on the tunnel (ipv6.mode = block)", d, "Block",
                         InterfaceAlias=TUNNEL, RemoteAddress=[ALL6])
        self.add("tunnel", "everything through the tunnel", "Outbound", "Allow", InterfaceAlias=TUNNEL)
        self.add("tunnel", "everything from the tunnel", "Inbound", "Allow", InterfaceAlias=TUNNEL)

    def _nd_dhcp(self) -> None:
        nd = [str(t) for t in ND_ICMPV6_TYPES]
        for d in BOTH:
            self.add("nd", "IPv6 neighbour discovery", d, "Allow", Protocol="ICMPv6", IcmpType=nd)
        for fam, client, server, remote in ((4, DHCP4_CLIENT, DHCP4_SERVER, ALL4), (6, DHCP6_CLIENT, DHCP6_SERVER, ALL6)):
            self.add(f"dhcp{fam}", f"DHCPv{fam} client", "Outbound", "Allow", Protocol="UDP",
                     LocalPort=str(client), RemotePort=str(server), RemoteAddress=[remote])
            self.add(f"dhcp{fam}", f"DHCPv{fam} replies", "Inbound", "Allow", Protocol="UDP",
                     LocalPort=str(client), RemotePort=str(server), RemoteAddress=[remote])

    def _endpoints(self) -> None:
        for i, ep in enumerate(self.p.tunnel.endpoints):
            if ep.family not in self.families:
                continue  # IPv6 is dropped before the endpoints in block mode
            common = {"Protocol": ep.proto.upper(), "RemoteAddress": [str(ep.address)], "RemotePort": str(ep.port)}
            self.add(f"endpoint{i}", f"VPN endpoint {ep}", "Outbound", "Allow", Program=self.endpoint_program, **common)
            self.add(f"endpoint{i}", f"VPN endpoint {ep} replies", "Inbound", "Allow", **common)

    def _exemptions(self) -> None:
        for i, ex in enumerate(self.p.exemptions):
            ident = self.identities.get(ex.cgroup)
            if ident is None:
                continue
            who = {ident[0]: ident[1]}
            for j, spec in enumerate(ex.allow):
                remote = self.nets(ex.to)
                if remote is False:
                    continue
                common = {"Protocol": spec.proto.upper(), "RemotePort": _ports(spec), "RemoteAddress": remote, **who}
                self.add(f"exempt{i}-allow{j}", f"exempt[{i}] {ident[1]} to {spec}", "Outbound", "Allow", **common)
                self.add(f"exempt{i}-allow{j}", f"exempt[{i}] {ident[1]} replies from {spec}", "Inbound", "Allow", **common)
            for j, spec in enumerate(ex.listen):
                remote = self.nets(ex.from_)
                if remote is False:
                    continue
                common = {"Protocol": spec.proto.upper(), "LocalPort": _ports(spec), "RemoteAddress": remote, **who}
                self.add(f"exempt{i}-listen{j}", f"exempt[{i}] {ident[1]} listening on {spec}", "Inbound", "Allow", **common)
                self.add(f"exempt{i}-listen{j}", f"exempt[{i}] {ident[1]} answering on {spec}", "Outbound", "Allow", **common)

    def _lan(self) -> None:
        for fam in self.families:
            nets = [str(n) for n in self.p.lan_networks(fam)]
            if not nets:
                continue
            # Out: no rule may name "any protocol but DNS", so TCP, UDP and ICMP one by one;
            # DNS to a LAN resolver stays blocked (verdict() drops it before LAN).
            not_dns = _port_complement(DNS_PORTS)
            for proto in ("TCP", "UDP"):
                self.add(f"lan{fam}-{proto.lower()}", f"LAN IPv{fam} {proto}, not DNS", "Outbound", "Allow",
                         Protocol=proto, RemotePort=not_dns, RemoteAddress=nets)
            icmp = "ICMPv4" if fam == 4 else "ICMPv6"
            self.add(f"lan{fam}-icmp", f"LAN IPv{fam} {icmp}", "Outbound", "Allow", Protocol=icmp, RemoteAddress=nets)
            self.add(f"lan{fam}", f"LAN IPv{fam}", "Inbound", "Allow", RemoteAddress=nets)


def _unsupported(policy: Policy, endpoint_program: str | None, identities: Mapping[str, tuple[str, str]]) -> list[Unsupported]:
    out: list[Unsupported] = []
    t = policy.tunnel
    if t.endpoints and endpoint_program is None:
        why = "every local program may reach the endpoints (name the tunnel client with endpoint_program to restrict them)"
        if t.endpoint_mark is not None:
            out.append(Unsupported("tunnel.endpoint_mark", f"Windows firewall rules cannot match socket marks: {why}"))
        if t.endpoint_cgroups:
            out.append(Unsupported("tunnel.endpoint_cgroups", f"Windows has no cgroups: {why}"))
    if t.endpoints and endpoint_program is not None:
        for i, ep in enumerate(t.endpoints):
            via = _other_ways_to(policy, ep, identities)
            if via:
                out.append(Unsupported(
                    f"tunnel.endpoints[{i}]",
                    f"other programs reach {ep} through {via}: a Windows block rule cannot spare one program, "
                    "so the endpoint check cannot drop them first as verdict() does",
                ))
    for i, ex in enumerate(policy.exemptions):
        if ex.cgroup not in identities:
            svc = service_for(ex.cgroup)
            why = "names no service (.../NAME.service)" if svc is None else f"shares the service {svc} with another exemption"
            out.append(Unsupported(
                f"exempt[{i}].cgroup",
                f"Windows has no cgroups and {ex.cgroup} {why}: it is not exempted and its traffic outside "
                "the tunnel stays blocked (map it with exempt_programs)",
            ))
    if policy.lan_networks(4) or (policy.ipv6.mode == "tunnel" and policy.lan_networks(6)):
        out.append(Unsupported(
            "lan.networks",
            "a Windows rule names one IP protocol and cannot except ports from 'any protocol': TCP and UDP "
            "(except the DNS ports) and ICMP to the LAN are allowed; other IP protocols to the LAN stay blocked",
        ))
    return out


def _other_ways_to(policy: Policy, ep: Endpoint, identities: Mapping[str, tuple[str, str]]) -> str:
    """Which allow rule, beside the endpoint's own, lets another program's packet to `ep` out."""
    if ep.family == 6 and policy.ipv6.mode == "block":
        return ""
    if ep.port not in DNS_PORTS and any(ep.address in n for n in policy.lan_networks(ep.family)):
        return "the LAN rules"
    for i, ex in enumerate(policy.exemptions):
        if ex.cgroup not in identities:
            continue
        if any(s.covers(ep.proto, ep.port) for s in ex.allow) and any(ep.address in n for n in ex.to_networks(ep.family)):
            return f"exempt[{i}]"
        if any(s.proto == ep.proto for s in ex.listen) and any(ep.address in n for n in ex.from_networks(ep.family)):
            return f"exempt[{i}]"
    return ""


# ------------------------------------------------------------------ scripts

# Shared by both scripts: the state folder is trusted only as SYSTEM and Administrators made it.
_STATE_GUARD = r"""# %ProgramData% lets standard users create folders: one who made ksbpf\ first could plant a
# profiles.xml that turns the firewall off at rollback. The state folder is made for SYSTEM
# and Administrators alone (no inherited access), and one whose owner or access differs, or
# a file in it owned by anyone else, is refused rather than trusted.
$Trusted = @('S-1-5-18', 'S-1-5-32-544')  # SYSTEM, BUILTIN\Administrators
function Test-KsbpfOwned([string]$Path) {
    $Acl = Get-Acl -LiteralPath $Path
    $Owner = ([System.Security.Principal.NTAccount]$Acl.Owner).Translate([System.Security.Principal.SecurityIdentifier]).Value
    if ($Trusted -notcontains $Owner) { return "owned by $($Acl.Owner)" }
    if (-not $Acl.AreAccessRulesProtected) { return 'inherits access from its parent' }
    foreach ($Ace in $Acl.Access) {
        $Sid = $Ace.IdentityReference.Translate([System.Security.Principal.SecurityIdentifier]).Value
        if ($Trusted -notcontains $Sid) { return "grants access to $($Ace.IdentityReference)" }
    }
    return ''
}
function Assert-KsbpfState([string]$Path, [bool]$Create) {
    if (-not (Test-Path -LiteralPath $Path)) {
        if (-not $Create) { return $false }
        $Sec = New-Object System.Security.AccessControl.DirectorySecurity
        $Sec.SetAccessRuleProtection($true, $false)
        foreach ($Sid in $Trusted) {
            $Id = New-Object System.Security.Principal.SecurityIdentifier($Sid)
            $Sec.AddAccessRule((New-Object System.Security.AccessControl.FileSystemAccessRule($Id, 'FullControl', 'ContainerInherit,ObjectInherit', 'None', 'Allow')))
        }
        $Sec.SetOwner((New-Object System.Security.Principal.SecurityIdentifier('S-1-5-32-544')))
        New-Item -ItemType Directory -Path $Path | Out-Null
        Set-Acl -LiteralPath $Path -AclObject $Sec
        # Anything that got in between New-Item and Set-Acl was not made by us.
        if (@(Get-ChildItem -LiteralPath $Path -Force).Count -gt 0) { throw "ksbpf: $Path was written by someone else while being made; remove it and run again" }
    }
    $Why = Test-KsbpfOwned $Path
    if ($Why) { throw "ksbpf: refusing to use $Path ($Why): only SYSTEM and Administrators may own and access it; remove it and run again" }
    foreach ($F in Get-ChildItem -LiteralPath $Path -Force) {
        $Why = Test-KsbpfOwned $F.FullName
        if ($Why -and $Why -ne 'inherits access from its parent') { throw "ksbpf: refusing $($F.FullName) ($Why)" }
    }
    return $true
}
"""

_APPLY_HEAD = """\
#Requires -RunAsAdministrator
# ksbpf: engage the kill switch in Windows Defender Firewall. Rendered by ksbpf from a
# policy; run it again after any change (it replaces its own rules); undo with rollback.ps1.
#
# The firewall blocks a packet if any matching rule blocks it, whatever allows it, and
# applies the profile's default action when no rule matches; rule order means nothing.
# So: default Block both ways, allow rules for exactly what the policy allows, and block
# rules only on the tunnel, where "allow everything" needs exceptions.
$ErrorActionPreference = 'Stop'
Set-StrictMode -Version 3.0
$Group = 'ksbpf'
$State = Join-Path $env:ProgramData 'ksbpf'
""" + _STATE_GUARD + """Assert-KsbpfState $State $true | Out-Null
"""

_APPLY_TUNNEL = """\
# The tunnel adapters present now. A rule with an empty -InterfaceAlias would match every
# interface, so the tunnel's rules are skipped (everything stays blocked) until one exists.
$TunnelAliases = @(Get-NetAdapter -IncludeHidden -ErrorAction SilentlyContinue |
    Where-Object { $n = $_.Name; @($TunnelPatterns | Where-Object { $n -like $_ }).Count -gt 0 } |
    ForEach-Object { [WildcardPattern]::Escape($_.Name) })
if ($TunnelAliases.Count -eq 0) {
    Write-Warning "ksbpf: no adapter matches $($TunnelPatterns -join ', '): everything stays blocked; run this again once the tunnel is up"
}
"""

_APPLY_BODY = """\
# 1. Fail closed first: default Block both ways on every profile (the settings found the
#    first time are kept for rollback.ps1).
$ProfilesFile = Join-Path $State 'profiles.xml'
if (-not (Test-Path $ProfilesFile)) {
    Get-NetFirewallProfile | Select-Object -Property @('Name', 'Enabled', 'DefaultInboundAction', 'DefaultOutboundAction') |
        Export-Clixml -Path $ProfilesFile
}
Set-NetFirewallProfile -Profile @('Domain', 'Private', 'Public') -Enabled True -DefaultInboundAction Block -DefaultOutboundAction Block

# 2. Every other enabled allow rule of the local store would open a hole the policy does
#    not: disable them, listed first so that rollback.ps1 re-enables exactly these.
$DisabledFile = Join-Path $State 'disabled-rules.xml'
$Already = @(if (Test-Path $DisabledFile) { Import-Clixml -Path $DisabledFile })
$Foreign = @(Get-NetFirewallRule -PolicyStore PersistentStore -Enabled True -Action Allow -ErrorAction SilentlyContinue |
    Where-Object { $_.Group -ne $Group })
if ($Foreign.Count -gt 0) {
    @(@($Already) + @($Foreign | ForEach-Object { $_.Name }) | Select-Object -Unique) | Export-Clixml -Path $DisabledFile
    $Foreign | Disable-NetFirewallRule
}

# 3. Replace ksbpf's own rules: old allows go before old blocks, new blocks come before new
#    allows, so no allow ever stands without the blocks that narrow it.
Get-NetFirewallRule -Group $Group -Action Allow -ErrorAction SilentlyContinue | Remove-NetFirewallRule
Get-NetFirewallRule -Group $Group -ErrorAction SilentlyContinue | Remove-NetFirewallRule
$Made = 0
foreach ($Rule in $Rules) {
    if ($Rule.ContainsKey('InterfaceAlias') -and $Rule['InterfaceAlias'].Count -eq 0) { continue }
    New-NetFirewallRule @Rule -Group $Group -Profile Any -Enabled True | Out-Null
    $Made++
}

# 4. Interface metrics: the tunnel's routes win over the physical ones (values found the
#    first time are kept for rollback.ps1).
if ($TunnelAliases.Count -gt 0) {
    $MetricsFile = Join-Path $State 'metrics.xml'
    $Saved = @(if (Test-Path $MetricsFile) { Import-Clixml -Path $MetricsFile })
    $Known = @($Saved | ForEach-Object { "$($_.InterfaceAlias)/$($_.AddressFamily)" })
    $New = @(Get-NetIPInterface -InterfaceAlias $TunnelAliases -ErrorAction SilentlyContinue |
        Where-Object { $Known -notcontains "$($_.InterfaceAlias)/$($_.AddressFamily)" } |
        Select-Object -Property @('InterfaceAlias', 'AddressFamily', 'AutomaticMetric', 'InterfaceMetric'))
    if ($New.Count -gt 0) { @(@($Saved) + $New) | Export-Clixml -Path $MetricsFile }
    Set-NetIPInterface -InterfaceAlias $TunnelAliases -AutomaticMetric Disabled -InterfaceMetric $TunnelMetric
}

# 5. Read back what the firewall holds.
$Have = @(Get-NetFirewallRule -Group $Group -ErrorAction SilentlyContinue).Count
if ($Have -ne $Made) { throw "ksbpf: made $Made rules but the firewall holds $Have" }
foreach ($P in Get-NetFirewallProfile) {
    if ($P.DefaultOutboundAction -ne 'Block' -or $P.DefaultInboundAction -ne 'Block') {
        throw "ksbpf: profile $($P.Name) does not block by default"
    }
}
$Others = @(Get-NetFirewallRule -PolicyStore ActiveStore -Enabled True -Action Allow -ErrorAction SilentlyContinue |
    Where-Object { $_.Group -ne $Group })
if ($Others.Count -gt 0) {
    Write-Warning "ksbpf: $($Others.Count) allow rules from group policy or app containers stay active and may pass traffic outside the tunnel: $(($Others | ForEach-Object { $_.DisplayName }) -join '; ')"
}
"ksbpf: kill switch engaged ($Made rules)"
"""

_ROLLBACK = """\
#Requires -RunAsAdministrator
# ksbpf: the emergency key. Removes the kill switch from Windows Defender Firewall and
# restores what apply.ps1 changed. Every step runs even if one before it failed.
$ErrorActionPreference = 'Continue'
$Group = 'ksbpf'
$State = Join-Path $env:ProgramData 'ksbpf'
$Failed = $false
""" + _STATE_GUARD + """# A state folder that is not trusted is not read: its rules and defaults are undone all the
# same, to Windows' own defaults.
$StateTrusted = $false
try { $StateTrusted = Assert-KsbpfState $State $false } catch { Write-Warning "$_"; $Failed = $true }

# 1. Default actions first: from here on only explicit block rules block.
$ProfilesFile = Join-Path $State 'profiles.xml'
try {
    if ($StateTrusted -and (Test-Path $ProfilesFile)) {
        foreach ($P in Import-Clixml -Path $ProfilesFile) {
            Set-NetFirewallProfile -Name $P.Name -Enabled $P.Enabled -DefaultInboundAction $P.DefaultInboundAction -DefaultOutboundAction $P.DefaultOutboundAction -ErrorAction Stop
        }
    } else {
        # No record of the settings before: Windows' own defaults.
        Set-NetFirewallProfile -Profile @('Domain', 'Private', 'Public') -DefaultInboundAction Block -DefaultOutboundAction Allow -ErrorAction Stop
    }
} catch { Write-Warning "ksbpf: profiles: $_"; $Failed = $true }

# 2. ksbpf's rules.
try {
    Get-NetFirewallRule -Group $Group -ErrorAction SilentlyContinue | Remove-NetFirewallRule -ErrorAction Stop
} catch { Write-Warning "ksbpf: rules: $_"; $Failed = $true }

# 3. The allow rules apply.ps1 disabled, matched by exact name.
$DisabledFile = Join-Path $State 'disabled-rules.xml'
try {
    if ($StateTrusted -and (Test-Path $DisabledFile)) {
        $Names = @(Import-Clixml -Path $DisabledFile)
        Get-NetFirewallRule -PolicyStore PersistentStore | Where-Object { $Names -contains $_.Name } |
            Enable-NetFirewallRule -ErrorAction Stop
    }
} catch { Write-Warning "ksbpf: re-enabling rules: $_"; $Failed = $true }

# 4. The tunnel's interface metrics.
$MetricsFile = Join-Path $State 'metrics.xml'
if ($StateTrusted -and (Test-Path $MetricsFile)) {
    foreach ($M in Import-Clixml -Path $MetricsFile) {
        try {
            $Alias = [WildcardPattern]::Escape($M.InterfaceAlias)
            if ("$($M.AutomaticMetric)" -eq 'Enabled') {
                Set-NetIPInterface -InterfaceAlias $Alias -AddressFamily $M.AddressFamily -AutomaticMetric Enabled -ErrorAction Stop
            } else {
                Set-NetIPInterface -InterfaceAlias $Alias -AddressFamily $M.AddressFamily -InterfaceMetric $M.InterfaceMetric -ErrorAction Stop
            }
        } catch { Write-Warning "ksbpf: metric of $($M.InterfaceAlias): $_" }
    }
}

if ($Failed) {
    Write-Warning "ksbpf: rollback incomplete, see above; state kept in $State"
    exit 1
}
Remove-Item -Recurse -Force -Path $State -ErrorAction SilentlyContinue
'ksbpf: kill switch removed'
"""


def _apply_script(policy: Policy, rules: list[_Rule]) -> str:
    patterns = ", ".join(_ps_quote(p) for p in policy.tunnel.interfaces)
    return (
        _APPLY_HEAD
        + "\n# The policy's tunnel interfaces (a trailing * is a prefix, as -like reads it).\n"
        + f"$TunnelPatterns = @({patterns})\n"
        + f"$TunnelMetric = {TUNNEL_METRIC}\n"
        + _APPLY_TUNNEL
        + "\n# ksbpf's rules (group ksbpf, every profile).\n"
        + "$Rules = @(\n"
        + "\n".join(r.ps() for r in rules)
        + "\n)\n\n"
        + _APPLY_BODY
    )


def render_windows(
    policy: Policy,
    *,
    endpoint_program: str | None = None,
    exempt_programs: Mapping[str, str] | None = None,
) -> Rendered:
    """The Windows rendering of `policy`: files `apply.ps1` and `rollback.ps1`.

    `endpoint_program` restricts the endpoint exception to the tunnel client's program;
    `exempt_programs` maps an exemption's cgroup to the program it stands for (otherwise a
    `.../NAME.service` cgroup stands for the Windows service NAME). Raises ValueError for
    any value it cannot render safely.
    """
    _guard.check_policy(policy)
    if endpoint_program is not None:
        _program(endpoint_program, "endpoint_program")
    programs = dict(exempt_programs or {})
    for cg, path in programs.items():
        _guard.cgroup(cg, "exempt_programs cgroup")
        _program(path, f"program for {cg}")
    stray = sorted(set(programs) - {ex.cgroup for ex in policy.exemptions})
    if stray:
        raise ValueError(f"exempt_programs names cgroups the policy does not exempt: {', '.join(stray)}")
    named = [p.lower() for p in (*programs.values(), *([endpoint_program] if endpoint_program else []))]
    shared = sorted({p for p in named if named.count(p) > 1})
    if shared:
        raise ValueError(f"a program may stand for one cgroup or the tunnel client only: {', '.join(shared)}")
    identities: dict[str, tuple[str, str]] = {}
    services = [service_for(ex.cgroup) for ex in policy.exemptions if ex.cgroup not in programs]
    for ex in policy.exemptions:
        svc = service_for(ex.cgroup)
        if ex.cgroup in programs:
            identities[ex.cgroup] = ("Program", programs[ex.cgroup])
        elif svc is not None and services.count(svc) == 1:
            # Two cgroups naming one service (a.slice/x.service, b.slice/x.service) stay
            # unsupported: the firewall could not tell their grants apart.
            identities[ex.cgroup] = ("Service", svc)
    rules = _Rules(policy, endpoint_program, identities).build()
    files = {"apply.ps1": _apply_script(policy, rules), "rollback.ps1": _ROLLBACK}
    for name, text in files.items():
        _guard.printable(name, text)
    return Rendered("windows", files, tuple(_unsupported(policy, endpoint_program, identities)))

