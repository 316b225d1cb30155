"""`ksctl audit`: an active leak self-test of the kill switch on this machine.

From a throwaway cgroup it makes below the policy's [bpf] cgroup (so every layer judges
it as it judges any process), it sends probes out of every non-tunnel interface
(SO_BINDTODEVICE, and raw AF_PACKET frames for the netdev egress chains): TCP, UDP, ICMP
and DNS (UDP and TCP), IPv4 and IPv6, to the targets the machine itself names (each
interface's gateways and neighbours), to the policy's VPN endpoints on ports other than
the endpoint's (and on the endpoint's own port without the endpoint mark), and to any
`--target`. Then it checks that the tunnel path works (DNS to the policy's resolvers),
removes the cgroup, and gives a verdict.

A probe is
  stopped   the kernel refused it on the spot (EPERM, ...), or no answer came and a
            drop counter (nftables, or the BPF counter of the audit's own cgroup) rose
            while it was sent;
  LEAKED    something came back from outside: a TCP handshake or reset, a UDP or DNS
            answer, an echo reply, an ICMP error;
  UNPROVEN  no answer, but nothing refused or counted it either: it may have left;
  allowed   the policy allows it (a LAN it permits, say): not sent.

nftables counters are machine-wide: on a busy machine another process's drop can fall
into a probe's window. The send error and the per-cgroup BPF counters are exact.

Exit: 0 PASS (nothing left, every stop proven, the tunnel path works); 1 FAIL (something
LEAKED or is UNPROVEN, named); 2 bad input; 3 nothing left, but the tunnel path does not
work or no probe could be sent; 4 the audit itself could not run.

The package, by seam (the worker runs as a child process inside the audit cgroup):

- `plan`: pure: the probes to send over each interface, each judged by the policy
  (ksbpf.verdict) first, so what it allows is not sent;
- `discover`: the interfaces and the targets the machine names (gateways, neighbours);
- `packets`: pure: the DNS query, ICMP echo and raw Ethernet frame bytes;
- `worker`: the child (`python -m ksbpf.audit worker`): sockets, sends, answers, the
  drop counters read around each send, the tunnel path check;
- `report`: the verdict and exit code (`judge`), and the text report;
- `run`: `ksctl audit`: cgroup, plan, worker, clean-up, report.
"""
