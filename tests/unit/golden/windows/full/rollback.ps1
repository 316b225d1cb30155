#Requires -RunAsAdministrator
# ksbpf: the emergency key. Removes the kill switch from Windows Defender Firewall and
# restores what apply.ps1 changed. Every step runs even if one before it failed.
$ErrorActionPreference = 'Continue'
$Group = 'ksbpf'
$State = Join-Path $env:ProgramData 'ksbpf'
$Failed = $false
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
# A state folder that is not trusted is not read: its rules and defaults are undone all the
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
