"""The Linux engine: drives the three layers in order and keeps ksbpf's state on disk.

Order: nftables first (fail closed within milliseconds), then routing, then BPF. A BPF
failure never undoes the other two: `up` reports it and exits non-zero, never silently.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ksbpf.errors import BackendError, CapacityError, KsbpfError, PolicyError
from ksbpf.linux.bpf.layout import instance_name
from ksbpf.linux.layer import Layer, LayerName, LayerStatus
from ksbpf.linux.nftables import NftLayer
from ksbpf.linux.routing import RoutingLayer
from ksbpf.policy import Exemption, Policy, loads_policy, merge_exemptions, parse_exemption
from ksbpf.policy_file import read_policy_file

if TYPE_CHECKING:  # the BPF layer is imported when first used: without BCC, `up` still engages the others
    from ksbpf.linux.bpf.layer import BpfLayer
    from ksbpf.render.bpf import BpfPlan

DEFAULT_STATE_DIR = Path("/var/lib/ksbpf")
LAYER_ORDER = tuple(LayerName)


def state_dir_for(netns: str | None, base: Path = DEFAULT_STATE_DIR) -> Path:
    return base if netns is None else base / "netns" / netns


@dataclass
class EngageResult:
    layers: dict[str, LayerStatus] = field(default_factory=dict)
    seconds: float = 0.0
    effective: Policy | None = None  # the policy with the run-time exemptions, as applied

    @property
    def ok(self) -> bool:
        return all(s.engaged for s in self.layers.values())

    @property
    def failed(self) -> list[str]:
        return [n for n, s in self.layers.items() if not s.engaged]


def _file_key(path: Path) -> tuple[int, int, int] | None:
    """Identifies one version of a file we replace with os.replace (new inode each time)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _env_reason(e: BaseException) -> str:
    """An environment error (a missing module, a refused system call) as a layer's reason."""
    if isinstance(e, ImportError):
        return f"unavailable: {e}"
    if isinstance(e, OSError):
        return f"{e.filename}: {e.strerror}" if e.filename else (e.strerror or str(e))
    return str(e)


def _guarded(status: Callable[[], LayerStatus]) -> LayerStatus:
    try:
        return status()
    except BackendError as e:
        return LayerStatus(False, e.reason)
    except (ImportError, OSError) as e:
        return LayerStatus(False, _env_reason(e))


