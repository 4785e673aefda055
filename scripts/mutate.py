"""Mutation testing of the number path by mutmut 3 (`make mutate`), and docs/mutation.md from its results.

mutmut generates syntactic mutants (operators, constants, arguments, strings) of every function in the
modules of `[tool.mutmut] only_mutate` (pyproject.toml), records once which tests reach which function
(trampolines, in-process), and runs for each mutant only those tests, in processes forked from a warm
pytest. Its verdicts are cached under mutants/ (not in git); a function whose text changed gets its
mutants re-run, so a second run does only what changed. This script adds what mutmut lacks here:

- PYTHONPATH points at mutants/src, so tests that start `python -m sftdpo.cli`, the study's forked or
  spawned run processes and torchrun children import the mutated code (the active mutant travels in
  the MUTANT_UNDER_TEST variable they inherit); mutants/src is created before Python starts, or the
  import system caches the missing folder and the tests silently import the unmutated package.
- mutmut copies src/ into mutants/src once and never again for files it does not mutate (config.py,
  study/, the spec YAML files...): tests would run new mutated modules against stale copies of the
  rest. Every run first brings those files up to date (sync_unmutated).
- Scope below file level: of peft_methods.py only the PEFT set-up (SCOPE) is run; other functions' mutants
  are reported as out of scope, not run.
- Survivors are re-run when tests/ changed since the last run (mutmut keeps a survivor's verdict
  until its function changes, so a new test would otherwise never count), and the test map is
  collected again when a function changed or appeared (mutmut would leave it with no tests).
- Every survivor must be explained: killed by a named test (tests/mutation-killed.yaml, checked: the
  mutant's verdict must be `killed`) or equivalent, one line why (tests/mutation-equivalent.yaml, or a
  RULE below). Entries are keyed by module, function, the original line and the mutated line (mutmut's
  numbering moves when code moves); entries that match no mutant any more are reported as stale.
- mutants/ is not in git, so a fresh clone would start from nothing (it did, twice: hours of verdicts
  lost). Every run saves each verdict with its function's hash in docs/mutation-verdicts.json, and the
  next run, wherever it runs, takes back the verdicts of functions whose text is unchanged
  (restore_verdicts): a mutant of a changed function is run again, as mutmut itself does. The test map
  goes with them (docs/mutation-test-map.json): collected again only when a function changed.
- A test budget per mutated function (apply_budget, --test-budget): its fastest tests up to that many
  seconds, so that a survivor costs seconds, not the 10-15 minutes of every test that reaches it.

    python scripts/mutate.py [--only GLOB ...] [--max-children N] [--test-budget S] [--report-only] [--skeleton]
                             [--verify-kills]

`--only sftdpo.stats.*` (mutmut mutant-name globs) re-runs those mutants only (module by module on a
busy machine). Exits 1 when a survivor is unexplained.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import hashlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
import tokenize
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import yaml

from sftdpo.files import write_text_atomic  # a torn docs/mutation-verdicts.json would lose every verdict

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
DOC = ROOT / "docs" / "mutation.md"
EQUIVALENT = ROOT / "tests" / "mutation-equivalent.yaml"
KILLED = ROOT / "tests" / "mutation-killed.yaml"
RUNS = MUTANTS / "sftdpo-runs.json"
STATS = MUTANTS / "mutmut-stats.json"
BUDGET_S = 30.0  # default test budget per mutated function (apply_budget)
FULL_MAP = MUTANTS / "sftdpo-test-map.json"  # the test map as collected, before a budget cut it
# mutants/ is scratch, lost with a fresh clone: the verdicts and the runs live on in git here (save_verdicts)
VERDICTS = ROOT / "docs" / "mutation-verdicts.json"
TEST_MAP = ROOT / "docs" / "mutation-test-map.json"  # and the test map: collecting it again costs ~20 min

# files mutated in part: module -> the functions that are on the number path (the rest is not run)
# (the PEFT set-up moved from models.py to peft_methods.py; the rest of that file is CLI options and export)
SCOPE = {"sftdpo.peft_methods": {"lora_target_modules", "_lora_config", "peft_config", "apply_lora", "apply_param",
                                 "_train_subset"}}

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", None: "not checked",
          37: "type check", -11: "segfault", -9: "segfault"}
EXPLAIN = ("survived", "no tests", "timeout", "suspicious", "segfault")  # verdicts that need a reason

# Calls whose arguments are text for people, not numbers: a mutant that changes only string literals
# inside them (or inside a raise) is equivalent by rule "message text".
MESSAGE_CALLS = {"print", "warn", "debug", "info", "warning", "error", "exception", "set_description",
                 "set_postfix", "write", "filterwarnings", "simplefilter"}


@dataclass
class Mutant:
    name: str           # mutmut's name, e.g. sftdpo.stats.x_t_interval__mutmut_3
    module: str         # sftdpo.stats
    path: str           # src/sftdpo/stats.py
    function: str       # t_interval, or Class.method
    status: str
    line: str = ""      # the original line(s) the mutant changes, stripped
    mutant: str = ""    # the same line(s) mutated
    lineno: int = 0     # in the source file
    duration: float = 0.0

    @property
    def where(self) -> str:
        return f"{self.module}:{self.function}"


# -- running mutmut -----------------------------------------------------------------------------

def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(MUTANTS / "src")
    e.setdefault("OMP_NUM_THREADS", "1")
    e.setdefault("TOKENIZERS_PARALLELISM", "false")
    return e


def ensure_mutmut() -> None:
    try:
        import mutmut  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{ROOT}[mutation]"], check=True)


GENERATE = """
import sys
from pathlib import Path
from mutmut.__main__ import copy_src_dir, copy_also_copy_files, create_mutants
Path("mutants").mkdir(exist_ok=True)
copy_src_dir(); copy_also_copy_files(); create_mutants(int(sys.argv[1]))
"""


# Child processes of mutmut's coverage pass (MUTANT_UNDER_TEST=stats) run in the tests' temporary
# directories, where mutmut cannot find its configuration to record a call: a study's forked run
# died there. What a child calls cannot reach the parent's test map anyway, so children skip the
# recording. Imported at start-up by every Python child (PYTHONPATH=mutants/src), the fork server
# included, whose forked run processes inherit it.
#
# mutmut runs each mutant's tests in a process forked from a warm one. multiprocessing's fork server
# (a study's run processes) is a per-process singleton that a fork copies: once a test in the warm
# process had started one, every forked worker's study test failed (os.waitpid on a server that is
# not its child: ChildProcessError) and mutmut counted each such mutant killed. Measured: 20 stats.py
# mutants that are equivalent "killed" by test_faults' study fixture. A forked child forgets the
# parent's server and starts its own.
SITECUSTOMIZE = """# written by scripts/mutate.py (see SITECUSTOMIZE there)
import os
import sys
import threading
if os.environ.get("MUTANT_UNDER_TEST") == "stats":
    import mutmut.mutation.trampoline as _t
    _t.record_trampoline_hit = lambda *args, **kwargs: None


