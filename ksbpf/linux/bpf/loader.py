"""The loader child (`python -m ksbpf.linux.bpf.loader`): BCC compiles bpf/killswitch.c,
loads and pins it, then exits. BCC is imported only in that child. Also what a build
depends on (cflags, build_digest)."""

from __future__ import annotations

import ctypes
import hashlib
import importlib.resources
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ksbpf
from ksbpf.errors import BpfError
from ksbpf.linux import btf, headers
from ksbpf.linux.bpf.kernel import ATTACH_EGRESS, ATTACH_SOCK_CREATE, load_tracing
from ksbpf.linux.bpf.layout import (
    DROPS_PIN,
    EVENTS_BYTES,
    EVENTS_FLUSH_PIN,
    EVENTS_FLUSH_PROG,
    EVENTS_LOST_PIN,
    EVENTS_PER_SEC,
    EVENTS_PIN,
    EVENTS_RATE_KEYS,
    EVENTS_RATE_PIN,
    GEN_MAPS,
    MAX_CGROUP_DEPTH,
    MAX_DROP_KEYS,
    NFT_EVENTS_LINK,
    NFT_EVENTS_PROG,
    OWNERS_PIN,
    PROGS,
    REASON_NUMBERS,
    SOURCE,
)
from ksbpf.linux.libbpf import obj_pin, raw_tracepoint_open
from ksbpf.render.bpf import Capacity
from ksbpf.verdict import DROP_REASONS


def check_events_bytes(n: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    if n < page or n & (n - 1) or n > 1 << 30:
        raise BpfError(f"event ring buffer size {n}: a power of two from the page size ({page}) to 1 GiB")
    return n


def cflags(netns_mode: str, pin_dir: Path | None, capacity: Capacity | None = None,
           events_bytes: int = EVENTS_BYTES, nft_events: btf.KfreeSkb | None = None,
           task_helpers: bool = True) -> list[str]:
    """Constants for the C source. Policy never goes here: it goes into maps.
    `nft_events`: how to build the kfree_skb program for this kernel (None: not built);
    `task_helpers`: probe_sock_task_helpers()."""
    flags = [f"-DKS_R_{r.value.upper()}={REASON_NUMBERS[r]}" for r in DROP_REASONS]
    flags += [f"-DKS_MAX_DEPTH={MAX_CGROUP_DEPTH}", f"-DKS_MAX_DROP_KEYS={MAX_DROP_KEYS}"]
    flags += (capacity or Capacity()).cflags()
    flags += [f"-DKS_EVENTS_BYTES={check_events_bytes(events_bytes)}", f"-DKS_EVENTS_PER_SEC={EVENTS_PER_SEC}",
              f"-DKS_EVENTS_RATE_KEYS={EVENTS_RATE_KEYS}"]
    if nft_events is not None:
        flags += nft_events.cflags()
    if not task_helpers:
        flags.append("-DKS_NO_TASK_HELPERS")
    if netns_mode == "sk_storage":
        flags.append("-DKS_NETNS_SK_STORAGE")
    if pin_dir is not None:
        flags.append(f'-DKS_DROPS_PIN="{pin_dir / DROPS_PIN}"')
        flags.append(f'-DKS_OWNERS_PIN="{pin_dir / OWNERS_PIN}"')
        flags.append(f'-DKS_EVENTS_PIN="{pin_dir / EVENTS_PIN}"')
        flags.append(f'-DKS_EVENTS_LOST_PIN="{pin_dir / EVENTS_LOST_PIN}"')
        flags.append(f'-DKS_EVENTS_RATE_PIN="{pin_dir / EVENTS_RATE_PIN}"')
    return flags


def nft_events_build() -> tuple[btf.KfreeSkb | None, str]:
    """(how to build the nftables drop-event program here, or None and why not)."""
    info = btf.running_kfree_skb()
    return (info, "") if isinstance(info, btf.KfreeSkb) else (None, info)


def build_digest(source_dir: Path, flags: list[str], source: headers.KernelSource, netns_mode: str) -> bytes:
    """What a build of the programs depends on, as 32 bytes: equal digests, equal programs."""
    h = hashlib.sha256()
    for path in sorted(p for p in source_dir.iterdir() if p.suffix in (".c", ".h")):
        data = path.read_bytes()
        h.update(f"{path.name}\0{len(data)}\0".encode())
        h.update(data)
    h.update(json.dumps([flags, str(source.path), source.release, source.env, netns_mode, ksbpf.__version__]).encode())
    return h.digest()


@dataclass(frozen=True)
class LoadStats:
    compile_s: float  # clang + LLVM in BCC
    load_s: float  # the verifier, both programs
    loader_s: float  # the whole child, python start and bcc import included
    peak_rss_kb: int  # the child's VmHWM
    netns_mode: str
    # Why the nftables drop-event program (ks_kfree_skb) is not attached ("" : it is).
    nft_events: str = ""

    @classmethod
    def nothing(cls, netns_mode: str) -> LoadStats:
        """An apply that reused the live generation: no loader ran."""
        return cls(0.0, 0.0, 0.0, 0, netns_mode)


def _source_dir() -> Path:
    # Editable and wheel installs both give a real directory; zipped installs are unsupported.
    return Path(str(importlib.resources.files("ksbpf.bpf")))


def _run_loader(source: headers.KernelSource, netns_mode: str, flags: list[str], gen_dir: Path | None,
                nft: btf.KfreeSkb | None = None, nft_why: str = "") -> LoadStats:
    request = {
        "source_dir": str(_source_dir()),
        "cflags": flags,
        "gen_dir": str(gen_dir) if gen_dir else None,
        "nft_btf_id": nft.btf_id if nft is not None else None,
    }
    env = {k: v for k, v in os.environ.items() if k != headers.ENV_VAR}
    env.update(source.env)
    pkg_parent = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_parent, env.get("PYTHONPATH", "")) if p)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "ksbpf.linux.bpf.loader"],
            input=json.dumps(request), capture_output=True, text=True, timeout=300, env=env,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise BpfError(f"BPF loader process failed: {e}") from None
    wall = time.monotonic() - t0
    try:
        reply = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        reply = {}
    if proc.returncode != 0 or "error" in reply or not reply:
        raise BpfError(_loader_failure(reply.get("error", f"loader exited with {proc.returncode}"),
                                       proc.stderr, source))
    return LoadStats(reply["compile_s"], reply["load_s"], wall, reply["peak_rss_kb"], netns_mode,
                     reply.get("nft_events", "") if nft is not None else nft_why)


