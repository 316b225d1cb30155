// SPDX-License-Identifier: GPL-2.0
/*
 * Map layouts shared with ksbpf/linux/bpf/layout.py, whose formats pack the same structs with `struct`
 * (tests/unit/test_bpf.py checks the sizes, tests/kernel/test_bpf.py the loaded maps). Change both together.
 */
#ifndef KSBPF_KILLSWITCH_H
#define KSBPF_KILLSWITCH_H

#define KS_LOOPBACK_IFINDEX 1

/* Capacities arrive as -D cflags from ksbpf.render.bpf.Capacity (the defaults only make the
 * header compile alone). Maps holding policy hold two versions of it during an update. */
#ifndef KS_MAX_DEPTH
#define KS_MAX_DEPTH 31
#endif
#ifndef KS_TUNNEL_INDEX
#define KS_TUNNEL_INDEX 4096    /* ifindexes below this are an array index, the rest hashed */
#endif
#ifndef KS_MAX_TUNNELS
#define KS_MAX_TUNNELS 1024
#endif
#ifndef KS_MAX_ENDPOINTS
#define KS_MAX_ENDPOINTS 2048
#endif
#ifndef KS_MAX_DNS
#define KS_MAX_DNS 512
#endif
#ifndef KS_MAX_CGROUPS
#define KS_MAX_CGROUPS 65536
#endif
#ifndef KS_MAX_RULES
#define KS_MAX_RULES 262144
#endif
#ifndef KS_MAX_DROP_KEYS
#define KS_MAX_DROP_KEYS 4096
#endif
#define KS_MAX_IPV6_EXT 6
#ifndef KS_EVENTS_BYTES
#define KS_EVENTS_BYTES (256 * 1024)   /* ring buffer: a power of two, a multiple of the page size */
#endif
#ifndef KS_EVENTS_PER_SEC
#define KS_EVENTS_PER_SEC 8             /* events per (cgroup, reason, layer) and second */
#endif
#ifndef KS_EVENTS_RATE_KEYS
#define KS_EVENTS_RATE_KEYS 4096
#endif

/* ks_event.layer */
#define KS_LAYER_BPF 1
#define KS_LAYER_NFT 2

/* ks_config.flags */
#define KS_F_IPV6_BLOCK 0x1
#define KS_F_ENDPOINT_MARK 0x2
#define KS_F_ENDPOINT_CGROUPS 0x4

/* Rule scopes in ks_ports / ks_nets: a rule set's allow or listen half. Rule set ids are
 * never reused within a generation; LAN networks are a rule set of their own. */
#define KS_KIND_ALLOW 0
#define KS_KIND_LISTEN 1
#define KS_SCOPE(rules, kind) (((rules) << 1) | (kind))

/* LPM prefix bits before the port / address: scope (32) + proto or family (8). */
#define KS_PORT_PREFIX_BASE 40
#define KS_NET_PREFIX_BASE 40

#define KS_IPPROTO_TCP 6
#define KS_IPPROTO_UDP 17
#define KS_IPPROTO_ICMPV6 58
#define KS_IP_OFFSET 0x1fff
#define KS_IPV6_HOP 0
#define KS_IPV6_ROUTING 43
#define KS_IPV6_FRAGMENT 44
#define KS_IPV6_DSTOPTS 60

/*
 * A policy version. ks_config holds two; ks_active (one u32, 0 or 1) says which one packets
 * use, and is written last, so a packet sees one version whole. Endpoint, DNS and cgroup
 * keys carry the tag of the version that wrote them, rule scopes their rule set id, and
 * ks_tunnels has two banks: a new version writes under fresh tags, rule set ids and the
 * bank the live one does not use (new keys only, never an entry the live version reads),
 * and shares whatever did not change.
 */
