"""scripts/mutate.py: its equivalence rules (what they excuse must change no number) and its harness.

A rule that matched too much would hide real survivors in docs/mutation.md; each case below is a
mutant mutmut makes of a line of src/sftdpo."""

import importlib.util
import json
import os
import subprocess
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


def _budget_setup(mutate, tmp_path, monkeypatch, cur, saved, killed=""):
    stats, full = tmp_path / "mutmut-stats.json", tmp_path / "sftdpo-test-map.json"
    dur = {"t_fast": 1.0, "t_mid": 20.0, "t_slow": 40.0, "t_named": 50.0}
    stats.write_text(json.dumps({"duration_by_test": dur, "tests_by_mangled_function_name": cur}))
    if saved is not None:
        full.write_text(json.dumps(saved))
    (tmp_path / "killed.yaml").write_text(killed or "killed: []\n")
    monkeypatch.setattr(mutate, "STATS", stats)
    monkeypatch.setattr(mutate, "FULL_MAP", full)
    monkeypatch.setattr(mutate, "KILLED", tmp_path / "killed.yaml")
    return stats, full


def test_the_budget_cut_never_loses_the_saved_map(mutate, tmp_path, monkeypatch):
    """mutmut emptied its own test map once (print-time-estimates): the cut must restore each function
    from the saved full map, or every mutant would be reported as reached by no test."""
    tests = ["t_fast", "t_mid", "t_slow"]
    stats, full = _budget_setup(mutate, tmp_path, monkeypatch, cur={}, saved={"pkg.mod.x_f": tests})
    mutate.apply_budget(30.0)
    assert json.loads(full.read_text()) == {"pkg.mod.x_f": tests}
    assert json.loads(stats.read_text())["tests_by_mangled_function_name"] == {"pkg.mod.x_f": ["t_fast", "t_mid"]}


def test_a_test_named_in_the_killed_list_runs_past_the_budget(mutate, tmp_path, monkeypatch):
    """A test that tests/mutation-killed.yaml names for a function always runs for its mutants, however
    slow; the others are cut fastest first."""
    killed = "killed:\n  - where: pkg.mod:C.m\n    line: a\n    mutant: b\n    test: t_named\n"
    stats, _ = _budget_setup(mutate, tmp_path, monkeypatch, killed=killed, saved=None,
                             cur={"pkg.mod.xǁCǁm": ["t_fast", "t_mid", "t_slow", "t_named"], "pkg.mod.x_g": ["t_slow", "t_named"]})
    mutate.apply_budget(30.0)
    cut = json.loads(stats.read_text())["tests_by_mangled_function_name"]
    assert cut == {"pkg.mod.xǁCǁm": ["t_fast", "t_mid", "t_named"], "pkg.mod.x_g": ["t_slow"]}


@pytest.fixture
def store(mutate, tmp_path, monkeypatch):
    """scripts/mutate.py pointed at a scratch checkout: its mutants/ and its docs/."""
    mutants = tmp_path / "mutants"
    (mutants / "src").mkdir(parents=True)
    (tmp_path / "docs").mkdir()
    for name, value in dict(ROOT=tmp_path, MUTANTS=mutants, RUNS=mutants / "sftdpo-runs.json",
                            STATS=mutants / "mutmut-stats.json", FULL_MAP=mutants / "sftdpo-test-map.json",
                            VERDICTS=tmp_path / "docs" / "mutation-verdicts.json",
                            TEST_MAP=tmp_path / "docs" / "mutation-test-map.json").items():
        monkeypatch.setattr(mutate, name, value)
    return mutate


