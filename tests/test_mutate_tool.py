"""scripts/mutate.py's equivalence rules: what they excuse must change no number.

A rule that matched too much would hide real survivors in docs/mutation.md; each case below is a
mutant mutmut makes of a line of src/sftdpo."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mutate():
    spec = importlib.util.spec_from_file_location("sftdpo_mutate_script", ROOT / "scripts" / "mutate.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("line,mutant,excused", [
    ("one = torch.ones((), device=rows.device)", "one = torch.ones((), device=None)", True),
    ("one = torch.ones((), device=rows.device)", "one = torch.ones((), )", True),
    ("m = torch.where(p < n.to(rows.device)[rows], one, one * a)", "m = torch.where(p < n.to(None)[rows], one, one * a)", True),
    ("p = torch.arange(rows.numel(), device=rows.device) - s[rows]", "p = torch.arange(rows.numel(), ) - s[rows]", True),
    # not placement: a dtype, a value, an operator, a .to() of a dtype
    ("x = torch.zeros(n, dtype=lp.dtype, device=lp.device)", "x = torch.zeros(n, dtype=None, device=lp.device)", False),
    ("x = y.to(dtype)", "x = y.to(None)", False),
    ("x = torch.zeros(n, device=lp.device)", "x = torch.ones(n, device=lp.device)", False),
    ("x = a.to(b.device) - c", "x = a.to(None) + c", False),
])
def test_the_device_rule_excuses_placement_only(mutate, line, mutant, excused):
    """Catches a device rule that excuses a changed dtype, value or operator on the same line."""
    assert mutate._device_only(line, mutant) is excused


@pytest.mark.parametrize("line,mutant,excused", [
    ('log.info("step %d", step)', 'log.info("XXstep %dXX", step)', True),
    ('log.info("step %d", step)', 'log.info("step %d", step + 1)', False),
])
def test_the_message_rule_excuses_text_only(mutate, line, mutant, excused):
    assert mutate._text_only(line, mutant) is excused