class ExemptionStore:
    """Run-time exemptions (`ksctl exempt`), persisted as JSON under the state dir. A
    long-lived engine (the daemon) parses the file again only when it was replaced."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / "exemptions.json"
        self._cache: tuple[tuple[int, int, int] | None, tuple[Exemption, ...]] | None = None

    def load(self) -> tuple[Exemption, ...]:
        key = _file_key(self.path)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return ()
        except (OSError, ValueError) as e:
            raise PolicyError(f"unreadable: {e}", source=str(self.path)) from None
        loaded = tuple(parse_exemption(d, str(self.path), f"[{i}]") for i, d in enumerate(data))
        self._cache = (key, loaded)
        return loaded

    def save(self, exemptions: tuple[Exemption, ...]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([e.as_dict() for e in exemptions], indent=1) + "\n")
        os.replace(tmp, self.path)
        self._cache = (_file_key(self.path), exemptions)


class LinuxEngine:
    def __init__(
        self,
        netns: str | None = None,
        state_dir: Path | None = None,
        bpf: bool = True,
    ) -> None:
        self.netns = netns
        self.state_dir = state_dir or state_dir_for(netns)
        self.instance = instance_name(netns)
        self.nft = NftLayer(netns)
        self.routing = RoutingLayer(netns)
        self.bpf_enabled = bpf
        self.exemptions = ExemptionStore(self.state_dir)
        self._bpf: BpfLayer | None = None
        # A long-lived caller (ksbpfd) deletes the BPF maps' old entries after answering
        # (finish_bpf_cleanup): the grace period before it is then not on the request's path.
        self.defer_bpf_cleanup = False
        # (file key, parsed): a 10,000-entry policy takes ~0.3 s to parse again
        self._snapshot: tuple[tuple[int, int, int] | None, Policy] | None = None

    # ---------------------------------------------------------------- layers

    def bpf_layer(self, policy: Policy | None = None) -> BpfLayer:
        if self._bpf is None:
            from ksbpf.linux.bpf.layer import BpfLayer

            ksrc = policy.bpf.kernel_source if policy else None
            self._bpf = BpfLayer(self.instance, kernel_source=ksrc, netns=self.netns)
        if policy is not None:
            self._bpf.cgroup_hint = policy.bpf.cgroup
        return self._bpf

    @property
    def loaded_bpf_layer(self) -> BpfLayer | None:
        """The BPF layer if this engine has made it (bpf_layer() imports it: BCC's side)."""
        return self._bpf

    # ---------------------------------------------------------------- state

    @property
    def applied_policy_path(self) -> Path:
        return self.state_dir / "applied-policy.toml"

    def effective_policy(self, policy: Policy) -> Policy:
        return merge_exemptions(policy, self.exemptions.load())

    def applied_snapshot(self) -> Policy:
        """The policy `up` last applied, as a snapshot: a later edit of the file does not
        change what `exempt` re-renders."""
        path = self.applied_policy_path
        key = _file_key(path)
        if key is not None and self._snapshot is not None and self._snapshot[0] == key:
            return self._snapshot[1]
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise KsbpfError("ksbpf is not up here (no applied policy); run `ksctl up --config FILE`") from None
        policy = loads_policy(text, str(path))
        self._snapshot = (key, policy)
        return policy

    def applied_policy(self) -> Policy:
        """The applied snapshot with run-time exemptions merged in."""
        return self.effective_policy(self.applied_snapshot())

    def _record(self, policy_text: str, policy: Policy) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.applied_policy_path.with_suffix(".tmp")
        tmp.write_text(policy_text)
        os.replace(tmp, self.applied_policy_path)
        self._snapshot = (_file_key(self.applied_policy_path), policy)

    # ---------------------------------------------------------------- operations

    def up_file(self, path: str | Path) -> EngageResult:
        # Read once, with the daemon's trust checks: what is applied is what is recorded.
        policy, text = read_policy_file(path)
        return self.up(policy, text, source=str(path))

    def up(self, policy: Policy, policy_text: str | None = None, source: str = "<policy>") -> EngageResult:
        """Engage (or re-engage: idempotent, leak-free while traffic flows) all layers."""
        start = time.monotonic()
        effective = self.effective_policy(policy)
        bpf_plan = self._bpf_plan(effective, source)
        result = EngageResult(effective=effective)
        # nftables first: one atomic transaction, so a refusal leaves the old ruleset and
        # raises. An environment that has no nftables for us (no libnftables, no netlink)
        # leaves that layer out, reported: routing and BPF still engage.
        try:
            self.nft.apply(effective)
            result.layers[LayerName.NFTABLES] = self.nft.status()
        except (ImportError, OSError) as e:
            result.layers[LayerName.NFTABLES] = LayerStatus(False, _env_reason(e))
        # Routing and BPF failures are reported, not raised: nftables already holds.
        try:
            self.routing.apply(effective)
            result.layers[LayerName.ROUTING] = self.routing.status()
        except BackendError as e:
            result.layers[LayerName.ROUTING] = LayerStatus(False, e.reason)
        except (ImportError, OSError) as e:
            result.layers[LayerName.ROUTING] = LayerStatus(False, _env_reason(e))
        result.layers[LayerName.BPF] = self._apply_bpf(effective, bpf_plan)
        if policy_text is not None:
            self._record(policy_text, policy)
        result.seconds = time.monotonic() - start
        if policy_text is not None:
            # cli's: the boot lockdown follows the applied policy (logged, never fails the apply)
            from ksbpf.lockdown_file import write_lockdown_logged

            write_lockdown_logged(policy, self.state_dir)
        return result

    def _bpf_plan(self, policy: Policy, source: str) -> BpfPlan | None:
        """The BPF layer's plan, checked against what its maps hold before any layer
        changes: a policy too big for them is bad input, refused whole, not applied by
        nftables and routing and then refused by BPF."""
        if not self.bpf_enabled:
            return None
        try:
            from ksbpf.render.bpf import check_capacity, render
        except ImportError:
            return None  # reported by _apply_bpf
        plan = render(policy)
        try:
            check_capacity(plan)
        except BackendError as e:
            raise PolicyError(e.reason, source=source) from None
        return plan

    def _apply_bpf(self, policy: Policy, plan: BpfPlan | None = None) -> LayerStatus:
        if not self.bpf_enabled:
            return LayerStatus(False, "disabled (--no-bpf)")
        try:
            layer = self.bpf_layer(policy)
            layer.apply(policy, plan)
            return layer.status()
        except ImportError as e:
            return LayerStatus(False, f"BPF layer unavailable: {e}")
        except BackendError as e:
            return LayerStatus(False, e.reason)
        except OSError as e:
            return LayerStatus(False, _env_reason(e))

    def _applied_bpf_cgroup(self) -> str | None:
        """The [bpf] cgroup of the applied policy, read without validating the whole
        policy (a 10,000-exemption file takes 0.3 s): where its programs were attached."""
        if self._snapshot is not None and self._snapshot[0] == _file_key(self.applied_policy_path):
            return self._snapshot[1].bpf.cgroup
        try:
            data = tomllib.loads(self.applied_policy_path.read_text())
        except (OSError, ValueError):
            return None
        bpf = data.get("bpf", {})
        cgroup = bpf.get("cgroup", "/") if isinstance(bpf, dict) else None
        return cgroup if isinstance(cgroup, str) else None

    def down(self) -> None:
        """Remove every layer. The only way enforcement ends. The BPF layer finds its
        programs by asking the kernel (the applied policy's cgroup first, then the cgroup
        tree), not only through its pins; BackendError names whatever is left."""
        errors: list[str] = []
        try:
            layer = self.bpf_layer()
            layer.cgroup_hint = self._applied_bpf_cgroup() or layer.cgroup_hint
            layer.reset()
        except ImportError:
            pass
        except BackendError as e:
            errors.append(str(e))
        others: tuple[Layer, ...] = (self.routing, self.nft)
        for each in others:
            try:
                each.reset()
            except BackendError as e:
                errors.append(str(e))
            except (ImportError, OSError) as e:
                errors.append(f"{each.name}: {_env_reason(e)}")
        self.applied_policy_path.unlink(missing_ok=True)
        if errors:
            raise BackendError("down", "; ".join(errors))

    def status(self) -> dict[str, LayerStatus]:
        """Each layer's own check of everything `up` puts in place; an environment error
        is that layer's reason, never an exception."""
        out: dict[str, LayerStatus] = {LayerName.NFTABLES: _guarded(self.nft.status), LayerName.ROUTING: _guarded(self.routing.status)}
        try:
            layer = self.bpf_layer()
            if layer.cgroup_hint is None and not layer.dir.is_dir():
                # no pins to say where: the applied policy's cgroup is where to ask first
                layer.cgroup_hint = self._applied_bpf_cgroup()
            out[LayerName.BPF] = layer.status()
        except ImportError as e:
            out[LayerName.BPF] = LayerStatus(False, f"BPF layer unavailable: {e}")
        except BackendError as e:
            out[LayerName.BPF] = LayerStatus(False, e.reason)
        except OSError as e:
            out[LayerName.BPF] = LayerStatus(False, _env_reason(e))
        return out

    def finish_bpf_cleanup(self) -> None:
        if self._bpf is not None:
            self._bpf.finish_cleanup()

    # ---------------------------------------------------------------- exemptions

    def set_exemption(self, exemption: Exemption) -> Policy:
        current = tuple(e for e in self.exemptions.load() if e.cgroup != exemption.cgroup)
        return self._store_exemptions((*current, exemption))

    def remove_exemption(self, cgroup: str) -> Policy:
        current = self.exemptions.load()
        kept = tuple(e for e in current if e.cgroup != cgroup)
        if len(kept) == len(current):
            raise PolicyError(f"no run-time exemption for cgroup {cgroup!r}", source="ksctl unexempt", key="--cgroup")
        return self._store_exemptions(kept)

    def _store_exemptions(self, exemptions: tuple[Exemption, ...]) -> Policy:
        """Apply, then persist: a failure restores the previous sets and leaves the file."""
        snapshot = self.applied_snapshot()
        before = merge_exemptions(snapshot, self.exemptions.load())
        policy = merge_exemptions(snapshot, exemptions)
        self.nft.change_exemptions(before, policy)
        try:
            # engaged(), not status(): a few syscalls, where status() reads map keys. The
            # BPF layer writes only what differs from `before` (or all, when unsure).
            if self.bpf_enabled and (layer := self.bpf_layer(policy)).engaged():
                layer.change_exemptions(before, policy, defer_cleanup=self.defer_bpf_cleanup)
        except ImportError:
            pass
        except CapacityError as e:
            self.nft.change_exemptions(policy, before)
            # bad input (exit 2), as `up` refuses it: the sets are as before, nothing changed
            raise PolicyError(e.reason, source="ksctl exempt") from None
        except BackendError:
            self.nft.change_exemptions(policy, before)
            raise
        self.exemptions.save(exemptions)
        return policy