def _own_fork_server():
    fs = sys.modules.get("multiprocessing.forkserver")
    if fs is not None:
        s = fs._forkserver
        s._forkserver_address = s._forkserver_alive_fd = s._forkserver_pid = s._inherited_fds = None
        s._lock = threading.Lock()


os.register_at_fork(after_in_child=_own_fork_server)
"""


INTERRUPTED = -2  # mutmut() when the run was stopped by Ctrl-C or SIGTERM


def mutmut(args: list[str], max_children: int) -> int:
    """Run mutmut; on Ctrl-C or SIGTERM stop it and return INTERRUPTED. mutmut saves each verdict as
    it comes (mutants/src/**/*.meta), so a stopped run loses only the mutants in flight."""
    cmd = ["nice", "-n", "15", sys.executable, "-m", "mutmut", *args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), start_new_session=True)  # its own group: one signal for all

    def stop(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, stop)
    try:
        return p.wait()
    except KeyboardInterrupt:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        return INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, old)


def tree_hash(folder: str, patterns: tuple[str, ...] = ("*.py",)) -> str:
    h = hashlib.sha256()
    for pat in patterns:
        for p in sorted((ROOT / folder).rglob(pat)):
            h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def tests_hash() -> str:
    return tree_hash("tests", ("*.py", "*.yaml"))


def map_is_stale() -> bool:
    """Has a function changed (or appeared) since mutmut last saved its test map?"""
    stats = MUTANTS / "mutmut-stats.json"
    if not stats.exists():
        return False
    d = json.loads(stats.read_text())
    if not d.get("tests_by_mangled_function_name") and not (FULL_MAP.exists() and json.loads(FULL_MAP.read_text())):
        return True  # a map that lost every function would make every mutant `no tests`
    known = d.get("function_hashes", {})
    for meta in (MUTANTS / "src").rglob("*.py.meta"):
        module = module_of(ROOT / meta.with_suffix("").relative_to(MUTANTS))
        for func, h in json.loads(meta.read_text()).get("hash_by_function_name", {}).items():
            if known.get(f"{module}.{func}") != h:
                return True
    return False


def load_runs() -> list[dict]:
    return json.loads(RUNS.read_text()) if RUNS.exists() else []


def mutated_globs() -> list[str]:
    import tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]["only_mutate"]


def sync_unmutated() -> int:
    """Bring mutants/src's copies of the files mutmut does not mutate up to date with src/ (mutmut
    copies them once), and drop copies whose source is gone; mutmut itself re-creates a mutated file
    whose source changed. Returns how many files were updated or removed."""
    globs, n = mutated_globs(), 0
    src, dst = ROOT / "src", MUTANTS / "src"
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(ROOT).as_posix()
        if p.is_dir() or "__pycache__" in p.parts or (p.suffix == ".py" and any(fnmatch.fnmatch(rel, g) for g in globs)):
            continue
        t = dst / p.relative_to(src)
        if not t.exists() or t.read_bytes() != p.read_bytes():
            t.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, t)  # the source's mtime: mutmut mutates a file whose copy is no newer than it
            n += 1
    for t in sorted(dst.rglob("*")):
        if not t.is_file() or "__pycache__" in t.parts or t.name == "sitecustomize.py":
            continue
        if t.suffix == ".meta":  # the verdicts of a file no longer mutated (or gone) would still be counted
            rel = (Path("src") / t.relative_to(dst)).with_suffix("").as_posix()
            gone = not any(fnmatch.fnmatch(rel, g) for g in globs) or not (ROOT / rel).exists()
        else:
            gone = not (src / t.relative_to(dst)).exists()
        if gone:
            t.unlink()
            n += 1
    return n


def apply_budget(budget: float) -> tuple[float, float]:
    """Cut mutmut's test map to the fastest tests of each function whose recorded durations add up to at
    most `budget` seconds (at least the fastest one; 0: no cut), and return (test seconds per mutant
    kept, before the cut), summed over functions. mutmut runs a mutant's tests fastest first and stops at
    the first failure, so a kill costs little; a survivor runs them all, and the training path's
    functions are reached by 600-900 s of tests each: without a cut a few hundred survivors are days of
    CPU. The collected map is kept in FULL_MAP, so a later run can use another budget."""
    d = json.loads(STATS.read_text())
    dur, cur = d["duration_by_test"], d["tests_by_mangled_function_name"]
    saved = json.loads(FULL_MAP.read_text()) if FULL_MAP.exists() else {}
    # mutmut adds new tests to the (cut) map it loads, and may drop functions from it (measured: its
    # print-time-estimates emptied the whole map once): the full map is the saved one with mutmut's
    # additions, never less (map_is_stale collects it again when a function's code changed)
    full = {f: sorted({t for t in set(saved.get(f, [])) | set(cur.get(f, [])) if t in dur}) for f in saved.keys() | cur}
    FULL_MAP.write_text(json.dumps(full))
    # the test that tests/mutation-killed.yaml says kills a former survivor always runs for its function
    named = defaultdict(set)
    for e in load_entries(KILLED, "killed"):
        named[e["where"]].add(e["test"])
    cut = {}
    for f, ts in full.items():
        module, _, mangled = f.rpartition(".")
        must = named.get(f"{module}:{function_of(mangled)}", set())
        keep, total = [t for t in ts if t in must], 0.0
        for t in sorted(ts, key=lambda t: (dur[t], t)):
            if t in must:
                continue
            if budget and keep and total + dur[t] > budget:
                break
            keep.append(t)
            total += dur[t]
        cut[f] = sorted(keep, key=lambda t: (dur[t], t))
    d["tests_by_mangled_function_name"] = cut
    STATS.write_text(json.dumps(d))
    return (sum(dur[t] for ts in cut.values() for t in ts), sum(dur[t] for ts in full.values() for t in ts))


def save_verdicts() -> None:
    """Write every decided verdict (and its test time), each file's function hashes and the runs to
    VERDICTS, one line per mutant so that a run's diff shows what it decided."""
    files = {}
    for meta in sorted((MUTANTS / "src").rglob("*.py.meta")):
        d = json.loads(meta.read_text())
        done = {k.rpartition(".")[2]: [c, round(d.get("durations_by_key", {}).get(k, 0.0), 2)]
                for k, c in sorted(d["exit_code_by_key"].items()) if c is not None}
        if done:
            files[(Path("src") / meta.relative_to(MUTANTS / "src")).with_suffix("").as_posix()] = dict(
                functions=d.get("hash_by_function_name", {}), verdicts=done)
    text = json.dumps(dict(runs=load_runs(), files=files), indent=1, sort_keys=True, ensure_ascii=False)
    text = re.sub(r"\[\s*(-?\d+),\s*([-+.\deE]+)\s*\]", r"[\1, \2]", text)  # [exit code, seconds] on its mutant's line
    write_text_atomic(VERDICTS, text + "\n")
    if STATS.exists() and FULL_MAP.exists():  # which tests reach which function, tests by number
        d, full = json.loads(STATS.read_text()), json.loads(FULL_MAP.read_text())
        tests = sorted(d["duration_by_test"])
        number = {t: i for i, t in enumerate(tests)}
        rest = {k: v for k, v in d.items() if k not in ("tests_by_mangled_function_name", "duration_by_test")}
        lines = [json.dumps(dict(tests=tests, seconds=[round(d["duration_by_test"][t], 3) for t in tests], **rest),
                             sort_keys=True, ensure_ascii=False)[:-1] + ', "functions": {']
        lines += [f"{json.dumps(f, ensure_ascii=False)}: {json.dumps(sorted(number[t] for t in ts if t in number))},"
                  for f, ts in sorted(full.items())]
        lines[-1] = lines[-1].rstrip(",") if len(lines) > 1 else lines[-1]
        write_text_atomic(TEST_MAP, "\n".join(lines) + "}}\n")


