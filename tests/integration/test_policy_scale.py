"""PolicyParser at scale, against loads_policy: the benchmark's policy of 10,000 exemptions
and its edits, and the random edit sequences of the seeds the unit stage leaves out (it runs
seeds 0 and 1 of the same function, tests/unit/test_policy_cache.py)."""

from __future__ import annotations

import pytest

from bench.policies import policy_text
from ksbpf.policy import PolicyParser
from tests.unit.test_policy_cache import check, randomized_against_loads_policy


def test_bench_policy_10k_and_edits() -> None:
    text = policy_text("kbtun0", "10.0.0.53", "ksbpf-bench-x", 10000)
    parser = PolicyParser()
    # loads_policy(text) once: at 10,000 exemptions it is most of this test's time.
    full = check(parser, text)
    assert full[0] == "ok"
    assert check(parser, text, want=full)[0] == "ok"  # unchanged: all from the cache
    one_endpoint = text.replace("198.18.0.5:51820/udp", "198.18.200.5:51820/udp", 1)
    one_exemption = text.replace('to = ["100.64.0.8/32"]', 'to = ["100.64.1.8/32"]', 1)
    assert one_endpoint != text and one_exemption != text
    for edited in (one_endpoint, one_exemption, text):
        assert check(parser, edited, want=full if edited == text else None)[0] == "ok"
    # A bad exemption in the middle: the full path's error and index.
    bad = text.replace('to = ["100.64.0.8/32"]', 'to = ["100.64.0.8/24"]', 1)
    err = check(parser, bad)
    assert err[0] == "error" and err[3] == "exempt[7].to[0]"
    assert check(parser, text, want=full)[0] == "ok"


@pytest.mark.parametrize("seed", range(2, 8))
def test_randomized_against_loads_policy(seed: int) -> None:
    randomized_against_loads_policy(seed)
