// SPDX-License-Identifier: GPL-2.0
/*
 * ksbpf cgroup-bpf layer, compiled by BCC at load time (ksbpf/linux/bpf/loader.py).
 *
 *   ks_egress       cgroup_skb/egress: drop what would leave outside the tunnel, count it,
 *                   and report it (a drop event: see ks_emit)
 *   ks_sock_create  cgroup/sock_create: mark sockets of exempt and endpoint cgroups, and
 *                   record each socket's owner (process, command, cgroup, netns)
 *   ks_kfree_skb    tp_btf/kfree_skb: report nftables' drops of those sockets' packets
 *                   (loaded and attached by the loader itself; see its comment)
 *
 * The policy reaches the program through maps only (filled by the loader before attach and
 * updated in place after, one whole version at a time: see struct ks_config); constants
 * (drop reason numbers, capacities, pin paths, netns mode) arrive as -D cflags. The checks
 * run in the order of ksbpf.verdict._outbound, which is the oracle the tests compare with;
 * tunnel packets, the common case, take a short path with no helper call.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>

#include "killswitch.h"

#ifndef KS_R_NO_TUNNEL
#error "drop reason numbers come from ksbpf.verdict.DROP_REASONS as -D cflags"
#endif

BPF_ARRAY(ks_active, u32, 1);
BPF_ARRAY(ks_config, struct ks_config, 2);
// ifindex -> bit b set: a tunnel for the versions using tunnel bank b. An array for the
// usual small ifindexes (the verifier inlines its lookup), a hash of (ifindex, bank) for the rest.
BPF_ARRAY(ks_tunnels, u8, KS_TUNNEL_INDEX);
BPF_F_TABLE("hash", struct ks_tunnel_key, u8, ks_tunnels_big, KS_MAX_TUNNELS, BPF_F_NO_PREALLOC);
// No preallocation: sized for the largest policy, these cost memory as they fill.
BPF_F_TABLE("hash", struct ks_endpoint_key, u8, ks_endpoints, KS_MAX_ENDPOINTS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct ks_addr_key, u8, ks_dns, KS_MAX_DNS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct ks_cgroup_key, struct ks_cgroup, ks_cgroups, KS_MAX_CGROUPS, BPF_F_NO_PREALLOC);
BPF_LPM_TRIE(ks_ports, struct ks_port_key, u8, KS_MAX_RULES);
BPF_LPM_TRIE(ks_nets, struct ks_net_key, u8, KS_MAX_RULES);

#ifdef KS_DROPS_PIN
// Shared by every generation and pinned once per instance, so counters survive reloads.
BPF_TABLE_PINNED("percpu_hash", struct ks_drop_key, struct ks_drop_val, ks_drops, KS_MAX_DROP_KEYS, KS_DROPS_PIN);
#else
BPF_TABLE("percpu_hash", struct ks_drop_key, struct ks_drop_val, ks_drops, KS_MAX_DROP_KEYS);
#endif

// Who made each socket (struct ks_owner). Kernels whose cgroup_skb lacks
// bpf_get_netns_cookie (before 6.15) also read the socket's netns from here. BPF_F_CLONE
// hands the record on to sockets accept() creates.
#ifdef KS_OWNERS_PIN
BPF_TABLE_PINNED("sk_storage", int, struct ks_owner, ks_owners, 0, KS_OWNERS_PIN, BPF_F_NO_PREALLOC | BPF_F_CLONE);
#else
BPF_F_TABLE("sk_storage", int, struct ks_owner, ks_owners, 0, BPF_F_NO_PREALLOC | BPF_F_CLONE);
#endif

// Drop events (struct ks_event) to ksbpfd, at most KS_EVENTS_PER_SEC per (cgroup, reason,
// layer) and second: the rest are counted into the next event's count, so a flood costs
// the daemon bounded work. Events the ring buffer had no room for are counted in
// ks_events_lost (their packets ride on the next event of their key). Shared by every
// generation, pinned once per instance, like the drop counters.
#define KS_RINGBUF(_name, _bytes, _section) \
struct _name##_table_t { \
  int key; \
  u32 leaf; \
  int (*ringbuf_output) (void *, u64, u64); \
  void* (*ringbuf_reserve) (u64); \
  void (*ringbuf_discard) (void *, u64); \
  void (*ringbuf_submit) (void *, u64); \
  u32 max_entries; \
}; \
__attribute__((section(_section))) \
struct _name##_table_t _name = { .max_entries = (_bytes) }
#ifdef KS_EVENTS_PIN
KS_RINGBUF(ks_events, KS_EVENTS_BYTES, "maps/ringbuf:" KS_EVENTS_PIN);
BPF_TABLE_PINNED("percpu_array", u32, u64, ks_events_lost, 1, KS_EVENTS_LOST_PIN);
BPF_TABLE_PINNED("lru_hash", struct ks_rate_key, struct ks_rate, ks_events_rate, KS_EVENTS_RATE_KEYS, KS_EVENTS_RATE_PIN);
#else
KS_RINGBUF(ks_events, KS_EVENTS_BYTES, "maps/ringbuf");
BPF_TABLE("percpu_array", u32, u64, ks_events_lost, 1);
BPF_TABLE("lru_hash", struct ks_rate_key, struct ks_rate, ks_events_rate, KS_EVENTS_RATE_KEYS);
#endif

struct ks_pkt {
    u8 family;      // 4, 6, or 0 when the header could not be read
    u8 proto;
    u8 icmp_type;
    u8 has_ports;
    __be16 sport;
    __be16 dport;
    u8 daddr[16];
};

static __always_inline void ks_count_lost(void)
{
    u32 zero = 0;
    u64 *lost = ks_events_lost.lookup(&zero);

    if (lost)
        *lost += 1;  // per CPU: no atomic needed
}

// Drops only: nothing here runs for a packet that passes.
static __always_inline void ks_emit(u8 layer, u32 reason, u64 cgroup_id, struct ks_owner *owner, struct ks_pkt *p)
{
    struct ks_rate_key rk = {};
    struct ks_rate fresh = {};
    struct ks_rate *rl;
    struct ks_event *e;
    u64 now = bpf_ktime_get_ns();
    u64 pending;

    rk.cgroup_id = cgroup_id;
    rk.reason = reason;
    rk.layer = layer;
    rl = ks_events_rate.lookup(&rk);
    if (!rl) {
        ks_events_rate.insert(&rk, &fresh);
        rl = ks_events_rate.lookup(&rk);
        if (!rl) {
            ks_count_lost();
            return;
        }
    }
    // Racy across CPUs on purpose (no lock on the drop path): a window may let a few
    // events more through; counts stay exact, as pending only moves atomically.
    if (now - rl->window_ns >= 1000000000ULL) {
        rl->window_ns = now;
        rl->sent = 0;
    }
    if (rl->sent >= KS_EVENTS_PER_SEC) {
        __sync_fetch_and_add(&rl->pending, 1);
        // A representative for the event that reports the held-back drops (torn by a
        // concurrent writer at worst: it names one of them).
        rl->held_pid = owner ? owner->tgid : 0;
        if (owner)
            __builtin_memcpy(rl->held_comm, owner->comm, 16);
        else
            __builtin_memset(rl->held_comm, 0, 16);
        rl->held_family = p->family;
        rl->held_proto = p->proto;
        rl->held_dport = p->dport;
        __builtin_memcpy(rl->held_daddr, p->daddr, 16);
        return;
    }
    __sync_fetch_and_add(&rl->sent, 1);
    e = ks_events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        __sync_fetch_and_add(&rl->pending, 1);
        ks_count_lost();
        return;
    }
    pending = __sync_lock_test_and_set(&rl->pending, 0);  // atomic exchange: taken once
    e->time_ns = now;
    e->cgroup_id = cgroup_id;
    e->count = 1 + (u32)pending;
    e->layer = layer;
    e->reason = reason;
    e->family = p->family;
    e->proto = p->proto;
    e->dport = p->dport;
    e->pad = 0;
    __builtin_memcpy(e->daddr, p->daddr, 16);
    if (owner) {
        e->pid = owner->tgid;
        __builtin_memcpy(e->comm, owner->comm, 16);
    } else {
        e->pid = 0;
        __builtin_memset(e->comm, 0, 16);
    }
    ks_events.ringbuf_submit(e, 0);
}

/*
 * Never attached: ksbpfd runs it (BPF_PROG_TEST_RUN) with a struct ks_rate_key as the
 * packet, for keys whose window is over with drops still held back (the end of a flood,
 * with no later drop of the key to carry them), so their count reaches user space.
 * Returns 1 when it made an event.
 */