def _loader_failure(error: str, stderr: str, source: headers.KernelSource) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if any("Unable to find kernel headers" in ln for ln in lines):
        return (f"BCC found no usable kernel headers at {source.describe()}: run `ksctl doctor --prepare-headers "
                f"{headers.DEFAULT_HEADERS_DIR}` or set [bpf] kernel_source")
    errors = [ln for ln in lines if "error:" in ln]
    detail = "; ".join(errors[:3]) if errors else " / ".join(lines[-6:])
    return f"{error} (headers: {source.describe()}){': ' + detail if detail else ''}"


def _loader_main() -> int:
    """The child: compile, load, pin into gen_dir; one JSON line on stdout."""
    request = json.loads(sys.stdin.read())
    try:
        from bcc import BPF
    except ImportError as e:
        print(json.dumps({"error": f"python3-bpfcc (bcc) is not importable: {e}"}))
        return 1
    src = Path(request["source_dir"])
    t0 = time.monotonic()
    try:
        b = BPF(text=(src / SOURCE).read_text(), cflags=[f"-I{src}", "-Wno-unused-function", *request["cflags"]])
    except Exception as e:  # BCC raises bare Exception; stderr has the compiler's words
        print(json.dumps({"error": f"compiling {SOURCE} failed: {e}"}))
        return 1
    t1 = time.monotonic()
    fns = {}
    try:
        fns["egress"] = b.load_func(PROGS["egress"], BPF.CGROUP_SKB, attach_type=ATTACH_EGRESS)
        fns["sock_create"] = b.load_func(PROGS["sock_create"], BPF.CGROUP_SOCK, attach_type=ATTACH_SOCK_CREATE)
        flush = b.load_func(EVENTS_FLUSH_PROG, BPF.CGROUP_SKB, attach_type=ATTACH_EGRESS)
    except Exception as e:  # BCC raises bare Exception; stderr has the verifier log
        print(json.dumps({"error": f"the kernel refused the program: {e}"}))
        return 1
    from bcc import lib

    # The drop-event program is an observer: the kill switch is enforced without it, so a
    # kernel that refuses it costs the events of the nftables layer, never the generation.
    nft_events, nft_fd = "", -1
    if request.get("nft_btf_id") is not None:
        fn_name = NFT_EVENTS_PROG.encode()
        try:
            insns = ctypes.string_at(lib.bpf_function_start(b.module, fn_name), lib.bpf_function_size(b.module, fn_name))
            nft_fd = load_tracing(insns, NFT_EVENTS_PROG, request["nft_btf_id"])
        except OSError as e:
            nft_events = f"the kernel refused {NFT_EVENTS_PROG}: {e.strerror}"
    t2 = time.monotonic()

    gen_dir = request["gen_dir"]
    if gen_dir:
        try:
            os.mkdir(gen_dir)
            for name in GEN_MAPS:
                obj_pin(lib.bpf_table_fd(b.module, name.encode()), Path(gen_dir) / name)
            for kind, fn in fns.items():
                obj_pin(fn.fd, Path(gen_dir) / kind)
            obj_pin(flush.fd, Path(gen_dir) / EVENTS_FLUSH_PIN)
        except OSError as e:
            print(json.dumps({"error": f"pinning under {gen_dir} failed: {e}"}))
            return 1
        if nft_fd >= 0:
            # Attached before the generation is filled: it reads the generation's zeroed
            # config (netns cookie 0) until then and reports nothing.
            try:
                obj_pin(raw_tracepoint_open(nft_fd), Path(gen_dir) / NFT_EVENTS_LINK)
            except OSError as e:
                nft_events = f"attaching {NFT_EVENTS_PROG} to kfree_skb failed: {e.strerror}"
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"compile_s": t1 - t0, "load_s": t2 - t1, "peak_rss_kb": peak, "nft_events": nft_events}))
    return 0


if __name__ == "__main__":
    sys.exit(_loader_main())
