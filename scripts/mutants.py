"""Mutation check: the test suite must fail when the science is wrong.

Each mutant in tests/mutants.yaml is a deliberate bug (a DPO margin with the wrong sign, a flat
learning-rate schedule, a resume that forgets the optimizer state, ...): an exact piece of code in
one source file and what replaces it, plus the tests that must catch it. For every mutant this script
copies `src/` to a scratch directory, applies that one change, and runs those tests against the
scratch copy (PYTHONPATH puts it before the installed package). A mutant is `killed` when its tests
fail, `SURVIVED` when they pass; the check exits non-zero if any survives, or if a mutant no longer
applies (its code changed: update the list) or breaks the import instead of a test.

A short script rather than mutmut or cosmic-ray: those generate thousands of syntactic mutants
(operators, constants) and run the whole suite on each, hours on a 2-core CPU; the bugs that matter
here are semantic (which model is the reference, which tokens count in a loss), written by hand, and
each names the few tests that hold that behaviour, so the whole check runs in minutes.

    python scripts/mutants.py [--only ID ...] [--jobs N] [--list tests/mutants.yaml]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def load(path: Path) -> list[dict]:
    mutants = yaml.safe_load(path.read_text())["mutants"]
    ids = [m["id"] for m in mutants]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{path}: duplicate mutant ids")
    for m in mutants:
        missing = {"id", "what", "file", "find", "replace", "tests"} - set(m)
        if missing:
            raise SystemExit(f"{path}: mutant {m.get('id')} lacks {', '.join(sorted(missing))}")
    return mutants


def pytest_cmd(tests: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]


def env_for(src: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(src), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env.setdefault("OMP_NUM_THREADS", "1")  # two mutants at a time on two cores
    return env


def run_mutant(m: dict, scratch_root: Path, timeout: int) -> tuple[str, str, float]:
    """(outcome, detail, seconds): outcome in killed / SURVIVED / error."""
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f"{m['id']}-", dir=scratch_root))
    src = work / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    target = src / m["file"]
    text = target.read_text()
    count = text.count(m["find"])
    if count != 1:
        return "error", f"`find` occurs {count} times in src/{m['file']} (the code changed: update the mutant)", 0.0
    target.write_text(text.replace(m["find"], m["replace"]))
    env = env_for(src)
    where = subprocess.run([sys.executable, "-c", "import sftdpo; print(sftdpo.__file__)"], env=env, cwd=ROOT,
                           capture_output=True, text=True)
    if not where.stdout.strip().startswith(str(src)):
        return "error", f"the mutated copy does not import ({(where.stderr.strip().splitlines() or ['?'])[-1]})", 0.0
    try:
        proc = subprocess.run(pytest_cmd(m["tests"]), env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "error", f"tests ran past {timeout} s", time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dt = time.perf_counter() - t0
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    if proc.returncode == 1:  # tests ran and failed
        failed = next((ln for ln in lines if ln.startswith("FAILED")), lines[-1] if lines else "")
        return "killed", failed.removeprefix("FAILED ")[:150], dt
    if proc.returncode == 0:
        return "SURVIVED", lines[-1] if lines else "", dt
    return "error", f"pytest exit {proc.returncode}: {lines[-1] if lines else ''}"[:200], dt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--list", default=str(ROOT / "tests" / "mutants.yaml"))
    p.add_argument("--only", nargs="*", default=[], help="mutant ids to run (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2: one per core)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per mutant")
    ns = p.parse_args(argv)
    mutants = load(Path(ns.list))
    if ns.only:
        unknown = set(ns.only) - {m["id"] for m in mutants}
        if unknown:
            raise SystemExit(f"unknown mutant id(s): {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m["id"] in ns.only]
    t0 = time.perf_counter()
    # the unmutated code must pass every test the mutants use, or "killed" means nothing
    tests = sorted({t for m in mutants for t in m["tests"]})
    base = subprocess.run(pytest_cmd(tests), env=env_for(ROOT / "src"), cwd=ROOT, capture_output=True, text=True)
    if base.returncode != 0:
        print((base.stdout + base.stderr)[-3000:])
        print(f"mutants: the unmutated code fails the mutants' tests (exit {base.returncode}); fix that first")
        return 2
    print(f"mutants: {len(mutants)} from {ns.list}; baseline passes {len(tests)} test selections "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    with tempfile.TemporaryDirectory(prefix="sftdpo-mutants-") as scratch, ThreadPoolExecutor(ns.jobs) as pool:
        futures = [(m, pool.submit(run_mutant, m, Path(scratch), ns.timeout)) for m in mutants]
        outcomes = []
        for m, fut in futures:
            outcome, detail, dt = fut.result()
            outcomes.append(outcome)
            print(f"{outcome:8s} {m['id']:34s} {dt:5.0f} s  {m['what']}" + (f"  [{detail}]" if outcome != "killed" else ""),
                  flush=True)
    bad = sum(o != "killed" for o in outcomes)
    print(f"mutants: {len(outcomes) - bad} of {len(outcomes)} killed in {time.perf_counter() - t0:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