int ks_events_flush(struct __sk_buff *skb)
{
    struct ks_rate_key rk;
    struct ks_rate *rl;
    struct ks_event *e;
    u64 now = bpf_ktime_get_ns();
    u64 take;

    if (bpf_skb_load_bytes(skb, 0, &rk, sizeof(rk)) < 0)
        return 0;
    rl = ks_events_rate.lookup(&rk);
    if (!rl || now - rl->window_ns < 1000000000ULL)
        return 0;  // an open window: its next drop, or a later flush, carries them
    take = __sync_lock_test_and_set(&rl->pending, 0);
    if (!take)
        return 0;
    e = ks_events.ringbuf_reserve(sizeof(*e));
    if (!e) {
        __sync_fetch_and_add(&rl->pending, take);
        ks_count_lost();
        return 0;
    }
    e->time_ns = now;
    e->cgroup_id = rk.cgroup_id;
    e->pid = rl->held_pid;
    e->count = (u32)take;
    __builtin_memcpy(e->comm, rl->held_comm, 16);
    e->family = rl->held_family;
    e->proto = rl->held_proto;
    e->layer = rk.layer;
    e->reason = rk.reason;
    e->dport = rl->held_dport;
    e->pad = 0;
    __builtin_memcpy(e->daddr, rl->held_daddr, 16);
    ks_events.ringbuf_submit(e, 0);
    return 1;
}

