"""Reconciliation: keep what the kernel enforces equal to the policy, after the daemon
engaged it.

Event-driven where the kernel offers events, with periodic checks as a backstop:

- rtnetlink (pyroute2, bound inside the namespace): links appearing, changing and going
  (a tunnel recreated with a new ifindex is followed by the routing default and the BPF
  tunnel map; a new non-tunnel interface gets its netdev egress chain) and changes to
  ksbpf's ip rules and routing table;
- nfnetlink (NFNLGRP_NFTABLES, a raw socket inside the namespace): any change to the
  ksbpf tables by another process;
- inotify on the cgroup directories exemptions name: a service restarted gets a new
  cgroup id and its exemption follows;
- BPF attachments have no notification: they are polled (cheap: a few bpf(2) calls).

Events only trigger checks; a check compares the kernel with what the policy renders
and repairs (and counts) a difference. The daemon's own changes trigger checks that
find nothing. Drift seen while the applied-policy record is gone is `ksctl down` at
work: not repaired (ExternalDown).

A run-time exemption change is O(changed) here: the cgroups of the exemptions that
came or went are resolved and watched, and the ruleset's fingerprint (a listing of
every set element, O(n)) is not taken on the request's path. Instead the nftables
generation the last fingerprint was taken at is kept: the next check takes a new one
if the nfnetlink watcher saw no other process change the ksbpf tables since that
generation (every transaction ends with its generation id and writer's pid), and
treats the tables as drifted if one did, or if notifications were lost meanwhile.

The package, by seam:

- `watchers`: the threads that turn kernel notifications into `Event`s for the daemon's
  queue (rtnetlink through pyroute2, nfnetlink through ksbpf.linux.netlink, inotify
  through ksbpf.linux.inotify), and the nftables generation bookkeeping;
- `shape`: pure: what an nftables ruleset is made of (`NftShape`) and its fingerprint;
- `probes`: what the kernel holds now: the ksbpf tables' listing (at a generation),
  the links split by the policy, cgroup directories and ids;
- `reconciler`: `Reconciler`, which compares those with the policy and repairs drift.
"""