def test_verdicts_outlive_mutants_dir_but_not_a_changed_function(store):
    """mutants/ is lost with a fresh clone: the verdicts saved in git must come back, but only for
    functions whose text is unchanged (mutmut's hash), and never over a verdict mutants/ already holds.
    Catches a restore that keeps a changed function's old `killed` (a stale pass) or loses verdicts."""
    mutate = store
    meta = mutate.MUTANTS / "src" / "pkg" / "mod.py.meta"
    meta.parent.mkdir(parents=True)

    def write(codes, hashes):
        meta.write_text(json.dumps({"exit_code_by_key": codes, "hash_by_function_name": hashes,
                                    "durations_by_key": {k: 1.5 for k, c in codes.items() if c is not None},
                                    "type_check_error_by_key": {}, "estimated_durations_by_key": {}}))
    names = ["pkg.mod.x_f__mutmut_1", "pkg.mod.x_f__mutmut_2", "pkg.mod.x_g__mutmut_1", "pkg.mod.x_f__mutmut_3"]
    write(dict(zip(names, [1, 0, 1, None])), {"x_f": "h1", "x_g": "h2"})
    mutate.RUNS.write_text(json.dumps([{"date": "2026-12-07", "mutants": 3}]))
    mutate.save_verdicts()

    mutate.RUNS.unlink()  # a fresh clone: mutmut generates the mutants again, every verdict unknown; g was edited
    write(dict(zip(names, [None, 1, None, None])), {"x_f": "h1", "x_g": "h2-edited"})
    assert mutate.restore_verdicts() == 1
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    assert codes == dict(zip(names, [1, 1, None, None]))
    assert json.loads(mutate.RUNS.read_text()) == [{"date": "2026-12-07", "mutants": 3}]


def test_the_test_map_outlives_mutants_dir_whole(store):
    """The saved test map must come back as collected: the full map (not the budget's cut), each
    function with its own tests, and every test's time (apply_budget drops a test without one)."""
    mutate = store
    full = {"pkg.mod.x_f": ["tests/a.py::t1", "tests/b.py::t2"], "pkg.mod.xǁCǁm": ["tests/b.py::t2", "tests/c.py::t3"]}
    stats = {"tests_by_mangled_function_name": {"pkg.mod.x_f": ["tests/a.py::t1"], "pkg.mod.xǁCǁm": ["tests/c.py::t3"]},
             "duration_by_test": {"tests/a.py::t1": 0.5, "tests/b.py::t2": 40.25, "tests/c.py::t3": 2.0},
             "stats_time": 12.5, "function_hashes": {"pkg.mod.x_f": "h1"}, "function_dependencies": {},
             "config_fingerprint": {"a": 1}, "watched_file_hashes": {}, "git_commit": "abc"}
    mutate.STATS.write_text(json.dumps(stats))
    mutate.FULL_MAP.write_text(json.dumps(full))
    mutate.save_verdicts()
    assert not mutate.restore_test_map()  # mutants/ has its own: left alone
    mutate.STATS.unlink()
    mutate.FULL_MAP.unlink()
    assert mutate.restore_test_map()
    assert json.loads(mutate.FULL_MAP.read_text()) == full
    assert json.loads(mutate.STATS.read_text()) == {**stats, "tests_by_mangled_function_name": full}


FORK_AFTER_A_STUDY = """
import multiprocessing, os, sys
if __name__ == "__main__":
    ctx = multiprocessing.get_context("forkserver")
    p = ctx.Process(target=print); p.start(); p.join()   # the warm process starts a fork server (a study did)
    pid = os.fork()
    if pid == 0:  # what mutmut does per mutant: fork, run the tests, one of which starts a study's run
        try:
            q = ctx.Process(target=print); q.start(); q.join()
            os._exit(q.exitcode)
        except BaseException as e:
            print(type(e).__name__, e, file=sys.stderr); os._exit(3)
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_a_forked_test_process_starts_its_own_fork_server(mutate, tmp_path):
    """mutmut forks each mutant's test process from a warm one. Without mutants/src/sitecustomize.py's
    at-fork reset, a fork server started in the warm process made every forked study test raise
    ChildProcessError, so mutmut counted equivalent mutants killed (20 of stats.py's, measured): this
    catches a SITECUSTOMIZE that loses the reset or resets the wrong fields. The first run, without it,
    shows the failure is real on this Python."""
    site = tmp_path / "site"
    site.mkdir()
    script = tmp_path / "fork_after_a_study.py"
    script.write_text(FORK_AFTER_A_STUDY)

    def run() -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MUTANT_UNDER_TEST")}
        return subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**env, "PYTHONPATH": str(site)})
    without = run()
    assert without.returncode == 3 and "ChildProcessError" in without.stderr, without.stderr
    (site / "sitecustomize.py").write_text(mutate.SITECUSTOMIZE)
    with_reset = run()
    assert with_reset.returncode == 0, with_reset.stderr
