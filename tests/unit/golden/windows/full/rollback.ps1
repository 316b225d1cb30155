#Requires -RunAsAdministrator
# ksbpf: the emergency key. Removes the kill switch from Windows Defender Firewall and
# restores what apply.ps1 changed. Every step runs even if one before it failed.
$ErrorActionPreference = 'Continue'
$Group = 'ksbpf'
$State = Join-Path $env:ProgramData 'ksbpf'
$Failed = $false

# 1. Default actions first: from here on only explicit block rules block.
$ProfilesFile = Join-Path $State 'profiles.xml'
try {
    if (Test-Path $ProfilesFile) {
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
    if (Test-Path $DisabledFile) {
        $Names = @(Import-Clixml -Path $DisabledFile)
        Get-NetFirewallRule -PolicyStore PersistentStore | Where-Object { $Names -contains $_.Name } |
            Enable-NetFirewallRule -ErrorAction Stop
    }
} catch { Write-Warning "ksbpf: re-enabling rules: $_"; $Failed = $true }

# 4. The tunnel's interface metrics.
$MetricsFile = Join-Path $State 'metrics.xml'
if (Test-Path $MetricsFile) {
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
