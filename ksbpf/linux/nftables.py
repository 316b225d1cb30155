"""nftables applier: sends the rendered batch through libnftables in one transaction and
reads back what the kernel holds."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ksbpf.errors import BackendError
from ksbpf.linux.layer import Layer, LayerName, LayerStatus
from ksbpf.linux.netns import netns
from ksbpf.linux.nftcounters import read_counters
from ksbpf.linux.nftgen import nft_generation
from ksbpf.policy import Policy
from ksbpf.render.nft import (
    INET,
    NETDEV,
    TABLE,
    counter_names,
    egress_chain_name,
    render_exemption_change,
    render_nft,
    render_nft_reset,
    render_set_changes,
)
from ksbpf.verdict import Reason, interface_matches

REQUIRED_CHAINS = ("output", "input", "forward")


def _nft() -> Any:
    import nftables  # lazily: a Debian package, only needed on Linux

    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(False)
    return nft


def _run_json(nft: Any, batch: dict[str, Any]) -> None:
    rc, _out, err = nft.json_cmd(batch)
    if rc != 0:
        raise BackendError("nftables", (err or "").strip() or f"libnftables returned {rc}")


def _list(nft: Any, cmd: str) -> list[dict[str, Any]]:
    rc, out, _err = nft.cmd(cmd)
    if rc != 0 or not out:
        return []
    return list(json.loads(out).get("nftables", []))


def uplink_interfaces(policy: Policy) -> dict[int, str]:
    """Interfaces in the current network namespace that are neither loopback nor tunnel."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    return {i: n for i, n in links.items() if n != "lo" and not interface_matches(n, policy.tunnel.interfaces)}


def _generation() -> int | None:
    return nft_generation()


@dataclass(frozen=True)
class Committed:
    """What ksbpf's last transaction left in the kernel: the policy, its ruleset's
    skeleton (render_nft without set elements) and the nftables generation right after."""

    policy: Policy
    skeleton: dict[str, Any]
    generation: int


class NftApply(StrEnum):
    """How the last apply() reached the kernel."""

    WHOLE = "whole"  # both tables replaced in one transaction
    CHANGES = "changes"  # set element changes only
    UNCHANGED = "unchanged"  # the kernel held the policy already: nothing sent