static __always_inline struct ks_owner *ks_skb_owner(struct __sk_buff *skb)
{
    struct bpf_sock *sk = skb->sk;

    // The hook runs with skb->sk set to the full socket (a SYN-ACK's listener).
    if (!sk)
        return NULL;
    sk = bpf_sk_fullsock(sk);
    if (!sk)
        return NULL;
    return ks_owners.sk_storage_get(sk, 0, 0);
}

static __always_inline int ks_drop(struct __sk_buff *skb, u32 reason, struct ks_pkt *p)
{
    struct ks_drop_key key = {};
    struct ks_drop_val zero = {};
    struct ks_drop_val *val;

    key.reason = reason;
    key.cgroup_id = bpf_skb_cgroup_id(skb);
    ks_emit(KS_LAYER_BPF, reason, key.cgroup_id, ks_skb_owner(skb), p);
    val = ks_drops.lookup(&key);
    if (!val) {
        ks_drops.insert(&key, &zero);
        val = ks_drops.lookup(&key);
    }
    if (!val) {
        // Map full: the loader pre-creates one entry per reason under cgroup id 0.
        key.cgroup_id = 0;
        val = ks_drops.lookup(&key);
    }
    if (val) {
        lock_xadd(&val->packets, 1);
        lock_xadd(&val->bytes, skb->len);
    }
    return 0;
}

