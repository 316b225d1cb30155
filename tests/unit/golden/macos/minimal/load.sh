#!/bin/sh
# ksbpf: engage the PF kill switch on macOS (as root). Rendered by ksbpf; undo with rollback.sh.
# Order: check both rulesets, load the anchor, then the main ruleset that calls it,
# enable PF holding a reference, and drop the states made before the rules.
set -eu
umask 077
STATE="${KSBPF_STATE_DIR:-/var/run/ksbpf}"
mkdir -p "$STATE"

cat > "$STATE/anchor.conf" <<'KSBPF_ANCHOR'
# ksbpf anchor: rendered by ksbpf from a policy; load it with load.sh.
# Every rule is quick and stateless: the first match decides, in verdict()'s order.

# The tunnel interfaces. PF has no wildcards: a glob is spelled out unit by unit.
ksbpf_tunnel = "utun4"

# outbound on the tunnel: DNS only to the configured resolvers
block drop out quick on $ksbpf_tunnel proto { tcp udp } to any port { 53 853 }
pass out quick on $ksbpf_tunnel all no state
# loopback (pf.conf skips lo0 already; this covers a main ruleset that does not)
pass out quick on lo0 all no state
# neighbour discovery and DHCP on any interface
pass out quick inet6 proto icmp6 all icmp6-type { 133 134 135 136 } no state
pass out quick inet proto udp from any port 68 to any port 67 no state
pass out quick inet6 proto udp from any port 546 to any port 547 no state
# DNS outside the tunnel, before LAN: a LAN resolver is still a leak
block drop out quick proto { tcp udp } to any port { 53 853 }
block drop out quick all

# inbound on the tunnel
pass in quick on $ksbpf_tunnel all no state
pass in quick on lo0 all no state
# neighbour discovery and DHCP replies on any interface
pass in quick inet6 proto icmp6 all icmp6-type { 133 134 135 136 } no state
pass in quick inet proto udp from any port 67 to any port 68 no state
pass in quick inet6 proto udp from any port 547 to any port 546 no state
block drop in quick all
KSBPF_ANCHOR

cat > "$STATE/main.conf" <<'KSBPF_MAIN'
# ksbpf: the main ruleset while the kill switch is engaged: /etc/pf.conf (unchanged on
# disk) with ksbpf's options on top and its anchor first among the filter rules.
# rollback.sh and `ksctl down` load /etc/pf.conf again.
set skip on lo0
set block-policy drop
scrub-anchor "com.apple/*"
nat-anchor "com.apple/*"
rdr-anchor "com.apple/*"
dummynet-anchor "com.apple/*"
anchor "ksbpf"
anchor "com.apple/*"
load anchor "com.apple" from "/etc/pf.anchors/com.apple"
KSBPF_MAIN

# Parse both first (-n loads nothing): a ruleset pfctl refuses changes nothing.
pfctl -n -f "$STATE/main.conf"
pfctl -n -a ksbpf -f "$STATE/anchor.conf"

# Engaged already, as this loaded it (the LaunchDaemon runs this every minute): PF
# enabled, the main ruleset calls the anchor, and the anchor holds what was read back
# after the last load of this same anchor. Then change nothing (no state flush).
if [ -f "$STATE/token" ] && [ -f "$STATE/loaded.rules" ] && [ -f "$STATE/loaded.anchor" ] &&
    cmp -s "$STATE/anchor.conf" "$STATE/loaded.anchor" &&
    pfctl -s info 2>/dev/null | grep -q '^Status: Enabled' &&
    pfctl -s rules 2>/dev/null | grep -qx 'anchor "ksbpf" all' &&
    [ "$(pfctl -a ksbpf -s rules 2>/dev/null)" = "$(cat "$STATE/loaded.rules")" ]; then
    exit 0
fi

# IPv4 strong host model: a packet for a local address must arrive on that address's
# interface (CVE-2019-14899). Set before PF changes, kept for rollback.sh.
[ -f "$STATE/check_interface" ] || sysctl -n net.inet.ip.check_interface > "$STATE/check_interface"
sysctl -w net.inet.ip.check_interface=1 > /dev/null

# The anchor before the main ruleset: until the main ruleset calls it, it filters
# nothing; the other way round PF would run an empty anchor and pass everything.
# Each pfctl -f is one transaction: packets see the old rules or the new, never none.
pfctl -a ksbpf -f - < "$STATE/anchor.conf"
pfctl -f - < "$STATE/main.conf"

# Enable PF holding a reference (pfctl -E prints a token); rollback.sh releases exactly
# that one, so PF stays on for anyone else who enabled it. A re-run swaps its token.
token=$(pfctl -E 2>&1 | sed -n 's/^Token : *//p')
case "$token" in ''|*[!0-9]*) echo "ksbpf: pfctl -E gave no token" >&2; exit 1 ;; esac
old=$(cat "$STATE/token" 2>/dev/null || true)
echo "$token" > "$STATE/token"
case "$old" in ''|*[!0-9]*) ;; *) pfctl -X "$old" 2>/dev/null || true ;; esac

# A state matches before any rule. The anchor makes none (no state), so every state
# predates it or comes from outside it, and any of them could carry a flow the anchor
# now blocks: drop them all.
pfctl -F states

# Read back what the kernel holds, and keep it for the check above and ksctl status.
pfctl -s info | grep -q '^Status: Enabled' || { echo 'ksbpf: PF is not enabled' >&2; exit 1; }
pfctl -a ksbpf -s rules > "$STATE/loaded.rules"
grep -q . "$STATE/loaded.rules" || { echo 'ksbpf: anchor ksbpf is empty' >&2; exit 1; }
cp "$STATE/anchor.conf" "$STATE/loaded.anchor"
echo 'ksbpf: PF kill switch engaged'