class NftLayer:
    name = LayerName.NFTABLES

    def __init__(self, netns_name: str | None = None) -> None:
        self.netns = netns_name
        # A long-lived caller (ksbpfd) re-applies by set element changes while the kernel
        # provably holds what ksbpf committed last: the namespace's nftables generation has
        # not moved since (every commit, by anyone, raises it).
        self.committed: Committed | None = None
        self.last_apply: NftApply | None = None

    def is_supported(self) -> tuple[bool, str]:
        try:
            import nftables  # noqa: F401
        except ImportError:
            return False, "python3-nftables (libnftables binding) is not installed"
        return True, "libnftables available"

    def render(self, policy: Policy) -> dict[str, Any]:
        with netns(self.netns):
            return render_nft(policy, uplink_interfaces(policy), self.read_counters())

    def apply(self, policy: Policy) -> None:
        """Enforce `policy` in one transaction: only the set elements that changed when
        the kernel holds what ksbpf committed last with the same skeleton, else the whole
        ruleset (counters carried over)."""
        with netns(self.netns):
            nft = _nft()
            uplinks = uplink_interfaces(policy)
            skeleton = render_nft(policy, uplinks, elements=False)
            if not self._apply_changes(nft, policy, skeleton):
                self._apply_whole(nft, policy, uplinks, skeleton)
            missing = self._missing_chains(nft)
        if missing:
            self.committed = None
            raise BackendError("nftables", f"applied, but the kernel lacks chains: {', '.join(missing)}")

    def _tracked(self, policy: Policy | None = None) -> Committed | None:
        """The last commit, if the kernel still holds it (and it was of `policy`)."""
        c = self.committed
        if c is None or (policy is not None and c.policy != policy) or _generation() != c.generation:
            return None
        return c

    def _apply_changes(self, nft: Any, policy: Policy, skeleton: dict[str, Any]) -> bool:
        c = self._tracked()
        if c is None or c.skeleton != skeleton:
            return False
        batch = render_set_changes(c.policy, policy)
        if batch is None:
            return False
        if len(batch["nftables"]) == 1:  # metainfo only: the kernel holds `policy` already
            self.committed = Committed(policy, skeleton, c.generation)
            self.last_apply = NftApply.UNCHANGED
            return True
        try:
            self._commit(nft, batch, policy, skeleton)
        except BackendError:
            return False  # nothing changed (one transaction); the whole ruleset goes in instead
        self.last_apply = NftApply.CHANGES
        # No record: someone else committed between the generation reads, so what the
        # kernel holds is unknown and the whole ruleset goes in.
        return self.committed is not None

    def _commit(self, nft: Any, batch: dict[str, Any], policy: Policy, skeleton: dict[str, Any] | None) -> None:
        """One transaction; remembers it as the kernel's state only when it was the one
        commit between two generation reads."""
        self.committed = None
        before = _generation()
        _run_json(nft, batch)
        after = _generation()
        if skeleton is not None and before is not None and after == (before + 1) & 0xFFFFFFFF:
            self.committed = Committed(policy, skeleton, after)

    def _apply_whole(self, nft: Any, policy: Policy, uplinks: dict[int, str] | None = None,
                     skeleton: dict[str, Any] | None = None) -> None:
        """Both tables replaced in one transaction, counters carried over. Also the way to
        refill the sets: flushing and refilling 10,000 interval elements in one
        transaction takes libnftables seconds, a whole ruleset a third of one."""
        uplinks = uplink_interfaces(policy) if uplinks is None else uplinks
        skeleton = render_nft(policy, uplinks, elements=False) if skeleton is None else skeleton
        self._commit(nft, render_nft(policy, uplinks, self._counters()), policy, skeleton)
        self.last_apply = NftApply.WHOLE

    def change_exemptions(self, before: Policy, after: Policy) -> None:
        """Only what changed from `before` (what the kernel should hold now) to `after`:
        O(changed). If an element to delete is missing (someone edited the sets), the
        transaction changes nothing and the whole ruleset goes in instead."""
        batch = render_exemption_change(before, after)
        with netns(self.netns):
            nft = _nft()
            c = self._tracked(before)
            if batch is not None:
                try:
                    self._commit(nft, batch, after, c.skeleton if c else None)
                    return
                except BackendError:
                    pass
            self._apply_whole(nft, after)

    def reset(self) -> None:
        self.committed = None
        with netns(self.netns):
            _run_json(_nft(), render_nft_reset())

    @staticmethod
    def _chains(nft: Any, family: str) -> dict[str, dict[str, Any]]:
        # `list chains` reads chains only; `list table` would fetch every set element too
        # (0.2 s at 10,000 exemptions).
        return {
            o["chain"]["name"]: o["chain"]
            for o in _list(nft, f"list chains {family}")
            if "chain" in o and o["chain"].get("table") == TABLE
        }

    def _missing_chains(self, nft: Any) -> list[str]:
        chains = self._chains(nft, "inet")
        return [c for c in REQUIRED_CHAINS if chains.get(c, {}).get("policy") != "drop"]

    @classmethod
    def _egress_chains(cls, nft: Any) -> list[str]:
        return [name for name, c in cls._chains(nft, NETDEV).items() if c.get("hook") == "egress"]

    def status(self) -> LayerStatus:
        with netns(self.netns):
            nft = _nft()
            missing = self._missing_chains(nft)
            egress = self._egress_chains(nft)
        if missing:
            return LayerStatus(False, f"table inet {TABLE} missing or incomplete ({', '.join(missing)})")
        return LayerStatus(True, f"table inet {TABLE} enforcing; netdev egress chains: {len(egress)}")

    def egress_chains(self) -> list[str]:
        with netns(self.netns):
            return self._egress_chains(_nft())

    @staticmethod
    def _counters() -> dict[str, tuple[int, int]]:
        try:
            return {**read_counters(INET, TABLE), **read_counters(NETDEV, TABLE)}
        except OSError as e:
            raise BackendError("nftables", f"reading the named counters: {e}") from None

    def read_counters(self) -> dict[str, tuple[int, int]]:
        """Named drop counters, by name -> (packets, bytes); read without listing rules
        or sets."""
        with netns(self.netns):
            return self._counters()

    def drops(self) -> list[tuple[Reason, int, int, int]]:
        """(reason, family, packets, bytes) for every named drop counter."""
        values = self.read_counters()
        return [(r, f, *values.get(n, (0, 0))) for n, r, f in counter_names()]


_conforms: type[Layer] = NftLayer  # mypy fails here when NftLayer drifts from the Layer Protocol

__all__ = ["NftApply", "NftLayer", "egress_chain_name", "uplink_interfaces"]
