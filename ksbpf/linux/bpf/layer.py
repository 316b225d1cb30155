"""BpfLayer: the cgroup-bpf enforcement layer of one ksbpf instance (apply, run-time
updates, drift repair, status, reset)."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from ksbpf.errors import BpfError, KsbpfError
from ksbpf.linux import bpffs, headers
from ksbpf.linux.bpf import loader
from ksbpf.linux.bpf.attach import (
    Attached,
    attach,
    attached_anywhere,
    describe_attached,
    detach,
    discard,
    query_attached,
    reattach,
)
from ksbpf.linux.bpf.environment import (
    bpf_usable,
    bpffs_mounted,
    environment_checks,
    netns_cookie,
)
from ksbpf.linux.bpf.generations import KEY0, Generation, active_config
from ksbpf.linux.bpf.instance import check_instance_maps, read_counters, read_events_lost, zero_counters
from ksbpf.linux.bpf.kernel import (
    ATTACH_TYPES,
    BpfMap,
    os_reason,
    probe_netns_cookie_helper,
    probe_sock_task_helpers,
    rcu_grace_period,
)
from ksbpf.linux.bpf.layout import (
    CGROUP_KEY_FMT,
    EVENTS_BYTES,
    INSTANCE_RE,
    NFT_EVENTS_LINK,
    PROGS,
)
from ksbpf.linux.bpf.loader import (
    LoadStats,
    _source_dir,
    build_digest,
    cflags,
    check_events_bytes,
    nft_events_build,
)
from ksbpf.linux.bpf.plan import (
    Config,
    ExemptionChange,
    ExemptionIndex,
    Held,
    Step,
    StepPath,
    Version,
    cgroup_wants,
    cgroups_digest_changed,
    change_want,
    one_cgroup_step,
    plan_step,
    select_change,
)
from ksbpf.linux.bpf.writes import (
    RESERVE_KEY,
    MapsRead,
    open_maps,
    read_maps,
    resolve_cgroups,
    resolve_paths,
    sweep_rule_sets,
    tunnel_masks,
    tunnels_of,
    write_delta,
    write_one_cgroup,
    write_rules,
    write_tagged,
    write_tunnels,
)
from ksbpf.linux.cgroup import cgroup2_mount, cgroup_dir, cgroup_id, ids_by_path
from ksbpf.linux.layer import Layer, LayerName, LayerStatus
from ksbpf.linux.libbpf import prog_query
from ksbpf.linux.netns import netns
from ksbpf.policy import Policy
from ksbpf.render.bpf import (
    BpfPlan,
    Capacity,
    CgroupEntry,
    CgroupWant,
    cgroup_key,
    check_capacity,
    check_counts,
    endpoint_cgroup_mark,
    render,
)
from ksbpf.verdict import interface_matches

BPFFS = bpffs.BPFFS
PIN_ROOT = BPFFS / "ksbpf"


@dataclass(frozen=True)
class ApplyStats:
    generation: int
    load: LoadStats  # LoadStats.nothing() when the live generation was reused
    apply_s: float  # the whole apply(), loader included
    # "first", "atomic", "make-before-break" (a new generation), "in place" (the live one's
    # maps updated) or "unchanged" (nothing to write)
    replacement: str
    rss_kb: int  # this process after apply (the daemon's steady state; bcc is never imported here)
    compiled: bool = True
    changed: tuple[str, ...] = ()  # what an in-place apply wrote or repaired
    # how, per part: e.g. ("endpoints (delta +1 -0)",) or ("dns (versioned)",) (Step.describe)
    writes: tuple[str, ...] = ()


def _rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class _Pending:
    """Deletions a deferred write left for after a grace period."""

    gen: Generation
    entries: list[tuple[str, list[bytes]]]  # (map name, keys)
    sweep: frozenset[int] = frozenset()  # rule sets whose every ks_ports / ks_nets key goes


@dataclass
class BpfLayer:
    """The cgroup-bpf enforcement layer of one ksbpf instance.

    `instance` names the pins and lets the layer recognise its own programs; `netns` is
    the network namespace whose packets it judges (None: the caller's). Every method
    works from a process that did not load the programs (state lives in the kernel).
    """

    instance: str
    kernel_source: str | None = None
    netns: str | None = None
    # "auto" probes the kernel; "helper" / "sk_storage" force a netns mode (tests).
    netns_mode: str = "auto"
    # The policy's [bpf] cgroup, where its programs are attached: looked at first when a
    # process that applied nothing (ksctl without the daemon) finds them, before a walk
    # of the whole cgroup tree (tens of thousands of cgroups on a busy host or the bench).
    cgroup_hint: str | None = None
    # Bytes of the drop-event ring buffer (a power of two, at least a page).
    events_bytes: int = EVENTS_BYTES
    last_apply: ApplyStats | None = field(default=None, init=False)
    _policy: Policy | None = field(default=None, init=False, repr=False)
    _cgroup_cache: dict[int, tuple[Path, ...]] = field(default_factory=dict, init=False, repr=False)
    # What update_exemptions(defer_cleanup=True) left to delete after a grace period.
    # Every write runs it first (_finish_cleanup).
    _pending: list[_Pending] = field(default_factory=list, init=False, repr=False)
    # (generation dir, cgroup id -> want) of the last write: see _remember.
    _written: tuple[Path, dict[int, CgroupWant]] | None = field(default=None, init=False, repr=False)
    last_step: Step | None = field(default=None, init=False, repr=False)  # of the last write
    # (generation dir, its live config) as the last write of this process left it, and the
    # exemptions that write was given: change_exemptions trusts the maps to hold those
    # while the live config is still that one (no other writer came between).
    _base: tuple[Path, Config] | None = field(default=None, init=False, repr=False)
    _index: ExemptionIndex | None = field(default=None, init=False, repr=False)
    # Why the last change_exemptions wrote the whole policy ("" : it did not).
    last_fallback: str = field(default="", init=False, repr=False)

    name = LayerName.BPF

    def __post_init__(self) -> None:
        if not INSTANCE_RE.match(self.instance) or self.instance in (".", ".."):
            raise BpfError(f"invalid instance name {self.instance!r} (1-64 of A-Z a-z 0-9 _ . -)")
        if self.netns_mode not in ("auto", "helper", "sk_storage"):
            raise BpfError(f"unknown netns mode {self.netns_mode!r}")
        check_events_bytes(self.events_bytes)

    @property
    def dir(self) -> Path:
        return PIN_ROOT / self.instance

    # ------------------------------------------------------------------ support

    def is_supported(self) -> tuple[bool, str]:
        for name, ok, detail in environment_checks():
            if not ok:
                return False, f"{name}: {detail}"
        lookup = headers.resolve_kernel_source(self.kernel_source)
        if lookup.source is None:
            return False, lookup.explain()
        mode = self._netns_mode()
        return True, f"BCC with headers {lookup.source.describe()}; netns by {mode}"

    def _netns_mode(self) -> str:
        if self.netns_mode != "auto":
            return self.netns_mode
        try:
            return "helper" if probe_netns_cookie_helper() else "sk_storage"
        except OSError as e:
            raise BpfError(f"cannot load BPF programs: {os_reason(e)}") from None

    def _source(self, policy: Policy | None) -> headers.KernelSource:
        setting = self.kernel_source or (policy.bpf.kernel_source if policy else None)
        lookup = headers.resolve_kernel_source(setting)
        if lookup.source is None:
            raise BpfError(
                f"cannot compile: {lookup.explain()}. Install the running kernel's headers, run "
                f"`ksctl doctor --prepare-headers {headers.DEFAULT_HEADERS_DIR}`, or set [bpf] kernel_source"
            )
        return lookup.source

    # ------------------------------------------------------------------ apply

    def apply(self, policy: Policy, plan: BpfPlan | None = None) -> ApplyStats:
        """Enforce `policy`. When its programs would be built exactly as the live
        generation's (build_digest) and attach to the same cgroup, the live generation's
        maps are updated in place, with no compile, one whole version at a time; the same
        policy again writes nothing but repairs drift (tunnel ifindexes, cgroup ids, a
        detached program). Otherwise a new generation is compiled, loaded, filled and
        attached, replacing the earlier one (atomically where the kernel can). On failure
        the earlier state stays in force and BpfError says why. `plan`: render(policy),
        if the caller has it."""
        try:
            return self._apply(policy, plan)
        except OSError as e:
            # An environment error no step named (a read-only bpffs, EPERM from bpf(2), ...)
            raise BpfError(os_reason(e)) from None

    def _apply(self, policy: Policy, plan: BpfPlan | None) -> ApplyStats:
        t0 = time.monotonic()
        self._index = None
        target = self._cgroup(policy.bpf.cgroup)
        source = self._source(policy)
        plan = plan if plan is not None else render(policy)  # the engine checked it already
        check_capacity(plan)
        cookie = self._cookie()
        mode = self._netns_mode()
        bpffs.ensure_bpffs(BPFFS)
        with self._locked():
            self._finish_cleanup()
            pins_kept = check_instance_maps(self.dir, self.events_bytes)
            target_id = cgroup_id(target)
            previous = self._attached(extra=[target])
            live = self._reusable(previous, target_id) if pins_kept else None
            capacity = live[0].capacity() if live else None
            if capacity is None or not capacity.holds(plan):
                capacity = Capacity.for_plan(plan)
            nft, nft_why = nft_events_build()
            flags = cflags(mode, self.dir, capacity, self.events_bytes, nft, probe_sock_task_helpers())
            header = Config(cookie, 0, target_id, plan.flags, plan.endpoint_mark, self.instance,
                            build=build_digest(_source_dir(), flags, source, mode))
            if live is not None and live[1].build == header.build:
                gen = live[0]
                step = self._update(gen, plan, replace(header, generation=gen.number))
                writes = step.describe()
                repaired = reattach(gen, target, self._attached(extra=[target]))
                changed = step.changed + tuple(f"attached {kind}" for kind in repaired)
                self._retire(keep=gen.number, cgroups=[target])
                how = "in place" if changed else "unchanged"
                load, compiled = LoadStats.nothing(mode), False
            else:
                self._sweep_unattached()
                number = 1 + max([g.number for g in self._generations()] + [a.generation for a in previous] + [0])
                gen = Generation(number, self.dir / f"g{number}")
                # Through the module, where tests count the compiling children.
                load = loader._run_loader(source, mode, flags, gen.path, nft, nft_why)
                try:
                    self._fill(gen, plan, replace(header, generation=number))
                    how = attach(gen, target, previous)
                except BaseException:
                    discard(gen, target)
                    raise
                self._retire(keep=number, cgroups=[target])
                changed, compiled, writes = (), True, ()
        self._policy = policy
        self._index = ExemptionIndex.build(policy.exemptions, plan.exemptions)
        self.last_apply = ApplyStats(gen.number, load, time.monotonic() - t0, how, _rss_kb(), compiled, changed,
                                     writes)
        return self.last_apply

    def _reusable(self, attached: list[Attached], target_id: int) -> tuple[Generation, Config] | None:
        """The live generation and its live version, if it may take a new policy in place:
        the newest generation with a program attached (the newest of all when someone
        detached everything), ours, built for the target cgroup, both programs pinned.
        Whether its build fits the policy is apply's to judge."""
        gens = self._generations()
        on = {a.generation for a in attached}
        candidates = [g for g in gens if g.number in on] or gens
        if not candidates:
            return None
        gen = candidates[-1]
        cfg = gen.config()
        if cfg is None or cfg.version == 0 or cfg.instance != self.instance or cfg.cgroup_id != target_id:
            return None
        if any(gen.prog_id(kind) is None for kind in PROGS):
            return None
        return gen, cfg

    def _version(self, plan: BpfPlan, header: Config) -> Version:
        return Version(header=header, endpoints=plan.endpoints, dns=plan.dns, lan=plan.lan,
                       cgroups=cgroup_wants(plan, resolve_cgroups(plan)),
                       tunnels=frozenset(self._tunnel_ifindexes(plan.tunnel_patterns)))

    def _update(self, gen: Generation, plan: BpfPlan, header: Config) -> Step:
        version = self._version(plan, header)
        try:
            self.last_step = self._write(gen, version)
            return self.last_step
        except OSError as e:
            raise BpfError(f"updating generation {gen.number} in place: {e}") from None

    def _cgroup(self, path: str) -> Path:
        try:
            d = cgroup_dir(path)
        except KsbpfError as e:
            raise BpfError(f"[bpf] cgroup: {e}") from None
        if not d.is_dir():
            raise BpfError(f"[bpf] cgroup {path!r}: {d} does not exist")
        return d

    def _cookie(self) -> int:
        try:
            return netns_cookie(self.netns)
        except OSError as e:
            raise BpfError(f"cannot read the netns cookie of {self.netns or 'this netns'}: {e.strerror}") from None
        except KsbpfError as e:
            raise BpfError(str(e)) from None

    @contextmanager
    def _locked(self, create: bool = True) -> Iterator[None]:
        """One writer per instance (daemon and ksctl may both act): flock on the pin dir."""
        try:
            if create:
                self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BpfError(f"instance {self.instance!r} has no loaded programs (apply a policy first)") from None
        except OSError as e:
            raise BpfError(f"cannot use {self.dir}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _generations(self) -> list[Generation]:
        gens = []
        try:
            entries = list(self.dir.iterdir())
        except OSError:
            return []
        for p in entries:
            if p.is_dir() and re.fullmatch(r"g\d+", p.name):
                gens.append(Generation(int(p.name[1:]), p))
        return sorted(gens, key=lambda g: g.number)

    def _cgroup_by_id(self, cg_id: int, hints: Iterable[Path] = ()) -> Path | None:
        """The cgroup directory with this id: the hints, the last answer and the cgroup2
        root (production attaches there) first; a walk of the whole tree last."""
        try:
            mount = cgroup2_mount()
        except KsbpfError:
            return None
        for h in [*hints, *self._cgroup_cache.get(cg_id, ()), mount]:
            try:
                if cgroup_id(h) == cg_id:
                    self._cgroup_cache[cg_id] = (h,)
                    return h
            except OSError:
                continue
        for rel, i in ids_by_path(mount).items():
            if i == cg_id:
                found = cgroup_dir(rel, mount)
                self._cgroup_cache[cg_id] = (found,)
                return found
        return None

    def _policy_cgroups(self) -> list[Path]:
        """The attach cgroups the last applied policy and the hint name."""
        out = []
        for rel in (self._policy.bpf.cgroup if self._policy is not None else None, self.cgroup_hint):
            if rel is None:
                continue
            try:
                d = cgroup_dir(rel)
            except KsbpfError:
                continue
            if d not in out:
                out.append(d)
        return out

    def _candidate_cgroups(self, extra: Iterable[Path] = ()) -> list[Path]:
        """Cgroups our programs may be attached to: the given ones, the last policy's,
        and those the pinned generations recorded."""
        out: list[Path] = []
        hints = [*extra, *self._policy_cgroups()]
        for h in hints:
            if h not in out and h.is_dir():
                out.append(h)
        for g in self._generations():
            cfg = g.config()
            if cfg is None:
                continue
            p = self._cgroup_by_id(cfg.cgroup_id, out)
            if p is not None and p not in out:
                out.append(p)
        return out

    def _attached(self, extra: Iterable[Path] = ()) -> list[Attached]:
        """Our programs attached to any candidate cgroup, recognised by their ks_config."""
        return query_attached(self._candidate_cgroups(extra), self.instance)

    def _sweep_unattached(self) -> None:
        """Generations pinned but attached nowhere (an apply that died half-way)."""
        attached = {(a.generation, a.kind) for a in self._attached()}
        for g in self._generations():
            if not any((g.number, k) in attached for k in PROGS):
                shutil.rmtree(g.path, ignore_errors=True)

    def _fill(self, gen: Generation, plan: BpfPlan, header: Config) -> None:
        try:
            zero_counters(self.dir)
            self.last_step = self._write(gen, self._version(plan, header))
        except OSError as e:
            raise BpfError(f"filling generation {gen.number}: {e}") from None

    def _write(self, gen: Generation, want: Version, defer: bool = False) -> Step:
        """Bring a generation's maps to `want` (plan_step chooses how). Versioned: the next
        version is written beside the live one (what changed under new tags and rule set
        ids, in the other tunnel bank), then ks_active flips to it in one u32 write, then,
        after a grace period, what only the old version used is deleted. In place (delta,
        one cgroup): only what changed is written, under the live tags. A failure leaves the
        live version in force: a versioned write's entries are unreferenced (and cleared by
        the next write), an in-place one undoes itself. `defer`: the grace period and what
        it guards are left to _finish_cleanup (finish_cleanup() or the next write). Returns
        the step taken."""
        self._base = None
        with open_maps(gen) as maps:
            found = active_config(maps["ks_active"], maps["ks_config"])
            live = found if found is not None and found[1].version else None  # version 0: never filled
            old = live[1] if live else None
            masks = tunnel_masks(maps)
            read = read_maps(maps, want, old)
            held = read.held(old)
            step = plan_step(old, tunnels_of(masks, old.tunnel_bank) if old else frozenset(), want, held)
            if old is not None and not step.changed:
                self._remember(gen, want)
                self._base = (gen.path, old)
                return step
            cfg = step.config
            cleanups: list[tuple[BpfMap, list[bytes]]] = []
            sweep: frozenset[int] = frozenset()
            if step.path == StepPath.DELTA:
                assert live is not None
                write_delta(maps, step, read, live[0])
                self._remember(gen, want)
                self._base = (gen.path, cfg)
                return step
            if step.path == StepPath.ONE_CGROUP:
                assert live is not None and want.cgroups is not None and step.cgroup is not None
                hint = self._written[1].get(step.cgroup) if self._written and self._written[0] == gen.path else None
                cleanups, sweep = write_one_cgroup(maps, step, want, held, read, live[0], hint)
                self._remember(gen, want)
                self._base = (gen.path, cfg)
                if not cleanups and not sweep:
                    return step  # nothing only the old entry used: no grace period to wait for
            else:
                if "endpoints" in step.changed:
                    assert want.endpoints is not None
                    cleanups += write_tagged(maps["ks_endpoints"], want.endpoints, cfg.endpoints_tag,
                                              old.endpoints_tag if old else None, read.endpoint_keys)
                if "dns" in step.changed:
                    assert want.dns is not None
                    cleanups += write_tagged(maps["ks_dns"], want.dns, cfg.dns_tag, old.dns_tag if old else None,
                                              read.dns_keys)
                if "lan" in step.changed or "cgroups" in step.changed:
                    cleanups += write_rules(maps, step, want, old, read.cgroup_items)
                if "tunnels" in step.changed:
                    assert want.tunnels is not None
                    write_tunnels(maps, masks, cfg.tunnel_bank, want.tunnels)
                slot = 1 - live[0] if live else 0
                maps["ks_config"].update(struct.pack("<I", slot), cfg.pack())
                maps["ks_active"].update(KEY0, struct.pack("<I", slot))
                self._remember(gen, want)
                self._base = (gen.path, cfg)
            self._clean_after(gen, maps, cleanups, sweep, defer if live is not None else None)
        return step

    def _clean_after(self, gen: Generation, maps: Mapping[str, BpfMap], cleanups: list[tuple[BpfMap, list[bytes]]],
                     sweep: frozenset[int], defer: bool | None) -> None:
        """Delete what only the old version used, after a grace period (`defer`: leave it
        to _finish_cleanup; None: no version was live, nothing to wait for)."""
        if defer:
            # Also when there is nothing to delete: the next flip rewrites the config slot
            # packets may still be reading until a grace period has passed.
            names = {id(m): name for name, m in maps.items()}
            self._pending.append(_Pending(gen, [(names[id(m)], keys) for m, keys in cleanups], sweep))
            return
        if defer is not None:
            rcu_grace_period()
        for m, keys in cleanups:
            m.delete_many(keys)
        if sweep:
            sweep_rule_sets(maps, sweep)

    def _remember(self, gen: Generation, want: Version) -> None:
        """What the maps now hold for each cgroup id, as a hint for the next one-cgroup
        write (which verifies it against the entry's digest before trusting it)."""
        if want.cgroups is not None:
            self._written = (gen.path, dict(want.cgroups))

    def _finish_cleanup(self) -> None:
        """Delete what deferred writes left, after a grace period from now (which also
        covers every run that began before their flips). Under the instance lock."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rcu_grace_period()
        for p in pending:
            try:
                with open_maps(p.gen) as maps:
                    for name, keys in p.entries:
                        maps[name].delete_many(keys)
                    if p.sweep:
                        sweep_rule_sets(maps, p.sweep)
            except OSError:
                # The generation was replaced or removed meanwhile. Entries left under an
                # old tag are read by no version and the next write clears them.
                pass

    def finish_cleanup(self) -> None:
        """Run what update_exemptions(defer_cleanup=True) left (ksbpfd: once the reply is
        out, so the grace period is not on the request's path)."""
        if self._pending:
            with self._locked(create=False):
                self._finish_cleanup()

    def _retire(self, keep: int, cgroups: list[Path]) -> None:
        """Detach and unpin every generation but `keep`."""
        for a in self._attached(extra=cgroups):
            if a.generation != keep:
                detach(a.prog_id, a.kind, a.cgroup)
        for g in self._generations():
            if g.number != keep:
                shutil.rmtree(g.path, ignore_errors=True)

    # ------------------------------------------------------------------ runtime updates

    def _live(self) -> list[Generation]:
        gens = self._generations()
        if not gens:
            raise BpfError(f"instance {self.instance!r} has no loaded programs (apply a policy first)")
        return gens

    def _tunnel_ifindexes(self, patterns: tuple[str, ...]) -> list[int]:
        try:
            with netns(self.netns):
                links = socket.if_nameindex()
        except (OSError, KsbpfError) as e:
            raise BpfError(f"cannot list links in {self.netns or 'this netns'}: {e}") from None
        return sorted(i for i, name in links if interface_matches(name, patterns))

    def update_tunnel_ifindexes(self, policy: Policy | None = None,
                                ifindexes: Iterable[int] | None = None) -> tuple[int, ...]:
        """Point the tunnel map at the current tunnel links (call on netlink link events):
        `ifindexes` as given, or the links in the netns matching the policy's tunnel
        interfaces (the last applied policy when None). Returns the ifindexes set.
        The live version's tunnel bank changes in place: each packet looks up one
        ifindex, so it sees the link as a tunnel or not, never half of it."""
        if ifindexes is None:
            p = policy or self._policy
            if p is None:
                raise BpfError("update_tunnel_ifindexes needs a policy or explicit ifindexes")
            ifindexes = self._tunnel_ifindexes(p.tunnel.interfaces)
        wanted = frozenset(ifindexes)
        with self._locked(create=False):
            for g in self._live():
                try:
                    with open_maps(g) as maps:
                        live = active_config(maps["ks_active"], maps["ks_config"])
                        if live is not None:
                            write_tunnels(maps, tunnel_masks(maps), live[1].tunnel_bank, wanted)
                except OSError as e:
                    raise BpfError(f"updating tunnels of generation {g.number}: {e}") from None
        return tuple(sorted(wanted))

    def update_exemptions(self, policy: Policy, defer_cleanup: bool = False) -> dict[str, int | None]:
        """Re-resolve exempt and endpoint cgroups to ids (call when cgroups come and go,
        and after exemptions change at run time). A cgroup recreated under the same path
        gets a new id and keeps its exemption. Only exemptions and endpoint cgroups are
        taken from `policy`; any other change needs apply(). One cgroup's entry changed
        (`ksctl exempt` / `unexempt`) is replaced in place; more are written as a new
        version beside the live one: a packet sees the old exemptions or the new, never a
        mix (last_step says which). Returns path -> id (None: not there now).
        `defer_cleanup`: what only the old version used is deleted by finish_cleanup() (or
        the next write) after the grace period, not before returning."""
        plan = render(policy, sets=False)
        check_capacity(plan)
        self._index = None
        with self._locked(create=False):
            self._finish_cleanup()
            resolved = resolve_cgroups(plan)
            for g in self._live():
                try:
                    self.last_step = self._write(g, Version(cgroups=cgroup_wants(plan, resolved)), defer_cleanup)
                except OSError as e:
                    raise BpfError(f"updating exemptions of generation {g.number}: {e}") from None
        if self._policy is not None:
            self._policy = self._policy.with_exemptions(policy.exemptions)
        self._index = ExemptionIndex.build(policy.exemptions, plan.exemptions)
        return resolved

    def change_exemptions(self, before: Policy, after: Policy, defer_cleanup: bool = False) -> dict[str, int | None]:
        """update_exemptions(after) for a run-time change from `before` (what this layer
        wrote last), in O(changed): when exactly one exemption path differs and its cgroup
        is the only one whose entry changes, only that path is resolved, its live entry
        looked up and replaced in place (StepPath.ONE_CGROUP: its rules under a fresh rule set
        id, the old ones after a grace period, `defer_cleanup` as in update_exemptions).
        Otherwise, or when anything is uncertain (another writer came between, the live
        entry is not what `before` says, marks of other exemptions would move, ...), it is
        update_exemptions(after); last_fallback says why. So is the same policy again
        (re-exempting a recreated cgroup follows its new id). Returns path -> id of the
        paths it resolved (all of them when it fell back). A policy beyond capacity raises
        BpfError before anything changes, as update_exemptions does."""
        picked = select_change(before, after, self._index)
        if picked is None:
            # The same exemptions again: `ksctl exempt` of a recreated cgroup, to follow its
            # new id. Which path moved is unknown here, so all are resolved.
            picked = "nothing differs (all cgroups re-resolved)"
        if isinstance(picked, str):
            return self._fall_back(after, defer_cleanup, picked)
        check_counts(picked.cgroups, picked.ports, picked.nets)
        with self._locked(create=False):
            self._finish_cleanup()
            try:
                outcome = self._change_one(picked, after, defer_cleanup)
            except OSError as e:
                self._base = None
                raise BpfError(f"updating exemptions: {e}") from None
        if isinstance(outcome, str):
            return self._fall_back(after, defer_cleanup, outcome)
        self.last_fallback = ""
        self._changed(after, picked)
        return outcome

    def _fall_back(self, after: Policy, defer_cleanup: bool, why: str) -> dict[str, int | None]:
        resolved = self.update_exemptions(after, defer_cleanup)
        self.last_fallback = why
        return resolved

    def _changed(self, after: Policy, change: ExemptionChange) -> None:
        """The bookkeeping update_exemptions(after) would leave."""
        if self._policy is not None:
            self._policy = self._policy.with_exemptions(after.exemptions)
        if self._index is not None:
            self._index.apply(change, after.exemptions)

    def _change_one(self, c: ExemptionChange, after: Policy, defer: bool) -> dict[str, int | None] | str:
        """The in-place half of change_exemptions, under the lock; a string: why not."""
        gens = self._generations()
        if len(gens) != 1:
            return f"{len(gens)} generations"
        gen = gens[0]
        if self._base is None or self._base[0] != gen.path:
            return "no write of this layer to the live generation"
        with open_maps(gen) as maps:
            found = active_config(maps["ks_active"], maps["ks_config"])
            if found is None or found[1] != self._base[1]:
                return "the live version is not the one this layer wrote last"
            slot, live = found
            cid = resolve_paths([c.path])[c.path]
            if cid is None:
                return f"cgroup {c.path!r} is not there"
            endpoint = c.path in after.tunnel.endpoint_cgroups
            mark = endpoint_cgroup_mark(after)
            old_w = change_want(c.old_rules, endpoint, mark)
            new_w = change_want(c.new_rules, endpoint, mark)
            cgm = maps["ks_cgroups"]
            raw = cgm.lookup(cgroup_key(cid, live.cgroups_tag))
            if old_w is None and raw is not None:
                return f"cgroup id {cid} has an entry `before` does not explain (shared with another path?)"
            if old_w is not None and not old_w.written_as(raw):
                return f"the live entry of cgroup id {cid} is not what `before` says"
            resolved: dict[str, int | None] = {c.path: cid}
            if (new_w is None and raw is None) or (new_w is not None and new_w.written_as(raw)):
                self.last_step = None  # the same entry: nothing to write
                self._base = (gen.path, live)
                return resolved
            reserve = cgm.lookup(RESERVE_KEY)
            reserved = CgroupEntry.unpack(reserve).rules if reserve is not None else 0
            d = live.digests
            cfg = replace(live, version=live.version + 1,
                          digests=(d[0], d[1], d[2], cgroups_digest_changed(d[3], cid, old_w, new_w)))
            step = one_cgroup_step(cfg, max(live.next_rules, reserved), cid, new_w, raw)
            self._base = None
            cleanups, sweep = write_one_cgroup(maps, step, Version(cgroups={cid: new_w} if new_w else {}),
                                                Held(cgroups={cid: raw} if raw is not None else {}), MapsRead(), slot,
                                                old_w)
            self.last_step = step
            self._base = (gen.path, step.config)
            if self._written is not None and self._written[0] == gen.path:
                if new_w is None:
                    self._written[1].pop(cid, None)
                else:
                    self._written[1][cid] = new_w
            if cleanups or sweep:
                self._clean_after(gen, maps, cleanups, sweep, defer)
        return resolved

    # ------------------------------------------------------------------ drift, status, reset

    def ensure_attached(self) -> list[str]:
        """Re-attach the pinned generation where someone detached it (no compile needed).
        Returns what was repaired, e.g. ["egress"]."""
        with self._locked(create=False):
            gens = self._generations()
            if not gens:
                raise BpfError(f"instance {self.instance!r} has nothing pinned to re-attach; apply instead")
            gen = gens[-1]
            cfg = gen.config()
            target = self._cgroup_by_id(cfg.cgroup_id, self._candidate_cgroups()) if cfg else None
            if target is None:
                raise BpfError(f"the cgroup generation {gen.number} was attached to is gone; apply instead")
            return reattach(gen, target, self._attached(extra=[target]))

    def engaged(self) -> bool:
        """Is the newest generation live (a config) and both its programs attached to its
        cgroup? A few syscalls, for the run-time exemption path; status() says more."""
        gens = self._generations()
        if not gens:
            return False
        gen = gens[-1]
        cfg = gen.config()
        if cfg is None:
            return False
        target = self._cgroup_by_id(cfg.cgroup_id, self._policy_cgroups())
        if target is None:
            return False
        try:
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            for kind, atype in ATTACH_TYPES.items():
                pid = gen.prog_id(kind)
                if pid is None or pid not in prog_query(fd, atype):
                    return False
        except OSError:
            return False
        finally:
            os.close(fd)
        return True

    def status(self) -> LayerStatus:
        """(engaged, detail): engaged means bpffs mounted, exactly one pinned generation and
        both its programs attached. Programs of this instance attached without pins (gone,
        or in a bpffs another mount namespace had) are found by asking the kernel."""
        mounted = bpffs_mounted()
        gens = self._generations() if mounted else []
        try:
            attached = self._attached()
        except BpfError as e:
            return LayerStatus(False, str(e))
        if not gens:
            unmounted = "" if mounted else f"bpffs is not mounted at {BPFFS} ({bpffs.what_is_there(BPFFS)})"
            try:
                orphans = attached or self.attached_anywhere(self._policy_cgroups())
            except OSError as e:
                why = f"cannot ask the kernel: {os_reason(e)}"
                return LayerStatus(False, "; ".join(filter(None, (unmounted, why))))
            if orphans:
                return LayerStatus(False, f"attached without pins: {describe_attached(orphans)} (still judging "
                                          f"packets; no pins under {self.dir}{': ' + unmounted if unmounted else ''}; "
                                          f"`ksctl down` detaches them, `ksctl up` replaces them)")
            return LayerStatus(False, unmounted or "not loaded")
        gen = gens[-1]
        cfg = gen.config()
        mine = [a for a in attached if a.generation == gen.number]
        others = sorted({a.generation for a in attached if a.generation != gen.number})
        kinds = {a.kind for a in mine}
        where = str(mine[0].cgroup) if mine else (f"cgroup id {cfg.cgroup_id}" if cfg else "?")
        detail = f"generation {gen.number} on {where}"
        if cfg:
            detail += f", version {cfg.version}, netns cookie {cfg.netns_cookie}"
            try:
                with open_maps(gen) as maps:
                    tunnels = sorted(tunnels_of(tunnel_masks(maps), cfg.tunnel_bank))
                    ncg = sum(1 for k in maps["ks_cgroups"].keys()
                              if struct.unpack(CGROUP_KEY_FMT, k)[1] == cfg.cgroups_tag)
                detail += f", tunnel ifindexes {tunnels or 'none (blocking all)'}, {ncg} exempt/endpoint cgroups"
            except OSError:
                pass
        missing = [k for k in PROGS if k not in kinds]
        if missing:
            return LayerStatus(False, f"{detail}: {', '.join(missing)} not attached (detached behind our back?)")
        if others or len(gens) > 1:
            present = others or [g.number for g in gens[:-1]]
            return LayerStatus(False, f"{detail}: other generations still present {present}")
        return LayerStatus(True, detail)

    def counters(self) -> list[tuple[str, int, int, int]]:
        """(reason, cgroup id, packets, bytes) of this instance's drop counters (read_counters)."""
        return read_counters(self.dir)

    def events_lost(self) -> int:
        """Drop events this instance's ring buffer had no room for (read_events_lost)."""
        return read_events_lost(self.dir)

    def events_detail(self) -> str:
        """Which layers' drops become events: "bpf+nftables", or why nftables' do not."""
        gens = self._generations()
        if not gens:
            return "not loaded"
        if (gens[-1].path / NFT_EVENTS_LINK).exists():
            return "bpf+nftables"
        why = self.last_apply.load.nft_events if self.last_apply is not None else ""
        if not why:
            why = nft_events_build()[1] or "the kfree_skb program is not attached"
        return f"bpf only ({why})"

    def reset(self, cgroup: str | None = None) -> None:
        """Detach every program of this instance and unpin everything it made (counters
        included). The pins are one way to find the programs; the kernel is asked too, so
        programs whose pins are gone (or were in a bpffs private to another mount namespace)
        are found on their cgroup and detached. `cgroup` names one more place to look
        first. BpfError names what is still attached afterwards."""
        extra = []
        if cgroup is not None:
            try:
                extra.append(cgroup_dir(cgroup))
            except KsbpfError:
                pass
        self._base, self._index = None, None
        self._pending = []  # the maps go with their generations
        if not self.dir.exists() and not bpf_usable():
            return  # bpf(2) is refused here: nothing of ksbpf was attached from here, nothing can be looked for
        with self._locked_if_present():
            for a in self._attached(extra=extra):
                detach(a.prog_id, a.kind, a.cgroup)
            if self.dir.exists():
                shutil.rmtree(self.dir, ignore_errors=True)
        self._policy = None
        try:
            for a in self.attached_anywhere(extra, everywhere=True):
                detach(a.prog_id, a.kind, a.cgroup)
            left = self.attached_anywhere(extra, everywhere=True)
        except OSError as e:
            raise BpfError(f"cannot ask the kernel for the programs of {self.instance!r}: {os_reason(e)}") from None
        if left:
            raise BpfError(f"still attached after detaching: {describe_attached(left)} (attached by something "
                           f"ksbpf cannot detach, e.g. a bpf_link another process holds)")

    @contextmanager
    def _locked_if_present(self) -> Iterator[None]:
        """The instance lock when the pin directory exists; nothing to lock otherwise
        (and nothing is created: /sys/fs/bpf may not even be a bpffs)."""
        with ExitStack() as stack:
            if self.dir.exists():
                try:
                    stack.enter_context(self._locked(create=False))
                except BpfError:
                    pass  # removed meanwhile
            yield


    def attached_anywhere(self, first: Iterable[Path] = (), everywhere: bool = False) -> list[Attached]:
        """Where this instance's programs are attached, by asking the kernel, not the pins
        (ksbpf.linux.bpf.attach.attached_anywhere)."""
        return attached_anywhere(self.instance, first, everywhere)


_conforms: type[Layer] = BpfLayer  # mypy fails here when BpfLayer drifts from the Layer Protocol
