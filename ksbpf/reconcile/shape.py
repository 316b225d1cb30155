"""Pure: what an nftables ruleset is made of, to tell drift from traffic. A rendered
batch and a kernel listing reduce to the same `NftShape` when the kernel holds what the
policy renders; the fingerprint of a listing changes with any rule, element or handle,
never with counter values."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class NftShape:
    """What a ruleset is made of, without its counter values: chains (with hook, policy,
    device), rule counts per chain, sets and counters, per table family."""

    chains: frozenset[tuple[str, str, str, str, str]]
    rules: frozenset[tuple[str, str, int]]
    sets: frozenset[tuple[str, str]]
    counters: frozenset[tuple[str, str]]

    def devices_as_listed(self, listed: NftShape) -> NftShape:
        """This (expected) shape with a chain's device left out wherever the listing
        shows that chain without one: nft 1.0.6's JSON output leaves out the device of a
        netdev chain (its text output has it). The chain's name (egress_if<ifindex>)
        still names the interface, so that is all that goes unchecked."""
        blank = {(c[0], c[1]) for c in listed.chains if not c[4]}
        if not blank:
            return self
        chains = frozenset((f, n, h, p, "" if (f, n) in blank else d) for f, n, h, p, d in self.chains)
        return NftShape(chains, self.rules, self.sets, self.counters)

    def describe_difference(self, other: NftShape) -> str:
        parts = []
        for what in ("chains", "rules", "sets", "counters"):
            mine, theirs = getattr(self, what), getattr(other, what)
            if mine != theirs:
                missing = sorted(mine - theirs)[:3]
                extra = sorted(theirs - mine)[:3]
                parts.append(f"{what}: expected {missing or '-'} found {extra or '-'}")
        return "; ".join(parts)


def shape_of(objects: list[dict[str, Any]]) -> NftShape:
    """The shape of a JSON ruleset: a rendered batch's commands or a kernel listing."""
    chains, sets, counters = set(), set(), set()
    rules: dict[tuple[str, str], int] = {}
    for obj in objects:
        if "add" in obj:
            obj = obj["add"]
        elif len(obj) != 1 or "metainfo" in obj or "delete" in obj or "flush" in obj:
            continue
        kind, body = next(iter(obj.items()))
        if not isinstance(body, dict):
            continue
        fam = str(body.get("family", ""))
        if kind == "chain":
            dev = body.get("dev", "")
            dev = ",".join(dev) if isinstance(dev, list) else str(dev)
            chains.add((fam, str(body["name"]), str(body.get("hook", "")), str(body.get("policy", "")), dev))
        elif kind == "rule":
            key = (fam, str(body["chain"]))
            rules[key] = rules.get(key, 0) + 1
        elif kind == "set":
            sets.add((fam, str(body["name"])))
        elif kind == "counter":
            counters.add((fam, str(body["name"])))
    return NftShape(frozenset(chains), frozenset((f, c, n) for (f, c), n in rules.items()), frozenset(sets), frozenset(counters))


def fingerprint(objects: list[dict[str, Any]]) -> str:
    """Digest of a kernel listing with counter values left out: a rule replaced, an
    element added or a chain re-made (new handles) changes it; traffic does not."""
    clean = []
    for obj in objects:
        if "metainfo" in obj:
            continue
        if "counter" in obj and isinstance(obj["counter"], dict):
            obj = {"counter": {k: v for k, v in obj["counter"].items() if k not in ("packets", "bytes")}}
        clean.append(obj)
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()
