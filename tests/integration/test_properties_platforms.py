"""Property test (hypothesis): a generated policy's PF and Windows renderings agree with
verdict() (what `ksctl explain` prints) packet by packet, as the fixed cases in
test_adapters_agree do. The generators are the unit suite's (tests/unit/test_properties.py)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings

from tests.integration.test_adapters_agree import compare, render
from tests.unit.adapter_world import Case
from tests.unit.test_properties import _parse, policy_texts

# ------------------------------------------------------------------ the renderers agree with explain


@pytest.mark.parametrize("platform", ["macos", "windows"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=policy_texts())
def test_generated_policies_render_rules_that_agree_with_explain(platform: str, text: str) -> None:
    import hashlib

    from tests.integration import test_adapters_agree as agree

    policy = _parse(text)
    case = Case("generated-" + hashlib.sha256(text.encode()).hexdigest()[:16], policy)
    agree.CASES[case.name] = case  # the comparison looks cases up by name
    try:
        rendered = render(case, platform)
    except ValueError:
        assume(False)  # a value the platform's syntax cannot carry: refused by name, tested elsewhere
    out = compare(case, platform, rendered)
    assert not [k for k in out.excluded if k.startswith("UNLISTED")], (out.excluded, text)
    assert not out.mismatches, f"{len(out.mismatches)} disagreements for\n{text}\n" + "\n".join(out.mismatches[:5])
    assert out.compared > 0
