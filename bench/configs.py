"""The filtering configurations the bench compares, each engaged in the client netns
and removed again: no filtering, ksbpf (all layers, and each layer alone), and the
wg-quick and Mullvad-style baselines."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import policies
from bench.minimal import MinimalCgroupProgram
from bench.topology import CLIENT_IF, SERVER_ADDR, Topology
from ksbpf.errors import KsbpfError

CONFIGS = ("none", "ksbpf", "nft", "routing", "bpf", "wgquick", "mullvad", "hooks", "minbpf", "minpair")
# Which configurations grow with n (sets and maps, or one rule per endpoint).
SCALED = ("ksbpf", "nft", "bpf", "mullvad")
LABELS = {
    "none": "no filtering",
    "ksbpf": "ksbpf, all layers",
    "nft": "ksbpf nftables alone",
    "routing": "ksbpf routing alone",
    "bpf": "ksbpf cgroup-bpf alone",
    "wgquick": "wg-quick(8) kill switch",
    "mullvad": "Mullvad-style ruleset",
    "hooks": "floor: empty nftables hooks",
    "minbpf": "floor: cgroup_skb, one map lookup",
    "minpair": "minimal pair: one nft set rule + one-lookup cgroup_skb",
}


class ConfigError(RuntimeError):
    pass


@dataclass
class Engager:
    topo: Topology
    state_dir: Path
    kernel_source: str | None = None
    _minimal: MinimalCgroupProgram | None = field(default=None, init=False)

    def policy_text(self, n: int, extra_endpoints: int = 0, metrics_listen: str | None = None) -> str:
        return policies.policy_text(CLIENT_IF, SERVER_ADDR, self.topo.cgroup_rel, n,
                                    kernel_source=self.kernel_source, extra_endpoints=extra_endpoints,
                                    metrics_listen=metrics_listen)

    def _engine(self) -> Any:
        from ksbpf.linux.engine import LinuxEngine

        return LinuxEngine(netns=self.topo.client_ns, state_dir=self.state_dir, bpf=True)

    def _bpf(self) -> Any:
        from ksbpf.linux.bpf.layer import BpfLayer
        from ksbpf.linux.bpf.layout import instance_name

        return BpfLayer(instance_name(self.topo.client_ns), kernel_source=self.kernel_source,
                        netns=self.topo.client_ns)

    def _nft(self, text: str, defines: dict[str, str] | None = None) -> None:
        argv = ["ip", "netns", "exec", self.topo.client_ns, "nft"]
        for k, v in (defines or {}).items():
            argv += ["-D", f"{k}={v}"]
        r = subprocess.run([*argv, "-f", "-"], input=text, capture_output=True, text=True)
        if r.returncode != 0:
            raise ConfigError(f"nft: {r.stderr.strip()}")

    def engage(self, config: str, n: int) -> dict[str, float]:
        """Engage `config` with n entries, all of it or (on failure) none of it; returns how
        long it took (and BPF's load stats)."""
        try:
            return self._engage(config, n)
        except BaseException:
            # A layer refusing n entries must not leave the others engaged under later samples.
            self.reset(config)
            raise

    def leftovers(self) -> list[str]:
        """Anything enforcing in the client netns or on the bench cgroup: must be empty
        before a configuration is engaged."""
        from ksbpf.linux.bpf.kernel import ATTACH_EGRESS, ATTACH_SOCK_CREATE
        from ksbpf.linux.libbpf import prog_query

        out = []
        r = subprocess.run(["ip", "netns", "exec", self.topo.client_ns, "nft", "list", "tables"],
                           capture_output=True, text=True)
        out += [f"nft {line.strip()}" for line in r.stdout.splitlines() if line.strip()]
        r = subprocess.run(["ip", "netns", "exec", self.topo.client_ns, "ip", "rule", "show"],
                           capture_output=True, text=True)
        out += [f"ip rule {line.strip()}" for line in r.stdout.splitlines()
                if line.split(":", 1)[0] not in ("0", "32766", "32767")]
        if self.topo.cgroup_root is not None:
            fd = os.open(self.topo.cgroup_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for kind, attach in (("egress", ATTACH_EGRESS), ("sock_create", ATTACH_SOCK_CREATE)):
                    out += [f"bpf {kind} program id {i}" for i in prog_query(fd, attach)]
            finally:
                os.close(fd)
        return out

    def _engage(self, config: str, n: int) -> dict[str, float]:
        from ksbpf.policy import loads_policy

        t0 = time.monotonic()
        info: dict[str, float] = {}
        if config in ("ksbpf", "nft", "routing", "bpf"):
            text = self.policy_text(n)
            policy = loads_policy(text, "<bench>")
            if config == "ksbpf":
                result = self._engine().up(policy, text)
                if not result.ok:
                    raise ConfigError(f"ksbpf up: not engaged: {result.failed} "
                                      f"{[s.detail for s in result.layers.values() if not s.engaged]}")
            elif config == "nft":
                from ksbpf.linux.nftables import NftLayer

                NftLayer(self.topo.client_ns).apply(policy)
            elif config == "routing":
                from ksbpf.linux.routing import RoutingLayer

                RoutingLayer(self.topo.client_ns).apply(policy)
            else:
                stats = self._bpf().apply(policy)
                info.update(bpf_compile_s=stats.load.compile_s, bpf_load_s=stats.load.load_s,
                            bpf_loader_s=stats.load.loader_s)
        elif config in policies.BASELINES:
            self._nft(policies.baseline_text(config, n), policies.baseline_defines(CLIENT_IF, SERVER_ADDR))
        elif config in ("minbpf", "minpair"):
            if config == "minpair":
                self._nft(policies.baseline_text("minimal", n), policies.baseline_defines(CLIENT_IF, SERVER_ADDR))
            assert self.topo.cgroup_root is not None
            self._minimal = MinimalCgroupProgram(self.topo.cgroup_root)
            self._minimal.attach()
        elif config != "none":
            raise ConfigError(f"unknown configuration {config!r}")
        info["engage_s"] = time.monotonic() - t0
        return info

    def reset(self, config: str) -> None:
        if config == "ksbpf":
            self._engine().down()
        elif config == "nft":
            from ksbpf.linux.nftables import NftLayer

            NftLayer(self.topo.client_ns).reset()
        elif config == "routing":
            from ksbpf.linux.routing import RoutingLayer

            RoutingLayer(self.topo.client_ns).reset()
        elif config == "bpf":
            self._bpf().reset()
        elif config in policies.BASELINES:
            self._drop_table(policies.baseline_table(config))
        elif config in ("minbpf", "minpair"):
            if self._minimal is not None:
                self._minimal.detach()
                self._minimal = None
            if config == "minpair":
                self._drop_table(policies.baseline_table("minimal"))

    def _drop_table(self, table: str) -> None:
        self._nft(f"table inet {table} {{}}\ndelete table inet {table}\n")

    def reset_all(self) -> None:
        """Whatever a failed run may have left: every configuration's reset, errors ignored."""
        for config in CONFIGS:
            try:
                self.reset(config)
            except (KsbpfError, ConfigError, OSError) as e:
                print(f"bench: resetting {config}: {e}", file=sys.stderr)