struct ks_config {
    u64 netns_cookie;
    u64 generation;
    u64 cgroup_id;      /* where this generation is attached */
    u32 flags;
    u32 endpoint_mark;
    u32 version;
    u32 endpoints_tag;
    u32 dns_tag;
    u32 cgroups_tag;
    u32 lan_rules;      /* rule set of the LAN networks (0: none) */
    u32 next_rules;     /* loader bookkeeping: the first rule set id never used */
    u8 tunnel_bank;
    u8 pad[7];
    u64 digests[4];     /* loader bookkeeping: endpoints, dns, lan, cgroups as written */
    u8 build[32];       /* loader bookkeeping: what the programs were built from */
    char instance[64];  /* lets the loader recognise its own programs on a cgroup */
};

struct ks_tunnel_key {  /* ks_tunnels_big, for ifindexes from KS_TUNNEL_INDEX on */
    u32 ifindex;
    u32 bank;
};

struct ks_cgroup_key {
    u64 id;
    u32 tag;
    u32 pad;
};

struct ks_cgroup {
    u32 rules;          /* exemption rule set (0: not exempt) */
    u32 mark;           /* given to sockets created below this cgroup (0: none) */
    u32 endpoint;       /* 1: an endpoint cgroup */
    u32 pad;
};

struct ks_endpoint_key {
    u32 tag;
    u8 family;
    u8 proto;
    __be16 port;
    u8 addr[16];
};

struct ks_addr_key {
    u32 tag;
    u8 family;
    u8 pad[3];
    u8 addr[16];
};

struct ks_port_key {
    u32 prefixlen;
    u32 scope;
    u8 proto;
    u8 port[2];         /* network order, so that a prefix is a port range */
};

struct ks_net_key {
    u32 prefixlen;
    u32 scope;
    u8 family;
    u8 addr[16];
};

struct ks_drop_key {
    u32 reason;
    u32 pad;
    u64 cgroup_id;
};

struct ks_drop_val {
    u64 packets;
    u64 bytes;
};

/*
 * Socket storage: who made the socket, recorded by ks_sock_create (the creating task is
 * "current" there, unlike at egress, which can run in softirq for another task's packet).
 * netns_cookie is also the netns check of the sk_storage netns mode.
 */
struct ks_owner {
    u64 netns_cookie;
    u64 cgroup_id;
    u32 tgid;
    u32 pad;
    char comm[16];
};

/* One drop event in the ring buffer; count = this drop and those the rate limit held back. */
struct ks_event {
    u64 time_ns;        /* CLOCK_MONOTONIC */
    u64 cgroup_id;
    u32 pid;            /* 0: the socket has no owner record */
    u32 count;
    char comm[16];
    u8 family;          /* 4, 6 or 0 */
    u8 proto;
    u8 layer;           /* KS_LAYER_* */
    u8 reason;          /* the drop reason number (-D KS_R_*) */
    __be16 dport;
    u16 pad;
    u8 daddr[16];
};

struct ks_rate_key {
    u64 cgroup_id;
    u32 reason;
    u32 layer;
};

struct ks_rate {
    u64 window_ns;      /* start of the current one-second window */
    u64 pending;        /* drops held back since the last event: the next one carries them */
    u32 sent;           /* events in this window */
    /* The last drop held back: the event that reports them once the window is over when
     * no drop of this key follows (ks_events_flush) names its process and destination. */
    u32 held_pid;
    char held_comm[16];
    u8 held_family;
    u8 held_proto;
    __be16 held_dport;
    u32 pad;
    u8 held_daddr[16];
};

/* Own copies of the two header layouts, so nothing depends on the header tree's version. */
struct ks_iphdr {
    u8 ver_ihl;
    u8 tos;
    __be16 tot_len;
    __be16 id;
    __be16 frag_off;
    u8 ttl;
    u8 protocol;
    __sum16 check;
    __be32 saddr;
    __be32 daddr;
};

struct ks_ipv6hdr {
    __be32 ver_tc_flow;
    __be16 payload_len;
    u8 nexthdr;
    u8 hop_limit;
    u8 saddr[16];
    u8 daddr[16];
};

#endif
