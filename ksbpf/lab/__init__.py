"""A lab of network namespaces joined by a real wireguard-go tunnel, for the kernel tests
and `ksctl lab up|down|demo`.

    routed ──(veth)── client ══uplink══ server ──(veth)── target
                        └── wireguard-go ⇄ wireguard-go ──┘

- client: the machine the kill switch protects. Main table: default via the uplink
  (the physical route); wg-quick-style rules send everything without the tunnel's fwmark
  to table 51820 (default dev WG), so coexistence with a VPN client is exercised.
- server: the ISP side and the VPN server. Its forward path never carries uplink traffic,
  so the target is reachable only through the tunnel. A netdev ingress chain on its
  uplink counts every packet the client lets out that is not the tunnel's own encrypted
  traffic, ARP or neighbour discovery: that is where a leak is seen, not inferred.
- target: echo services behind the server. DNS resolvers inside the tunnel (10.64.0.1)
  and outside it (192.0.2.53, and the server's own address).
- routed (optional): a host routed through the client, for the forward path.

Nothing here touches the host's network namespace or its root cgroup. State is kept in
/run/ksbpf/lab/<name>.json so that `ksctl lab up` and `ksctl lab down` can be separate
processes; every process is ended by its pid (checked against its start time).

The package, one room per purpose (import from the module, not from the package):

    addresses.py  names, addresses, ports, marks and host paths: the lab's plan (pure)
    rulesets.py   the server's nftables rulesets, the far-side counter's reader, the
                  policy as TOML (pure)
    processes.py  commands in a namespace and cgroup, the lab's state file, its
                  processes (spawned, found again, ended by pid), LabError
    topology.py   namespaces, veths, addresses, wireguard-go, routes, cgroups
    traffic.py    probes, the traffic generator and the far-side counters
    lab.py        Lab: create / load / close, the policy it writes
    demo.py       `ksctl lab demo`
    cli.py        `ksctl lab up|down|demo` entry points
    agent.py      the helper process run in the namespaces (services and probes;
                  standard library only, run by path)
"""
