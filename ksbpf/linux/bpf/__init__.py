"""The cgroup-bpf layer: BCC compiles `bpf/killswitch.c`, this package loads, fills,
attaches, replaces and reads it.

Two programs per generation, attached with BPF_F_ALLOW_MULTI to the policy's [bpf] cgroup:
`ks_egress` (cgroup_skb/egress) drops what would leave outside the tunnel and counts it,
`ks_sock_create` (cgroup/sock_create) gives sockets of exempt cgroups their exempt mark
and those of endpoint cgroups the endpoint mark (ksbpf.marks), so routing and nftables
can tell them apart, and records who made each socket. Two more report drops (drop
events, read by ksbpf.linux.events): `ks_kfree_skb` (tp_btf/kfree_skb, attached through a
pinned bpf_link) reports nftables' drops, and `ks_events_flush` (never attached; ksbpfd
runs it) reports what the events' rate limit held back at the end of a flood.

Design, in short (the why of each is next to the code that does it):

- Compiling happens in a short-lived child process (`python -m ksbpf.linux.bpf.loader`):
  BCC and LLVM cost ~100 MiB of RSS that a long-running daemon should not carry. The child
  only compiles, loads and pins; filling maps and attaching happen in the caller's process,
  through libbpf's low-level API (ksbpf.linux.libbpf, libbpf.so.1 via ctypes), so only the
  child imports bcc.
- Pins, per instance, under /sys/fs/bpf/ksbpf/<instance>/:
      drops        per-CPU hash (reason, cgroup id) -> (packets, bytes), shared by all
                   generations so counters survive reloads and restarts
      owners       socket storage: who made each socket (pid, comm, cgroup) and its netns
                   cookie (the netns check on kernels without the cgroup_skb helper)
      events       the drop-event ring buffer ksbpfd reads (ksbpf.linux.events), with
      events_rate  its per-(cgroup, reason, layer) rate limit and
      events_lost  the count of events it had no room for
      g<N>/        one generation: egress, sock_create and its own policy maps, and
                   nft_events, the bpf_link of its kfree_skb program (nftables' drops)
  A generation is one build of the programs. Its maps are filled before it is attached,
  so a program never sees a half-written policy.
- A new policy whose programs would be built exactly as the live generation's (same source,
  cflags, header tree, netns mode; see build_digest) and attach to the same cgroup updates
  the live generation's maps in place, with no compile: the maps hold two policy versions
  (struct ks_config in bpf/killswitch.h), the new one is written beside the live one,
  sharing what did not change, and one u32 flips packets over to it, so a packet is judged
  by one version whole. The old version's entries go after an RCU grace period, when no
  packet can still be reading them. The same policy again writes nothing.
- Capacity: a policy the maps cannot hold is refused before anything is touched
  (check_capacity). Hash maps allocate their buckets up front even without preallocated
  elements, so the endpoint map is sized from the policy in powers of two (Capacity); a
  policy outgrowing its generation's size is built anew, one that shrinks keeps it.
- Replacement: BPF_PROG_ATTACH with BPF_F_REPLACE swaps the old generation's program for
  the new one in place (atomic: never zero, never two). When that is impossible (the
  attach cgroup changed) the new one is attached first and the old one detached after
  (make-before-break; both run meanwhile and any drop wins, so nothing leaks).
- Legacy attachments (not bpf_links) on purpose: they stay until detached, so a loader
  that exits or crashes, or someone deleting the pins, leaves enforcement in place.
- Network namespaces: a program on a cgroup sees that cgroup's sockets in every netns,
  and ifindexes are per netns. The program judges only packets of its target netns
  (netns cookie, from bpf_get_netns_cookie(skb) where cgroup_skb has it, else recorded
  per socket at creation) and passes the others, which are another instance's business.
  In the per-socket mode a socket created before the first attach has no record and is
  judged as the target netns's (fail closed).

Limits worth knowing: marks are given at socket creation, so an exempt service's sockets
opened before the first engage carry no exempt mark (nftables and routing match the mark;
this layer matches the cgroup); counters count skbs (a GSO skb once); an exemption on a
cgroup deeper than MAX_CGROUP_DEPTH is not seen (fail closed).

The package, one purpose a file (import from the file, not from the package):

    layout.py        map, pin and program names, struct formats, limits (bpf/killswitch.h)
    kernel.py        BpfMap, kernel type numbers, RCU grace period, verifier probes, the
                     tp_btf program (over ksbpf.linux.libbpf: pins, attach, query, info)
    plan.py          policy versions (Config, Version, Held), Step/plan_step, exemption
                     changes (ExemptionIndex, select_change): pure
    loader.py        the loader child (BCC compiles, loads, pins; imported only there),
                     cflags and build_digest
    generations.py   a pinned generation: its maps, live config and programs
    attach.py        our programs on cgroups: found by asking the kernel, attached
                     (atomic replace or make-before-break), re-attached, detached
    writes.py        a Step written into a generation's maps; cgroup paths to ids
    instance.py      the maps all of an instance's generations share (drop counters,
                     owners, event ring): layout-checked before reuse, and read
    layer.py         BpfLayer: apply, run-time updates, drift repair, status, reset
    environment.py   doctor checks, bpffs, the netns cookie, a trial compile

The pure plan (what a policy means to the maps: BpfPlan, map keys, capacity) is
ksbpf.render.bpf, beside the nftables and routing renderers.
"""
