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
ksbpf_tunnel = "{ utun0 utun1 utun2 utun3 utun4 utun5 utun6 utun7 utun8 utun9 utun10 utun11 utun12 utun13 utun14 utun15 utun16 utun17 utun18 utun19 utun20 utun21 utun22 utun23 utun24 utun25 utun26 utun27 utun28 utun29 utun30 utun31 wg0 wg1 wg2 wg3 wg4 wg5 wg6 wg7 wg8 wg9 wg10 wg11 wg12 wg13 wg14 wg15 wg16 wg17 wg18 wg19 wg20 wg21 wg22 wg23 wg24 wg25 wg26 wg27 wg28 wg29 wg30 wg31 }"

# outbound on the tunnel: DNS only to the configured resolvers
pass out quick on $ksbpf_tunnel proto { tcp udp } to fd00:64::1 port { 53 853 } no state
block drop out quick on $ksbpf_tunnel proto { tcp udp } to any port { 53 853 }
pass out quick on $ksbpf_tunnel all no state
# loopback (pf.conf skips lo0 already; this covers a main ruleset that does not)
pass out quick on lo0 all no state
# neighbour discovery and DHCP on any interface
pass out quick inet6 proto icmp6 all icmp6-type { 133 134 135 136 } no state
pass out quick inet proto udp from any port 68 to any port 67 no state
pass out quick inet6 proto udp from any port 546 to any port 547 no state
# VPN endpoints outside the tunnel
pass out quick inet6 proto udp to 2001:db8::7 port 51820 no state
pass out quick inet proto udp to 198.51.100.7 port 51820 no state
# DNS outside the tunnel, before LAN: a LAN resolver is still a leak
block drop out quick proto { tcp udp } to any port { 53 853 }
# LAN
pass out quick to fd12:3456::/64 no state
block drop out quick all

# inbound on the tunnel
pass in quick on $ksbpf_tunnel all no state
pass in quick on lo0 all no state
# neighbour discovery and DHCP replies on any interface
pass in quick inet6 proto icmp6 all icmp6-type { 133 134 135 136 } no state
pass in quick inet proto udp from any port 67 to any port 68 no state
pass in quick inet6 proto udp from any port 547 to any port 546 no state
# VPN endpoints' replies
pass in quick inet6 proto udp from 2001:db8::7 port 51820 no state
pass in quick inet proto udp from 198.51.100.7 port 51820 no state
# LAN
pass in quick from fd12:3456::/64 no state
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