def restore_test_map() -> bool:
    """mutmut's test map and test times from TEST_MAP when mutants/ has none (a fresh clone); whether
    it did. map_is_stale() then decides, as for a map collected here, whether it is still good."""
    if STATS.exists() or not TEST_MAP.exists():
        return False
    d = json.loads(TEST_MAP.read_text())
    tests, seconds, funcs = d.pop("tests"), d.pop("seconds"), d.pop("functions")
    full = {f: [tests[i] for i in ix] for f, ix in funcs.items()}
    FULL_MAP.write_text(json.dumps(full))
    STATS.write_text(json.dumps(dict(tests_by_mangled_function_name=full, duration_by_test=dict(zip(tests, seconds)), **d)))
    return True


def restore_verdicts() -> int:
    """Take back from VERDICTS the verdicts mutants/ lacks, for functions whose hash (mutmut's, of the
    function's text) is the saved one; return how many. Runs after mutant generation, when each meta
    file holds the current hashes."""
    if not VERDICTS.exists():
        return 0
    store = json.loads(VERDICTS.read_text())
    if not RUNS.exists() and store.get("runs"):
        RUNS.write_text(json.dumps(store["runs"], indent=1))
    n = 0
    for path, saved in store.get("files", {}).items():
        meta = MUTANTS / (path + ".meta")
        if not meta.exists():
            continue
        d = json.loads(meta.read_text())
        now, module = d.get("hash_by_function_name", {}), module_of(ROOT / path)
        for short, (code, seconds) in saved["verdicts"].items():
            key, func = f"{module}.{short}", short.partition("__mutmut_")[0]
            if key in d["exit_code_by_key"] and d["exit_code_by_key"][key] is None \
                    and func in now and now[func] == saved["functions"].get(func):
                d["exit_code_by_key"][key] = code
                d.setdefault("durations_by_key", {})[key] = seconds
                n += 1
        meta.write_text(json.dumps(d, indent=4))
    return n