static __always_inline void ks_l4(struct __sk_buff *skb, struct ks_pkt *p, u32 off)
{
    __be16 ports[2];

    if (p->proto == KS_IPPROTO_TCP || p->proto == KS_IPPROTO_UDP) {
        if (bpf_skb_load_bytes(skb, off, ports, sizeof(ports)) == 0) {
            p->sport = ports[0];
            p->dport = ports[1];
            p->has_ports = 1;
        }
    } else if (p->proto == KS_IPPROTO_ICMPV6) {
        bpf_skb_load_bytes(skb, off, &p->icmp_type, 1);
    }
}

// ks_l4 straight from the packet; 0 when the bytes are not in its linear part.
static __always_inline int ks_l4_direct(struct ks_pkt *p, void *l4, void *end)
{
    if (p->proto == KS_IPPROTO_TCP || p->proto == KS_IPPROTO_UDP) {
        __be16 *ports = l4;

        if ((void *)(ports + 2) > end)
            return 0;
        p->sport = ports[0];
        p->dport = ports[1];
        p->has_ports = 1;
    } else if (p->proto == KS_IPPROTO_ICMPV6) {
        u8 *type = l4;

        if ((void *)(type + 1) > end)
            return 0;
        p->icmp_type = *type;
    }
    return 1;
}

static __always_inline int ks_is_ipv6_ext(u8 next)
{
    return next == KS_IPV6_HOP || next == KS_IPV6_ROUTING || next == KS_IPV6_DSTOPTS || next == KS_IPV6_FRAGMENT;
}

// At cgroup egress skb->data points at the network header, and the packet is whole:
// fragmentation and GSO segmentation happen after this hook. Headers are read in place
// (direct packet access) when the linear part holds them, which it does for packets a
// socket built; bpf_skb_load_bytes copies them otherwise.
static __always_inline void ks_parse(struct __sk_buff *skb, struct ks_pkt *p)
{
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;

    if (skb->protocol == bpf_htons(ETH_P_IP)) {
        struct ks_iphdr *in = data;
        struct ks_iphdr ip;
        u32 off;

        if ((void *)(in + 1) <= end)
            __builtin_memcpy(&ip, in, sizeof(ip));
        else if (bpf_skb_load_bytes(skb, 0, &ip, sizeof(ip)) < 0)
            return;
        p->family = 4;
        p->proto = ip.protocol;
        __builtin_memcpy(p->daddr, &ip.daddr, 4);
        // A raw sender's later fragments carry no ports; they match no port rule.
        if (ip.frag_off & bpf_htons(KS_IP_OFFSET))
            return;
        off = (ip.ver_ihl & 0x0f) * 4;
        if (!ks_l4_direct(p, data + off, end))
            ks_l4(skb, p, off);
    } else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
        struct ks_ipv6hdr *in = data;
        u8 ext[2];
        u32 off = sizeof(*in);
        u8 next;

        if ((void *)(in + 1) <= end) {
            next = in->nexthdr;
            __builtin_memcpy(p->daddr, in->daddr, 16);
        } else {
            struct ks_ipv6hdr ip6;

            if (bpf_skb_load_bytes(skb, 0, &ip6, sizeof(ip6)) < 0)
                return;
            next = ip6.nexthdr;
            __builtin_memcpy(p->daddr, ip6.daddr, 16);
        }
        p->family = 6;
        if (!ks_is_ipv6_ext(next)) {
            p->proto = next;
            if (!ks_l4_direct(p, data + sizeof(*in), end))
                ks_l4(skb, p, off);
            return;
        }
        // Extension headers are rare: copy them.
#pragma unroll
        for (int i = 0; i < KS_MAX_IPV6_EXT; i++) {
            if (next == KS_IPV6_HOP || next == KS_IPV6_ROUTING || next == KS_IPV6_DSTOPTS) {
                if (bpf_skb_load_bytes(skb, off, ext, 2) < 0)
                    break;
                next = ext[0];
                off += ((u32)ext[1] + 1) * 8;
            } else if (next == KS_IPV6_FRAGMENT) {
                __be16 frag;

                if (bpf_skb_load_bytes(skb, off, ext, 2) < 0 ||
                    bpf_skb_load_bytes(skb, off + 2, &frag, 2) < 0)
                    break;
                next = ext[0];
                off += 8;
                if (frag & bpf_htons(0xfff8)) {
                    p->proto = next;
                    return;
                }
            } else {
                break;
            }
        }
        p->proto = next;
        ks_l4(skb, p, off);
    }
}

