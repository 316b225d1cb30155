#!/bin/sh
# ksbpf: the emergency key. Removes the PF kill switch and restores the system's
# PF configuration (as root). Every step runs even if one before it failed.
# If PF still blocks afterwards, `pfctl -d` disables PF altogether.
set -u
STATE="${KSBPF_STATE_DIR:-/var/run/ksbpf}"
rc=0
# The LaunchDaemon first, or it engages the kill switch again within a minute.
launchctl bootout system/org.ksbpf.pf 2>/dev/null || true
# The system's main ruleset next: after it nothing calls the anchor.
pfctl -f /etc/pf.conf || rc=1
pfctl -a ksbpf -F rules || rc=1
# Release the reference load.sh took; PF stays enabled only if someone else holds one.
token=$(cat "$STATE/token" 2>/dev/null || true)
case "$token" in ''|*[!0-9]*) ;; *) pfctl -X "$token" || rc=1 ;; esac
old=$(cat "$STATE/check_interface" 2>/dev/null || true)
case "$old" in 0|1) sysctl -w net.inet.ip.check_interface="$old" > /dev/null || rc=1 ;; esac
[ "$rc" -eq 0 ] && rm -rf "$STATE"
[ "$rc" -eq 0 ] && echo "ksbpf: PF kill switch removed" || echo "ksbpf: rollback incomplete, see above" >&2
exit "$rc"