def run(only: list[str], max_children: int, budget: float) -> None:
    (MUTANTS / "src").mkdir(parents=True, exist_ok=True)
    synced = sync_unmutated()
    if synced:
        print(f"mutate: {synced} unmutated files under mutants/src brought up to date with src/", flush=True)
    (MUTANTS / "src" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    gen = subprocess.run([sys.executable, "-c", GENERATE, str(max_children)], cwd=ROOT, env=env(),
                         capture_output=True, text=True)
    if gen.returncode:
        sys.exit(f"mutant generation failed:\n{gen.stderr[-3000:]}")
    restored = restore_verdicts()
    if restored:
        print(f"mutate: {restored} verdicts taken back from {VERDICTS.relative_to(ROOT)} (functions unchanged)", flush=True)
    if restore_test_map():
        print(f"mutate: the test map taken back from {TEST_MAP.relative_to(ROOT)}", flush=True)
    mutants = read_mutants(diffs=False)
    runs = load_runs()
    # survivors are re-run when the tests changed or the budget grew (either can kill them now)
    retest = bool(runs) and (runs[-1].get("tests") != tests_hash()
                             or (runs[-1].get("budget_s") or float("inf")) < (budget or float("inf")))
    if map_is_stale():
        # mutmut maps tests to functions once and afterwards only adds the tests it has not seen: a
        # new or changed function would keep no tests or its old ones. Collect the map again (one
        # in-process run of the selected tests); the verdicts of unchanged functions stay.
        print("mutate: functions changed since the test map was collected: collecting it again", flush=True)
        STATS.unlink()
        FULL_MAP.unlink(missing_ok=True)
    names = []
    for m in mutants:
        if not in_scope(m):
            continue
        if only and not any(fnmatch.fnmatch(m.name, g) for g in only):
            continue
        if only or m.status == "not checked" or (retest and m.status in EXPLAIN):
            names.append(m.name)
    print(f"mutate: {len(names)} mutants to run ({'re-testing survivors: tests changed; ' if retest else ''}"
          f"{sum(m.status == 'not checked' and in_scope(m) for m in mutants)} not checked yet)", flush=True)
    t0 = time.time()
    kept = full = 0.0
    if names:
        # collect (or load) the test map first, without running a mutant, so that the budget can cut it
        with open(MUTANTS / "time-estimates.txt", "w") as out:
            code = subprocess.run(["nice", "-n", "15", sys.executable, "-m", "mutmut", "print-time-estimates", *names],
                                  cwd=ROOT, env=env(), stdout=out).returncode
        if code:
            sys.exit(f"mutate: mutmut's test map could not be collected (exit {code}): a failing test stops it; fix "
                     "it, or leave it out for now with PYTEST_ADDOPTS='--deselect TEST'")
        kept, full = apply_budget(budget)
        print(f"mutate: test budget {budget:g} s per function: {kept / 60:.0f} of {full / 60:.0f} min of test time "
              "per mutant kept (summed over functions)", flush=True)
    code = mutmut(["run", "--max-children", str(max_children), *names], max_children) if names else 0
    wall = time.time() - t0
    if code and code != INTERRUPTED:
        sys.exit(f"mutate: mutmut failed (exit {code}); its output above says why (a failing test stops the "
                 "coverage pass: fix it, or leave it out for now with PYTEST_ADDOPTS='--deselect TEST')")
    wanted = set(names)
    before = {m.name: (m.status, m.duration) for m in mutants if m.name in wanted}
    done = len(names) if code != INTERRUPTED else sum(  # a verdict or its duration changed: run this time
        (m.status, m.duration) != before[m.name] for m in read_mutants(diffs=False) if m.name in before)
    runs.append(dict(date=time.strftime("%Y-%m-%d %H:%M"), mutants=done, wall_s=round(wall),
                     max_children=max_children, cpu=cpu_model(), tests=tests_hash(), src=tree_hash("src"), only=only,
                     budget_s=budget, test_min_kept=round(kept / 60), test_min_full=round(full / 60),
                     **({"interrupted_of": len(names)} if code == INTERRUPTED else {})))
    RUNS.write_text(json.dumps(runs, indent=1))
    if code == INTERRUPTED:
        save_verdicts()  # report() saves them otherwise
        sys.exit(f"mutate: interrupted after {done} of {len(names)} mutants; their verdicts are kept in mutants/: "
                 "run it again to go on")


# -- reading mutmut's results -------------------------------------------------------------------

def module_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")


def in_scope(m: Mutant) -> bool:
    fns = SCOPE.get(m.module)
    return fns is None or m.function.split(".")[0] in fns


def function_of(mangled: str) -> str:
    """x_foo -> foo; xǁClassǁmethod -> Class.method"""
    if mangled.startswith("xǁ"):
        _, cls, meth = mangled.split("ǁ")
        return f"{cls}.{meth}"
    return mangled[2:]


def defs(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out[sub.name] = sub
    return out


def body_lines(text: str, node: ast.FunctionDef, name: str) -> list[str]:
    """The function's lines from its `def` (default arguments are mutated too), named `name`."""
    lines = text.splitlines()[node.lineno - 1:node.end_lineno]
    return [lines[0].replace(node.name, name, 1)] + lines[1:]


def read_mutants(diffs: bool = True) -> list[Mutant]:
    out = []
    for meta in sorted((MUTANTS / "src").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        mutated = meta.with_suffix("")  # mutants/src/sftdpo/x.py
        src = ROOT / mutated.relative_to(MUTANTS)
        if not src.exists():
            continue
        module = module_of(src)
        fdefs = {}
        if diffs:
            mtext = mutated.read_text()
            fdefs = defs(ast.parse(mtext))
            stext = src.read_text()
            sdefs = defs(ast.parse(stext))
        for name, code in data["exit_code_by_key"].items():
            mangled, _, _ = name.rpartition(".")[2].partition("__mutmut_")
            m = Mutant(name=name, module=module, path=str(src.relative_to(ROOT)), function=function_of(mangled),
                       status=STATUS.get(code, "suspicious"), duration=data.get("durations_by_key", {}).get(name, 0.0))
            if diffs:
                short = name.rpartition(".")[2]
                orig, mut = fdefs.get(f"{mangled}__mutmut_orig"), fdefs.get(short)
                if orig and mut:
                    a, b = body_lines(mtext, orig, mangled), body_lines(mtext, mut, mangled)
                    old, new = [], []
                    for op in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
                        if op[0] != "equal":
                            old += [s.strip() for s in a[op[1]:op[2]]]
                            new += [s.strip() for s in b[op[3]:op[4]]]
                            if not m.lineno:
                                sdef = sdefs.get(m.function.split(".")[-1])
                                offset = op[1] if op[1] < len(a) else len(a) - 1
                                m.lineno = (sdef.lineno + offset) if sdef else 0
                    m.line, m.mutant = " / ".join(old), " / ".join(new) or "(line removed)"
            out.append(m)
    return out


# -- explanations -------------------------------------------------------------------------------

def _text_only(a: str, b: str) -> bool:
    """Do two lines differ only in string literals (their text, or a string replaced by None)?"""
    def toks(s: str) -> list[tuple[int, str]] | None:
        out = []  # a line of a longer statement may leave brackets open: keep the tokens read so far
        try:
            for t in tokenize.generate_tokens(io.StringIO(s).readline):
                if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.ENDMARKER):
                    out.append((t.type, t.string))
        except tokenize.TokenError:
            pass
        except (SyntaxError, IndentationError):
            return None
        return out
    ta, tb = toks(a), toks(b)
    if ta is None or tb is None or len(ta) != len(tb) or a == b:
        return False
    return all(x == y or (x[0] == tokenize.STRING and (y[0] == tokenize.STRING or y[1] == "None"))
               for x, y in zip(ta, tb))


_message_spans: dict[str, list[tuple[int, int]]] = {}


def message_spans(path: str) -> list[tuple[int, int]]:
    if path not in _message_spans:
        spans = []
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            if isinstance(node, ast.Raise) or (
                    isinstance(node, ast.Call) and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
                    in MESSAGE_CALLS):
                spans.append((node.lineno, node.end_lineno))
        _message_spans[path] = spans
    return _message_spans[path]


# a device argument (device=x.device, .to(x.device)) and what mutmut makes of it (device=None, dropped, .to(None))
_DEVICE_ARG = re.compile(r"\bdevice=(None|[\w.]*device\b(\([^()]*\))?)\s*,?\s*|\.to\((None|[\w.]*device\b(\([^()]*\))?)\)")


def _device_only(a: str, b: str) -> bool:
    """Do two lines differ only in where a tensor is placed (its device argument set to None or dropped)?"""
    def norm(s: str) -> str:
        return re.sub(r",\s*\)", ")", _DEVICE_ARG.sub(lambda m: ".to()" if m.group(0).startswith(".to") else "", s)).replace(" ", "")
    return a != b and norm(a) == norm(b)


def rule(m: Mutant) -> str | None:
    """The equivalence rule that explains m, if any."""
    if m.line and " / " not in m.line and _text_only(m.line, m.mutant) and any(
            lo <= m.lineno <= hi for lo, hi in message_spans(m.path)):
        return "message text: only the text of an error, log or progress message (or of a warnings filter) changes"
    if m.line and " / " not in m.line and _device_only(m.line, m.mutant):
        return ("device placement: a tensor made on the default device instead of its neighbour's; on a one-device "
                "(CPU) machine that is the same place, on a GPU the mixed devices raise (or a 0-d scalar is "
                "broadcast, the same number): never a silently different number (scripts/gpu-check.sh runs the "
                "number path on CUDA)")
    return None


def load_entries(path: Path, key: str) -> list[dict]:
    if not path.exists():
        return []
    entries = (yaml.safe_load(path.read_text()) or {}).get(key) or []
    for e in entries:
        need = {"where", key == "equivalent" and "reason" or "test"}
        if need - set(e):
            sys.exit(f"{path}: entry {e} lacks {', '.join(sorted(need - set(e)))}")
    return entries


def matches(e: dict, m: Mutant) -> bool:
    """An entry names a function (`where`), and either one mutated line (`line` + `mutant`) or, with
    `status`, every mutant of that function with that verdict (e.g. no tests reach it)."""
    if e["where"] != m.where:
        return False
    if "line" in e:
        return e["line"] == m.line and e.get("mutant") == m.mutant
    return e.get("status") == m.status


# -- the report ---------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                return f"{ln.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


WHY = ROOT / "scripts" / "mutate-why.md"
SKELETON = False
VERIFY = False


def report() -> int:
    mutants = read_mutants()
    if not mutants:
        sys.exit("no mutmut results under mutants/: run `make mutate` first")
    equivalent, killed = load_entries(EQUIVALENT, "equivalent"), load_entries(KILLED, "killed")
    used_eq = set()
    rows: dict[str, Counter] = defaultdict(Counter)
    explained: list[tuple[Mutant, str]] = []
    unexplained: list[Mutant] = []
    by_rule: Counter = Counter()
    for m in mutants:
        if not in_scope(m):
            rows[m.path]["out of scope"] += 1
            continue
        rows[m.path][m.status] += 1
        if m.status == "not checked":  # an entry for it (or for its function's verdict) is not stale, only not needed yet
            used_eq.update(i for i, e in enumerate(equivalent)
                           if (matches(e, m) if "line" in e else e["where"] == m.where))
        if m.status not in EXPLAIN:
            continue
        why = rule(m)
        if why:
            by_rule[why] += 1
            continue
        hit = next((i for i, e in enumerate(equivalent) if matches(e, m)), None)
        if hit is not None:
            used_eq.add(hit)
            explained.append((m, equivalent[hit]["reason"]))
        else:
            unexplained.append(m)
    # a killed-by entry must name a mutant that mutmut now finds killed (and, with --verify-kills, that
    # the named test alone fails on); one that survives stays unexplained
    stale_k = [e for e in killed if not any(matches(e, m) and m.status in ("killed", "not checked") for m in mutants)]
    if VERIFY:
        for e in killed:
            for m in (m for m in mutants if matches(e, m)):
                proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", e["test"]],
                                      cwd=MUTANTS, env={**env(), "MUTANT_UNDER_TEST": m.name}, capture_output=True)
                print(f"mutate: {m.name} {'killed' if proc.returncode else 'NOT KILLED'} by {e['test']}", flush=True)
                if proc.returncode == 0 and e not in stale_k:
                    stale_k.append(e)
    stale_eq = [e for i, e in enumerate(equivalent) if i not in used_eq]

    cols = ["killed", "survived", "no tests", "timeout", "suspicious", "segfault", "not checked"]
    L = ["# Mutation testing of the number path (`make mutate`)", "",
         "Generated by `scripts/mutate.py` from mutmut's results; do not edit by hand (the equivalence",
         "reasons live in `tests/mutation-equivalent.yaml`, the tests that kill former survivors in",
         "`tests/mutation-killed.yaml`, the tool's choice in `scripts/mutate-why.md`; the verdicts themselves,",
         "with each function's hash, in `docs/mutation-verdicts.json`, so that a fresh clone goes on from them).", "",
         "Each mutant runs the tests that reach its function, fastest first, up to the run's test budget per",
         "function (Runs, below): a survivor is a mutant those tests do not kill; a later run with a larger",
         "budget runs the survivors again.", ""]
    L += ["## Figures per module", "",
          "| module | generated | " + " | ".join(cols) + " |", "|---|" + "---:|" * (len(cols) + 1)]
    total: Counter = Counter()
    for path in sorted(rows):
        c = rows[path]
        n = sum(v for k, v in c.items() if k != "out of scope")
        total.update(c)
        scope = f" ({', '.join(sorted(SCOPE[module_of(ROOT / path)]))} only)" if module_of(ROOT / path) in SCOPE else ""
        L.append(f"| `{path.removeprefix('src/')}`{scope} | {n} | " + " | ".join(str(c.get(k, 0)) for k in cols) + " |")
    n = sum(v for k, v in total.items() if k != "out of scope")
    L.append(f"| **total** | **{n}** | " + " | ".join(f"**{total.get(k, 0)}**" for k in cols) + " |")
    checked = n - total.get("not checked", 0)
    L += ["", f"{checked} of {n} mutants checked; {total.get('killed', 0)} killed by the tests "
          f"({100 * total.get('killed', 0) / max(checked, 1):.1f}%). Survivors and mutants that no test reaches "
          f"(`no tests`): {sum(total.get(k, 0) for k in EXPLAIN)}, of them {sum(by_rule.values())} equivalent by "
          f"rule, {len(explained)} equivalent one by one (reasons below), **{len(unexplained)} unexplained**."]
    if total.get("not checked"):
        L += ["", f"**{total['not checked']} mutants not checked yet** (the run was interrupted or limited with "
              "`--only`): `make mutate` checks them."]
    L += ["", "## Rules", ""]
    L += [f"- {r}: {k} mutants" for r, k in sorted(by_rule.items())] or ["- (none applied)"]
    L += ["", "## Former survivors killed by new tests", ""]
    if killed:
        for e in killed:
            sub = f"`{e['line']}` → `{e['mutant']}`" if "line" in e else f"all {e.get('status', '')} mutants"
            L.append(f"- `{e['where']}`: {sub} — killed by `{e['test']}`")
    else:
        L.append("- (none yet)")
    L += ["", "## Equivalent survivors", ""]
    for m, reason in sorted(explained, key=lambda t: (t[0].path, t[0].lineno)):
        L.append(f"- `{m.path.removeprefix('src/')}:{m.lineno}` `{m.function}` ({m.status}): `{m.line}` → "
                 f"`{m.mutant}` — {reason}")
    if not explained:
        L.append("- (none)")
    L += ["", "## Unexplained survivors", ""]
    for m in sorted(unexplained, key=lambda m: (m.path, m.lineno)):
        L.append(f"- `{m.path.removeprefix('src/')}:{m.lineno}` `{m.function}` ({m.status}, `{m.name}`): "
                 f"`{m.line}` → `{m.mutant}`")
    if not unexplained:
        L.append("- none")
    if stale_k:
        L += ["", "## Killed-by entries whose mutant is not (or no longer) killed", ""]
        L += [f"- `{e['where']}`: `{e.get('line', '')}` → `{e.get('mutant', '')}` (`{e['test']}`)" for e in stale_k]
    if stale_eq:
        L += ["", "## Stale equivalence entries (they match no mutant: remove or update them)", ""]
        L += [f"- `{e['where']}`: `{e.get('line', '')}` → `{e.get('mutant', '')}`" for e in stale_eq]
    runs = load_runs()

    def scope(only: list[str]) -> str:  # a re-run of named mutants lists hundreds: say how many, show a few
        return " ".join(only) if len(only) <= 16 else f"{len(only)} names and globs: {' '.join(only[:3])} …"

    def ran(r: dict) -> str:
        return f"{r['mutants']} of {r['interrupted_of']} (interrupted)" if "interrupted_of" in r else str(r["mutants"])
    L += ["", "## Runs", ""]
    if runs:
        L += ["| date | mutants run | wall | workers | test budget per function | CPU | scope |",
              "|---|---:|---:|---:|---|---|---|"]
        L += [f"| {r['date']} | {ran(r)} | {r['wall_s'] / 60:.1f} min | {r['max_children']} | "
              + (f"{r['budget_s']:g} s ({r['test_min_kept']} of {r['test_min_full']} min of tests kept)"
                 if r.get("budget_s") else "none" if "budget_s" in r else "none (before budgets)")
              + f" | {r['cpu']} | {scope(r['only'])} |" for r in runs]
    else:
        L.append("(no run recorded on this machine)")
    checks = sum(m.duration for m in mutants)
    L += ["", f"Sum of the per-mutant test times mutmut recorded: {checks / 60:.0f} min (the CPU time of a "
          "complete first run on one worker, without the one-off stats collection)."]
    if WHY.exists():
        L += ["", WHY.read_text().strip()]
    DOC.write_text("\n".join(L) + "\n")
    print(f"mutate: wrote {DOC.relative_to(ROOT)}: {n} mutants, {total.get('killed', 0)} killed, "
          f"{len(unexplained)} unexplained, {len(stale_eq)} stale entries")
    for e in stale_k + stale_eq:
        print(f"  STALE {e}")
    if SKELETON:
        print(yaml.safe_dump([dict(where=m.where, line=m.line, mutant=m.mutant, reason="") for m in unexplained],
                             sort_keys=False, allow_unicode=True, width=200))
    for m in unexplained:
        print(f"  UNEXPLAINED {m.name} ({m.status}) {m.path}:{m.lineno}: {m.line!r} -> {m.mutant!r}")
    save_verdicts()  # the verdicts this report counts, kept in git beside it
    return 1 if unexplained else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=[], help="mutmut mutant-name globs to (re-)run, e.g. 'sftdpo.stats.*'")
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--test-budget", type=float, default=BUDGET_S,
                    help=f"seconds of tests per mutated function, fastest first (default {BUDGET_S:g}; 0: every test "
                         "that reaches it)")
    ap.add_argument("--report-only", action="store_true", help="write docs/mutation.md from the cached results")
    ap.add_argument("--skeleton", action="store_true", help="print YAML entries for the unexplained survivors")
    ap.add_argument("--verify-kills", action="store_true",
                    help="run the test each tests/mutation-killed.yaml entry names against its mutant alone")
    a = ap.parse_args()
    global SKELETON, VERIFY
    SKELETON, VERIFY = a.skeleton, a.verify_kills
    os.chdir(ROOT)
    ensure_mutmut()
    if not a.report_only:
        run(a.only, a.max_children, a.test_budget)
    sys.exit(report())


if __name__ == "__main__":
    main()
