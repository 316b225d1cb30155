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
created later is blocked until apply.ps1 runs again (the scheduled task, TASK_XML, runs it
at boot and whenever a network connects). Exemptions need a Windows identity, given in the
policy and never guessed from a cgroup's name: `[exempt.windows] service` and/or
`program`; the endpoint exception is open to every program unless `[tunnel.windows]
endpoint_service` and/or `endpoint_program` name the tunnel client. With both, a socket
must match both (the firewall's -Service and -Program).

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal
from xml.sax.saxutils import escape

from ksbpf.policy import (
    Endpoint,
    Exemption,
    IPAddress,
    IPNetwork,
    Policy,
    PortSpec,
    validate_windows_program,
    validate_windows_service,
    windows_conflict,
)
from ksbpf.render import _guard
from ksbpf.render.base import Rendered, Unsupported
from ksbpf.verdict import DHCP4_CLIENT, DHCP4_SERVER, DHCP6_CLIENT, DHCP6_SERVER, DNS_PORTS, ND_ICMPV6_TYPES

GROUP = "ksbpf"
TUNNEL_METRIC = 1
ALL4 = "0.0.0.0-255.255.255.255"
ALL6 = "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"

# Where the scheduled task finds apply.ps1 (README: copy the rendered files there).
INSTALL_DIR = "C:\\Program Files\\ksbpf"
TASK_NAME = "ksbpf"
TASK_XML = "ksbpf-task.xml"
# Microsoft-Windows-NetworkProfile/Operational 10000: a network (a tunnel adapter too) connected.
NETWORK_CONNECTED = ("Microsoft-Windows-NetworkProfile/Operational", 10000)

Direction = Literal["Outbound", "Inbound"]
BOTH: tuple[Direction, Direction] = ("Outbound", "Inbound")
TUNNEL = object()  # stands for $TunnelAliases in a rule


def _program(path: object, what: str) -> str:
    return _guard.subject(path, what, "a program path like C:\\Program Files\\X\\x.exe", validate_windows_program)


def _service(name: object, what: str) -> str:
    return _guard.subject(name, what, "a Windows service name", validate_windows_service)


def identity(service: str | None, program: str | None) -> dict[str, str]:
    """The firewall conditions for a Windows subject ({} for none)."""
    who = {}
    if service is not None:
        who["Service"] = service
    if program is not None:
        who["Program"] = program
    return who


def exemption_identity(ex: Exemption) -> dict[str, str]:
    return identity(ex.windows_service, ex.windows_program)


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
    def __init__(self, policy: Policy) -> None:
        self.p = policy
        self.endpoint_who = identity(policy.tunnel.windows_endpoint_service, policy.tunnel.windows_endpoint_program)
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
            self.add(f"endpoint{i}", f"VPN endpoint {ep}", "Outbound", "Allow", **common, **self.endpoint_who)
            self.add(f"endpoint{i}", f"VPN endpoint {ep} replies", "Inbound", "Allow", **common)

    def _exemptions(self) -> None:
        for i, ex in enumerate(self.p.exemptions):
            who = exemption_identity(ex)
            if not who:
                continue
            name = " ".join(who.values())
            for j, spec in enumerate(ex.allow):
                remote = self.nets(ex.to)
                if remote is False:
                    continue
                common = {"Protocol": spec.proto.upper(), "RemotePort": _ports(spec), "RemoteAddress": remote, **who}
                self.add(f"exempt{i}-allow{j}", f"exempt[{i}] {name} to {spec}", "Outbound", "Allow", **common)
                self.add(f"exempt{i}-allow{j}", f"exempt[{i}] {name} replies from {spec}", "Inbound", "Allow", **common)
            for j, spec in enumerate(ex.listen):
                remote = self.nets(ex.from_)
                if remote is False:
                    continue
                common = {"Protocol": spec.proto.upper(), "LocalPort": _ports(spec), "RemoteAddress": remote, **who}
                self.add(f"exempt{i}-listen{j}", f"exempt[{i}] {name} listening on {spec}", "Inbound", "Allow", **common)
                self.add(f"exempt{i}-listen{j}", f"exempt[{i}] {name} answering on {spec}", "Outbound", "Allow", **common)

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


def _unsupported(policy: Policy) -> list[Unsupported]:
    out: list[Unsupported] = []
    t = policy.tunnel
    endpoint_who = identity(t.windows_endpoint_service, t.windows_endpoint_program)
    if t.endpoints and not endpoint_who:
        out.append(Unsupported(
            "tunnel.windows",
            "names no tunnel client: firewall rules cannot match cgroups or socket marks, so every local program "
            "may reach the endpoints (name it in [tunnel.windows] endpoint_service or endpoint_program)",
        ))
    if t.endpoints and endpoint_who:
        for i, ep in enumerate(t.endpoints):
            via = _other_ways_to(policy, ep)
            if via:
                out.append(Unsupported(
                    f"tunnel.endpoints[{i}]",
                    f"other programs reach {ep} through {via}: a Windows block rule cannot spare one program, "
                    "so the endpoint check cannot drop them first as verdict() does",
                ))
    for i, ex in enumerate(policy.exemptions):
        if not exemption_identity(ex):
            out.append(Unsupported(
                f"exempt[{i}].windows",
                f"not set: exempt[{i}] ({ex.cgroup}) is not applied on Windows and its traffic outside the tunnel "
                "stays blocked (name the service or program it stands for in [exempt.windows] service or program)",
            ))
    if policy.lan_networks(4) or (policy.ipv6.mode == "tunnel" and policy.lan_networks(6)):
        out.append(Unsupported(
            "lan.networks",
            "a Windows rule names one IP protocol and cannot except ports from 'any protocol': TCP and UDP "
            "(except the DNS ports) and ICMP to the LAN are allowed; other IP protocols to the LAN stay blocked",
        ))
    return out


def _other_ways_to(policy: Policy, ep: Endpoint) -> str:
    """Which allow rule, beside the endpoint's own, lets another program's packet to `ep` out."""
    if ep.family == 6 and policy.ipv6.mode == "block":
        return ""
    if ep.port not in DNS_PORTS and any(ep.address in n for n in policy.lan_networks(ep.family)):
        return "the LAN rules"
    for i, ex in enumerate(policy.exemptions):
        if not exemption_identity(ex):
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
# 6. The scheduled task (if installed) engages again at boot and when a network connects;
#    rollback.ps1 disabled it.
try { Enable-ScheduledTask -TaskName 'ksbpf' -ErrorAction Stop | Out-Null } catch { }
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

# 0. The scheduled task first, or it engages the kill switch again at the next boot or network.
try { Disable-ScheduledTask -TaskName 'ksbpf' -ErrorAction Stop | Out-Null } catch { }

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


# The emergency key does not depend on the policy: `ksctl down` runs it as it is.
ROLLBACK_SCRIPT = _ROLLBACK

# `ksctl status`: what the firewall holds, as one JSON object on stdout.
STATUS_SCRIPT = """\
$ErrorActionPreference = 'Stop'
$Rules = @(Get-NetFirewallRule -Group 'ksbpf' -ErrorAction SilentlyContinue |
    ForEach-Object { @{ Name = $_.Name; Action = "$($_.Action)"; Direction = "$($_.Direction)"; Enabled = "$($_.Enabled)" } })
$Profiles = @(Get-NetFirewallProfile |
    ForEach-Object { @{ Name = $_.Name; Enabled = "$($_.Enabled)"; DefaultInboundAction = "$($_.DefaultInboundAction)"; DefaultOutboundAction = "$($_.DefaultOutboundAction)" } })
$Adapters = @(Get-NetAdapter -IncludeHidden -ErrorAction SilentlyContinue | ForEach-Object { $_.Name })
ConvertTo-Json -Depth 4 -Compress -InputObject @{ Rules = $Rules; Profiles = $Profiles; Adapters = $Adapters }
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


def task_xml(install_dir: str = INSTALL_DIR) -> str:
    """The scheduled task that runs apply.ps1 as SYSTEM at boot and whenever a network
    connects (a tunnel adapter appearing), so a new adapter gets its rules."""
    log, event_id = NETWORK_CONNECTED
    query = (f'<QueryList><Query Id="0" Path="{log}"><Select Path="{log}">'
             f"*[System[(EventID={event_id})]]</Select></Query></QueryList>")
    args = f'-NoProfile -NonInteractive -ExecutionPolicy Bypass -File "{install_dir}\\apply.ps1"'
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">\n'
        "  <RegistrationInfo>\n"
        "    <Description>ksbpf: engage the kill switch at boot and when a network (the tunnel) connects</Description>\n"
        f"    <URI>\\{TASK_NAME}</URI>\n"
        "  </RegistrationInfo>\n"
        "  <Triggers>\n"
        "    <BootTrigger>\n"
        "      <Enabled>true</Enabled>\n"
        "    </BootTrigger>\n"
        "    <EventTrigger>\n"
        "      <Enabled>true</Enabled>\n"
        f"      <Subscription>{escape(query)}</Subscription>\n"
        "    </EventTrigger>\n"
        "  </Triggers>\n"
        "  <Principals>\n"
        '    <Principal id="Author">\n'
        "      <UserId>S-1-5-18</UserId>\n"
        "      <RunLevel>HighestAvailable</RunLevel>\n"
        "    </Principal>\n"
        "  </Principals>\n"
        "  <Settings>\n"
        "    <MultipleInstancesPolicy>Queue</MultipleInstancesPolicy>\n"
        "    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>\n"
        "    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>\n"
        "    <ExecutionTimeLimit>PT10M</ExecutionTimeLimit>\n"
        "    <Enabled>true</Enabled>\n"
        "  </Settings>\n"
        '  <Actions Context="Author">\n'
        "    <Exec>\n"
        "      <Command>%SystemRoot%\\System32\\WindowsPowerShell\\v1.0\\powershell.exe</Command>\n"
        f"      <Arguments>{escape(args)}</Arguments>\n"
        "    </Exec>\n"
        "  </Actions>\n"
        "</Task>\n"
    )


def render_windows(policy: Policy) -> Rendered:
    """The Windows rendering of `policy`: files `apply.ps1`, `rollback.ps1` and the
    scheduled task `ksbpf-task.xml`. The subjects come from the policy: `[tunnel.windows]
    endpoint_service`/`endpoint_program` and each exemption's `[exempt.windows]`
    service/program. Raises ValueError for any value it cannot render safely.
    """
    _guard.check_policy(policy)
    t = policy.tunnel
    if t.windows_endpoint_service is not None:
        _service(t.windows_endpoint_service, "tunnel.windows.endpoint_service")
    if t.windows_endpoint_program is not None:
        _program(t.windows_endpoint_program, "tunnel.windows.endpoint_program")
    for i, ex in enumerate(policy.exemptions):
        if ex.windows_service is not None:
            _service(ex.windows_service, f"exempt[{i}].windows.service")
        if ex.windows_program is not None:
            _program(ex.windows_program, f"exempt[{i}].windows.program")
    # The firewall sees only the subject: one shared by two grants would get both.
    conflict = windows_conflict(t, policy.exemptions)
    if conflict is not None:
        raise ValueError(f"refusing to render {conflict[0]}: {conflict[1]}")
    rules = _Rules(policy).build()
    files = {"apply.ps1": _apply_script(policy, rules), "rollback.ps1": _ROLLBACK, TASK_XML: task_xml()}
    for name, text in files.items():
        _guard.printable(name, text)
    return Rendered("windows", files, tuple(_unsupported(policy)))