static __always_inline int ks_port_match(u32 scope, u8 proto, __be16 port)
{
    struct ks_port_key k = {};

    k.prefixlen = KS_PORT_PREFIX_BASE + 16;
    k.scope = scope;
    k.proto = proto;
    __builtin_memcpy(k.port, &port, 2);
    return ks_ports.lookup(&k) != NULL;
}

static __always_inline int ks_net_match(u32 scope, struct ks_pkt *p)
{
    struct ks_net_key k = {};

    k.prefixlen = KS_NET_PREFIX_BASE + (p->family == 4 ? 32 : 128);
    k.scope = scope;
    k.family = p->family;
    __builtin_memcpy(k.addr, p->daddr, 16);
    return ks_nets.lookup(&k) != NULL;
}

static __always_inline int ks_is_dns(struct ks_pkt *p)
{
    return p->has_ports && (p->dport == bpf_htons(53) || p->dport == bpf_htons(853));
}

static __always_inline int ks_dns_allowed(struct ks_pkt *p, u32 tag)
{
    struct ks_addr_key k = {};

    k.tag = tag;
    k.family = p->family;
    __builtin_memcpy(k.addr, p->daddr, 16);
    return ks_dns.lookup(&k) != NULL;
}

static __always_inline int ks_is_dhcp(struct ks_pkt *p)
{
    if (p->proto != KS_IPPROTO_UDP || !p->has_ports)
        return 0;
    if (p->family == 4)
        return p->sport == bpf_htons(68) && p->dport == bpf_htons(67);
    return p->sport == bpf_htons(546) && p->dport == bpf_htons(547);
}

static __always_inline int ks_is_nd(struct ks_pkt *p)
{
    return p->family == 6 && p->proto == KS_IPPROTO_ICMPV6 && p->icmp_type >= 133 && p->icmp_type <= 136;
}

static __always_inline int ks_is_endpoint(struct ks_pkt *p, u32 tag)
{
    struct ks_endpoint_key k = {};

    if (!p->has_ports)
        return 0;
    k.tag = tag;
    k.family = p->family;
    k.proto = p->proto;
    k.port = p->dport;
    __builtin_memcpy(k.addr, p->daddr, 16);
    return ks_endpoints.lookup(&k) != NULL;
}

// Ancestor-aware: walk from the root down to the socket's cgroup. The deepest exemption
// wins (as ksbpf.verdict.exemption_for); any endpoint cgroup on the way counts. Cgroups
// deeper than KS_MAX_DEPTH are not seen, so exemptions there fail closed.
static __always_inline void ks_skb_cgroups(struct __sk_buff *skb, u32 tag, u32 *rules, u32 *endpoint)
{
    struct ks_cgroup_key k = {};

    k.tag = tag;
#pragma unroll
    for (int level = 0; level <= KS_MAX_DEPTH; level++) {
        struct ks_cgroup *cg;

        k.id = bpf_skb_ancestor_cgroup_id(skb, level);
        if (!k.id)
            break;
        cg = ks_cgroups.lookup(&k);
        if (cg) {
            if (cg->rules)
                *rules = cg->rules;
            *endpoint |= cg->endpoint;
        }
    }
}

static __always_inline u64 ks_skb_netns(struct __sk_buff *skb, u64 target)
{
#ifdef KS_NETNS_SK_STORAGE
    struct ks_owner *owner = ks_skb_owner(skb);

    // A socket created before the first attach has no record: judge it (fail closed).
    return owner ? owner->netns_cookie : target;
#else
    return bpf_get_netns_cookie(skb);
#endif
}

