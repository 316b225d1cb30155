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
# %ProgramData% lets standard users create folders: one who made ksbpf\ first could plant a
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
Assert-KsbpfState $State $true | Out-Null

# The policy's tunnel interfaces (a trailing * is a prefix, as -like reads it).
$TunnelPatterns = @('utun4')
$TunnelMetric = 1
# The tunnel adapters present now. A rule with an empty -InterfaceAlias would match every
# interface, so the tunnel's rules are skipped (everything stays blocked) until one exists.
$TunnelAliases = @(Get-NetAdapter -IncludeHidden -ErrorAction SilentlyContinue |
    Where-Object { $n = $_.Name; @($TunnelPatterns | Where-Object { $n -like $_ }).Count -gt 0 } |
    ForEach-Object { [WildcardPattern]::Escape($_.Name) })
if ($TunnelAliases.Count -eq 0) {
    Write-Warning "ksbpf: no adapter matches $($TunnelPatterns -join ', '): everything stays blocked; run this again once the tunnel is up"
}

# ksbpf's rules (group ksbpf, every profile).
$Rules = @(
    @{ Name = 'ksbpf-out-tunnel-dns-tcp'; DisplayName = 'ksbpf: DNS on the tunnel only to the configured resolvers (TCP)'; Direction = 'Outbound'; Action = 'Block'; InterfaceAlias = $TunnelAliases; Protocol = 'TCP'; RemotePort = @('53', '853') }
    @{ Name = 'ksbpf-out-tunnel-dns-udp'; DisplayName = 'ksbpf: DNS on the tunnel only to the configured resolvers (UDP)'; Direction = 'Outbound'; Action = 'Block'; InterfaceAlias = $TunnelAliases; Protocol = 'UDP'; RemotePort = @('53', '853') }
    @{ Name = 'ksbpf-out-tunnel'; DisplayName = 'ksbpf: everything through the tunnel'; Direction = 'Outbound'; Action = 'Allow'; InterfaceAlias = $TunnelAliases }
    @{ Name = 'ksbpf-in-tunnel'; DisplayName = 'ksbpf: everything from the tunnel'; Direction = 'Inbound'; Action = 'Allow'; InterfaceAlias = $TunnelAliases }
    @{ Name = 'ksbpf-out-nd'; DisplayName = 'ksbpf: IPv6 neighbour discovery'; Direction = 'Outbound'; Action = 'Allow'; Protocol = 'ICMPv6'; IcmpType = @('133', '134', '135', '136') }
    @{ Name = 'ksbpf-in-nd'; DisplayName = 'ksbpf: IPv6 neighbour discovery'; Direction = 'Inbound'; Action = 'Allow'; Protocol = 'ICMPv6'; IcmpType = @('133', '134', '135', '136') }
    @{ Name = 'ksbpf-out-dhcp4'; DisplayName = 'ksbpf: DHCPv4 client'; Direction = 'Outbound'; Action = 'Allow'; Protocol = 'UDP'; LocalPort = '68'; RemotePort = '67'; RemoteAddress = @('0.0.0.0-255.255.255.255') }
    @{ Name = 'ksbpf-in-dhcp4'; DisplayName = 'ksbpf: DHCPv4 replies'; Direction = 'Inbound'; Action = 'Allow'; Protocol = 'UDP'; LocalPort = '68'; RemotePort = '67'; RemoteAddress = @('0.0.0.0-255.255.255.255') }
    @{ Name = 'ksbpf-out-dhcp6'; DisplayName = 'ksbpf: DHCPv6 client'; Direction = 'Outbound'; Action = 'Allow'; Protocol = 'UDP'; LocalPort = '546'; RemotePort = '547'; RemoteAddress = @('::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff') }
    @{ Name = 'ksbpf-in-dhcp6'; DisplayName = 'ksbpf: DHCPv6 replies'; Direction = 'Inbound'; Action = 'Allow'; Protocol = 'UDP'; LocalPort = '546'; RemotePort = '547'; RemoteAddress = @('::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff') }
)

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