// Attached to a cgroup, the program sees that cgroup's sockets in every netns; the
// ifindexes in the maps are the target netns's, so only its packets are judged.
static __always_inline int ks_judged(struct __sk_buff *skb, struct ks_config *cfg)
{
    return ks_skb_netns(skb, cfg->netns_cookie) == cfg->netns_cookie;
}

static __always_inline int ks_is_tunnel(u32 ifindex, u32 bank)
{
    u8 *mask;

    if (ifindex < KS_TUNNEL_INDEX) {
        mask = ks_tunnels.lookup(&ifindex);
        // Keeps clang from merging the two lookups into one call with a chosen map, which
        // the verifier could not inline.
        asm volatile("" ::: "memory");
        return mask && ((*mask >> (bank & 1)) & 1);
    } else {
        struct ks_tunnel_key k = {.ifindex = ifindex, .bank = bank & 1};

        return ks_tunnels_big.lookup(&k) != NULL;
    }
}

// The policy version packets read now: ks_active is read once, and everything a program
// run looks at comes from that one version (the loader flips it with one u32 write).
static __always_inline struct ks_config *ks_active_config(void)
{
    u32 zero = 0, slot;
    u32 *active = ks_active.lookup(&zero);

    if (!active)
        return NULL;
    slot = *active & 1;
    return ks_config.lookup(&slot);
}

#define KS_PASS 0
#define KS_DROP(reason) ((reason) + 1)

// KS_PASS, or KS_DROP(reason): one drop site in ks_egress keeps the event code inlined once.
static __always_inline u32 ks_judge(struct __sk_buff *skb, struct ks_config *cfg, struct ks_pkt *p, u32 ifindex)
{
    u32 rules = 0, endpoint = 0;

    if (ks_is_tunnel(ifindex, cfg->tunnel_bank)) {
        // Passing needs no netns check (another netns's packets pass too); dropping does.
        if (p->family == 6 && (cfg->flags & KS_F_IPV6_BLOCK))
            return ks_judged(skb, cfg) ? KS_DROP(KS_R_IPV6_BLOCKED) : KS_PASS;
        // DNS only to the configured resolvers, even inside the tunnel.
        if (ks_is_dns(p) && !ks_dns_allowed(p, cfg->dns_tag))
            return ks_judged(skb, cfg) ? KS_DROP(KS_R_DNS) : KS_PASS;
        return KS_PASS;
    }
    if (!ks_judged(skb, cfg))
        return KS_PASS;
    if (ks_is_nd(p) || ks_is_dhcp(p))
        return KS_PASS;
    if (p->family == 6 && (cfg->flags & KS_F_IPV6_BLOCK))
        return KS_DROP(KS_R_IPV6_BLOCKED);

    if (ks_is_endpoint(p, cfg->endpoints_tag)) {
        if ((cfg->flags & KS_F_ENDPOINT_MARK) && skb->mark != cfg->endpoint_mark)
            return KS_DROP(KS_R_ENDPOINT_UNAUTHORIZED);
        if (cfg->flags & KS_F_ENDPOINT_CGROUPS) {
            ks_skb_cgroups(skb, cfg->cgroups_tag, &rules, &endpoint);
            if (!endpoint)
                return KS_DROP(KS_R_ENDPOINT_UNAUTHORIZED);
        }
        return KS_PASS;
    }

    ks_skb_cgroups(skb, cfg->cgroups_tag, &rules, &endpoint);
    if (rules && p->has_ports) {
        // allow: remote port and `to` networks; listen: our port (replies) and `from` networks.
        if (ks_port_match(KS_SCOPE(rules, KS_KIND_ALLOW), p->proto, p->dport) &&
            ks_net_match(KS_SCOPE(rules, KS_KIND_ALLOW), p))
            return KS_PASS;
        if (ks_port_match(KS_SCOPE(rules, KS_KIND_LISTEN), p->proto, p->sport) &&
            ks_net_match(KS_SCOPE(rules, KS_KIND_LISTEN), p))
            return KS_PASS;
    }
    // DNS outside the tunnel is dropped before LAN: a LAN resolver is still a leak.
    if (ks_is_dns(p))
        return KS_DROP(KS_R_DNS);
    if (p->family && cfg->lan_rules && ks_net_match(KS_SCOPE(cfg->lan_rules, KS_KIND_ALLOW), p))
        return KS_PASS;
    return KS_DROP(KS_R_NO_TUNNEL);
}

int ks_egress(struct __sk_buff *skb)
{
    struct ks_config *cfg;
    struct ks_pkt p = {};
    u32 ifindex = skb->ifindex;
    u32 verdict;

    // Loopback is ifindex 1 in every netns, so this needs no netns check.
    if (ifindex == KS_LOOPBACK_IFINDEX)
        return 1;
    cfg = ks_active_config();
    if (!cfg)
        return 0;

    ks_parse(skb, &p);
    verdict = ks_judge(skb, cfg, &p, ifindex);
    if (verdict == KS_PASS)
        return 1;
    return ks_drop(skb, verdict - 1, &p);
}

int ks_sock_create(struct bpf_sock *sk)
{
    struct ks_cgroup_key k = {};
    struct ks_config *cfg = ks_active_config();
    u64 cookie = bpf_get_netns_cookie(sk);
    struct ks_owner *owner;
    u32 mark = 0;

    if (!cfg)
        return 1;
#ifndef KS_NETNS_SK_STORAGE
    // The helper mode needs no record of other namespaces' sockets: their drops are not ours.
    if (cookie != cfg->netns_cookie)
        return 1;
#endif
    // The creating task is current here: its process and cgroup own the socket for good
    // (a socket keeps its cgroup), whoever sends on it later and in whatever context.
    owner = ks_owners.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
    if (owner) {
        owner->netns_cookie = cookie;
        owner->cgroup_id = bpf_get_current_cgroup_id();
#ifndef KS_NO_TASK_HELPERS  /* kernels before 6.1: the record names no process */
        owner->tgid = bpf_get_current_pid_tgid() >> 32;
        bpf_get_current_comm(owner->comm, sizeof(owner->comm));
#endif
    }
    if (cookie != cfg->netns_cookie)
        return 1;
    k.tag = cfg->cgroups_tag;
    // The socket belongs to the creating task's cgroup; deepest mark wins.
#pragma unroll
    for (int level = 0; level <= KS_MAX_DEPTH; level++) {
        struct ks_cgroup *cg;

        k.id = bpf_get_current_ancestor_cgroup_id(level);
        if (!k.id)
            break;
        cg = ks_cgroups.lookup(&k);
        if (cg && cg->mark)
            mark = cg->mark;
    }
    if (mark)
        sk->mark = mark;
    return 1;
}

#ifdef KS_NFT_EVENTS
/*
 * nftables drops. The output chain runs before cgroup egress, so in normal operation
 * nftables drops first and ks_egress never sees those packets. Measured options:
 *   - this program, tp_btf/kfree_skb filtered on SKB_DROP_REASON_NETFILTER_DROP: runs only
 *     when the kernel frees a dropped skb (never for a packet that passes), sees every
 *     netfilter drop whatever chain made it, and reads the owner from socket storage with
 *     a BTF-typed skb->sk (BTF tracing programs may call bpf_sk_storage_get; raw
 *     tracepoints may not);
 *   - nftables `log group` rules joined with the owner in user space: a netlink message per
 *     dropped packet before any rate limit (the daemon's CPU grows with the flood), and
 *     nflog knows uid/gid but not the socket's creator or its cgroup.
 * The loader attaches it through a bpf_link it pins in the generation's directory, so it
 * outlives the loader process and goes with its generation. Kernel struct offsets and the
 * reason's number come from the running kernel's BTF as -D flags (ksbpf.linux.btf): BCC
 * compiles against headers that may be another kernel's, and has no CO-RE.
 */
#define KS_AT(ptr, off, type) (*(type *)((char *)(ptr) + (off)))

int ks_kfree_skb(unsigned long long *ctx)
{
    void *skb = (void *)ctx[KS_TP_SKB_ARG];
    struct ks_config *cfg;
    struct ks_owner *owner;
    struct ks_pkt p = {};
    unsigned char *head;
    void *sk;
    u8 vihl;
    u16 nh;
    u32 reason;

    if ((u32)ctx[KS_TP_REASON_ARG] != KS_NETFILTER_DROP)
        return 0;
    // Received packets carry their input device; locally generated ones none (forwarded
    // and inbound drops are counted by nftables and carry no process).
    if (KS_AT(skb, KS_OFF_SKB_IIF, int) != 0)
        return 0;
    sk = KS_AT(skb, KS_OFF_SKB_SK, void *);
    if (!sk)
        return 0;
    // Only inet sockets have a record (cgroup/sock_create runs for them alone): a packet
    // socket's raw frames carry no process.
    owner = ks_owners.sk_storage_get(sk, 0, 0);
    if (!owner)
        return 0;
    cfg = ks_active_config();
    if (!cfg || owner->netns_cookie != cfg->netns_cookie)
        return 0;
    head = KS_AT(skb, KS_OFF_SKB_HEAD, unsigned char *);
    nh = KS_AT(skb, KS_OFF_SKB_NH, u16);
    if (bpf_probe_read_kernel(&vihl, 1, head + nh) < 0)
        return 0;
    if ((vihl >> 4) == 4) {
        struct ks_iphdr ip;

        if (bpf_probe_read_kernel(&ip, sizeof(ip), head + nh) < 0)
            return 0;
        p.family = 4;
        p.proto = ip.protocol;
        __builtin_memcpy(p.daddr, &ip.daddr, 4);
        if (!(ip.frag_off & bpf_htons(KS_IP_OFFSET)) && (p.proto == KS_IPPROTO_TCP || p.proto == KS_IPPROTO_UDP)) {
            __be16 ports[2];

            if (bpf_probe_read_kernel(ports, sizeof(ports), head + nh + (vihl & 0x0f) * 4) == 0) {
                p.sport = ports[0];
                p.dport = ports[1];
                p.has_ports = 1;
            }
        }
    } else if ((vihl >> 4) == 6) {
        struct ks_ipv6hdr ip6;

        if (bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh) < 0)
            return 0;
        p.family = 6;
        p.proto = ip6.nexthdr;  // extension headers are not followed here: no ports then
        __builtin_memcpy(p.daddr, ip6.daddr, 16);
        if (p.proto == KS_IPPROTO_TCP || p.proto == KS_IPPROTO_UDP) {
            __be16 ports[2];

            if (bpf_probe_read_kernel(ports, sizeof(ports), head + nh + sizeof(ip6)) == 0) {
                p.sport = ports[0];
                p.dport = ports[1];
                p.has_ports = 1;
            }
        }
    }
    // nftables' own counters say which rule dropped; the event names the policy's reason
    // the way ksbpf.verdict orders them for a packet leaving outside the tunnel.
    if (p.family == 6 && (cfg->flags & KS_F_IPV6_BLOCK))
        reason = KS_R_IPV6_BLOCKED;
    else if (ks_is_endpoint(&p, cfg->endpoints_tag))
        reason = KS_R_ENDPOINT_UNAUTHORIZED;
    else if (ks_is_dns(&p))
        reason = KS_R_DNS;
    else
        reason = KS_R_NO_TUNNEL;
    ks_emit(KS_LAYER_NFT, reason, owner->cgroup_id, owner, &p);
    return 0;
}
#endif
