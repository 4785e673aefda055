"""The documentation: the site builds with `mkdocs build --strict`, its command-line reference holds
every argument of the parser, and every command shown in README.md and docs/*.md runs.

Commands are the lines of the ```bash blocks, in order, one fresh working directory per page (a
page's later commands see its earlier outputs). The directory has the CS224N course files already
in `./data/` and a fake starter checkout beside it (`../cs224n-gpt/data/`): synthetic QQP pairs in
the course's format (`write_synthetic_qqp`) and this repository's sonnet fixtures, never the real
data. `$SFTDPO_DATA_DIR` holds only the GPT-2 tokenizer (for `tiny-gpt2`).

`sftdpo ...` runs in-process through `sftdpo.cli.main` (bash expands its words: quotes, `$'..'`),
with small sizes appended so the whole file stays within a few minutes on 2 cores:
  train      --model tiny-gpt2 --device cpu --precision fp32 --max-train-examples 8
             --max-dev-examples 4 --batch-size 4 --max-new-tokens 8 (--pairs-n 2 with a DPO --regime); --epochs capped at 2,
             --handoff-epoch at 1 and --budget-steps at 4 (only where given)
  preview    --model tiny-gpt2
  study run  --model tiny-gpt2, the same sizes as `--set`, `--only` filters that keep a few runs
             (seed 0, FFT, a slice of each spec: CUT, SPEC_CUT; never on a field the line filters
             itself), --no-report (the pages' `study report` lines write the reports), and
             --no-probe with a --dry-run that does not ask for --probe
  bench      --model tiny-gpt2 --steps 1 --device cpu --only sft/paraphrase
A path argument naming the page's backbone (`...-smollm2-135m-...`) is read with the tiny model's
name, since the tiny model wrote it. Other lines run in bash. A line the test does not run carries
`# needs: REASON` (README's Development page lists the reasons), on the block's first line or at
its own end; a `make`/`pip`/`torchrun`/... line without one fails the test rather than run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import FIX, require_tiny_gpt2, write_synthetic_qqp

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md")
                               if "_notes" not in p.relative_to(ROOT / "docs").parts)
REASONS = {"gpu", "network", "cluster", "server", "install", "ci"}
NEVER_UNMARKED = {"make", "pip", "torchrun", "accelerate", "ray", "tensorboard", "mlflow", "mkdocs", "pytest",
                  "nvidia-cuda-mps-control"}
MARK = re.compile(r"(?:^|\s)#\s*needs:\s*([\w-]+)")
TINY = "tiny-gpt2"
SIZES = {"--device": "cpu", "--precision": "fp32", "--max-train-examples": "8", "--max-dev-examples": "4",
         "--batch-size": "4", "--max-new-tokens": "8", "--pairs-n": "2"}
# a study keeps a handful of its runs: seed 0, FFT, and a slice of each grid (a field the line filters
# on itself is left as the line has it)
CUT = {"seed": "0", "param": "fft"}
SPEC_CUT = {"paper": {"task": "paraphrase", "data_fraction": "1.0", "regime": "sft,sft-dpo"},
            "dpo-sweep": {"task": "paraphrase", "beta": "0.2", "regime": "sft,dpo"},
            "dpo-sweep-quick": {"beta": "0.2", "dpo_lr": "2.5e-05"},
            "quick": {"regime": "sft-dpo"}, "own-tasks": {"regime": "sft-dpo"},
            "methods": {"task": "paraphrase", "regime": "sft"},
            "methods-quick": {"task": "paraphrase", "regime": "sft-dpo", "objective": "orpo"},
            "findings": {"task": "paraphrase", "regime": "sft-dpo"},
            "lr-sweep-quick": {"task": "paraphrase", "regime": "sft-dpo"}}
SONNET_CUT = {"pairs": "v1", "temperature": "1.0"}  # the paper's sonnet axes


@dataclass
class Command:
    page: str
    line: int
    text: str  # continuation lines joined; a heredoc's body included
    needs: str | None


def page_commands(page: str, text: str) -> list[Command]:
    """The commands of a page's ```bash blocks, each with the reason it is not run, if marked."""
    out: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```bash":
            i += 1
            continue
        i += 1
        block_needs = None
        first = True
        while i < len(lines) and lines[i].strip() != "```":
            ln, start = lines[i], i + 1
            i += 1
            if not ln.strip():
                continue
            if ln.lstrip().startswith("#"):
                m = MARK.search(ln)
                if first and m:
                    block_needs = m.group(1)
                first = False
                continue
            first = False
            cmd = ln
            while cmd.endswith("\\") and i < len(lines):
                cmd = cmd[:-1] + " " + lines[i].strip()
                i += 1
            here = re.search(r"<<-?\s*'?(\w+)'?", cmd)
            if here:  # the body, up to the delimiter line, belongs to the command
                body = []
                while i < len(lines) and lines[i].strip() != here.group(1):
                    body.append(lines[i])
                    i += 1
                i += 1
                cmd = "\n".join([cmd, *body, here.group(1)])
            m = MARK.search(cmd.splitlines()[0])
            out.append(Command(page, start, cmd, m.group(1) if m else block_needs))
        i += 1
    return out


def _set(argv: list[str], flag: str, value: str) -> list[str]:
    """argv with `flag value` replacing every earlier `flag X` (append-type flags included)."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            i += 2
            continue
        if argv[i].startswith(flag + "="):
            i += 1
            continue
        out.append(argv[i])
        i += 1
    return out + [flag, value]


def _value(argv: list[str], flag: str) -> str | None:
    return next((argv[k + 1] for k in range(len(argv) - 1) if argv[k] == flag), None)


def small(argv: list[str]) -> list[str]:
    """The command at the test's size (see the module docstring)."""
    cmd = argv[0]
    if "--help" in argv or "-h" in argv:
        return argv
    model = _value(argv, "--model")
    argv = [a.replace("smollm2-135m", TINY) if a != model else a for a in argv]
    if cmd == "train":
        argv = _set(argv, "--model", TINY)
        for flag, value in SIZES.items():
            if flag != "--pairs-n" or _value(argv, "--regime") in ("dpo", "sft-dpo"):  # a DPO flag: DPO runs only
                argv = _set(argv, flag, value)
        epochs = _value(argv, "--epochs")
        if epochs and int(epochs) > 2:
            argv = _set(argv, "--epochs", "2")
        if _value(argv, "--handoff-epoch"):
            argv = _set(argv, "--handoff-epoch", "1")
        steps = _value(argv, "--budget-steps")
        if steps and int(steps) > 4:
            argv = _set(argv, "--budget-steps", "4")
    elif cmd == "preview":
        argv = _set(argv, "--model", TINY)
    elif argv[:2] == ["study", "run"]:
        argv = _set(argv, "--model", TINY)
        spec = argv[2]
        sets = ["epochs=2", "handoff_epoch=1", "max_train_examples=8", "max_dev_examples=4", "max_new_tokens=8",
                "pairs_n=2", "batch_size=4", "device=cpu", "precision=fp32"]
        argv += [a for s in sets for a in ("--set", s)]
        given = dict(argv[k + 1].split("=", 1) for k in range(len(argv) - 1) if argv[k] == "--only")
        cut = {**CUT, **SPEC_CUT.get(spec, {}), **(SONNET_CUT if given.get("task") == "sonnet" else {})}
        argv += [a for f, v in cut.items() if f not in given for a in ("--only", f"{f}={v}")]
        if "--dry-run" not in argv:
            argv += ["--no-report"]
        elif "--probe" not in argv:  # a dry-run answers from the FLOP count unless the line asks to measure
            argv += ["--no-probe"]
    elif cmd == "bench":
        argv = _set(argv, "--model", TINY)
        argv = _set(argv, "--steps", "1")
        argv = _set(argv, "--device", "cpu")
        argv = _set(argv, "--only", "sft/paraphrase")
    return argv


# -- the site -----------------------------------------------------------------------------------

def _hooks():
    spec = importlib.util.spec_from_file_location("sftdpo_docs_hooks", ROOT / "docs" / "hooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_cli_reference_has_every_argument_of_every_command():
    """Catches a reference that skips a sub-command (study run/status/report/best sit one level down),
    an argument group (train's flags live in FLAG_GROUPS' groups), positionals, or a help text."""
    from sftdpo.cli import build_parser

    page = _hooks().cli_reference()
    sections = re.split(r"^#+ `", page, flags=re.M)
    by_prog = {s.split("`", 1)[0]: s for s in sections[1:]}
    parsers = list(_all_parsers(build_parser()))
    assert {p.prog for p in parsers} - {"sftdpo"} == set(by_prog), "a command without its section"
    for p in parsers:
        text = sections[0] if p.prog == "sftdpo" else by_prog[p.prog]
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                continue
            names = a.option_strings or [a.metavar or a.dest]
            assert all(n in text for n in names), f"{p.prog}: {names} missing"
            if a.help:
                words = " ".join(a.help.split())[:40].replace("<", "&lt;").replace(">", "&gt;").replace("*", r"\*")
                assert words in " ".join(text.split()), f"{p.prog} {names}: help {a.help!r} missing"


def test_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link or anchor, a page missing from the nav, a hook that
    fails or a theme that is not installed fails here. The home page is the README and the reference
    lists the train flags (the hooks ran); no page loads a web font (the site works offline)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("material")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = tmp_path / "site"
    home = (site / "index.html").read_text()
    assert "I am a CS224N student" in home and 'href="course/' in home
    assert "--max-train-examples" in (site / "reference" / "cli" / "index.html").read_text()
    assert not (site / "_notes").exists() and not (site / "hooks.py").exists()
    for html in site.rglob("*.html"):
        assert "fonts.googleapis.com" not in html.read_text(), html


# pip's, mkdocs', mutmut's and scripts/mutate.py's flags named in the prose
FOREIGN_FLAGS = {"--no-deps", "--strict", "--max-children", "--test-budget", "--verify-kills", "--report-only",
                 "--skeleton"}


def test_commands_and_flags_named_in_the_prose_exist():
    """Inline code in the text (`sftdpo predict RUN --split test`, `--max-train-examples 2000`) is not
    run, so it is checked against the parser: catches a page that names a sub-command or a flag the
    command line does not have (renamed, removed, or under another sub-command)."""
    from sftdpo.cli import build_parser

    parsers = {p.prog: p for p in _all_parsers(build_parser())}
    every_flag = {o for p in parsers.values() for a in p._actions for o in a.option_strings}
    bad = []
    for page in PAGES:
        text = (ROOT / page).read_text(encoding="utf-8")
        for span in re.findall(r"`([^`\n]+)`", text):
            words = span.split() or [""]
            if words[0] == "sftdpo":
                prog = "sftdpo"
                for w in words[1:]:
                    if f"{prog} {w}" in parsers:
                        prog = f"{prog} {w}"
                    elif not w.startswith("-"):
                        break
                known = {o for name in ("sftdpo", prog) for a in parsers[name]._actions for o in a.option_strings}
            elif words[0].startswith("--"):
                known = every_flag | FOREIGN_FLAGS
            else:
                continue
            flags = [f for w in words for f in [w.strip("[]").split("=")[0]] if re.fullmatch(r"--?[a-z][a-z0-9-]*", f)]
            bad += [f"{page}: `{span}`: {f}" for f in flags if f not in known and not f.endswith("-")]
    assert not bad, "\n".join(bad)


# -- the commands -------------------------------------------------------------------------------

def test_the_parser_reads_marks_blocks_continuations_and_heredocs():
    """Catches a reader that runs a marked line, drops a continuation line or splits a heredoc into
    commands (each would run something the page does not say)."""
    text = "\n".join(["```bash", "# needs: gpu", "sftdpo train --a \\", "   --b", "```", "",
                      "```bash", "# a comment", "cat > f <<'EOF'", "sftdpo x", "EOF", "ls  # needs: server",
                      "sftdpo eval --run r", "```", "```text", "sftdpo nope", "```"])
    cmds = page_commands("p", text)
    assert [(c.text, c.needs) for c in cmds] == [
        ("sftdpo train --a  --b", "gpu"), ("cat > f <<'EOF'\nsftdpo x\nEOF", None), ("ls  # needs: server", "server"),
        ("sftdpo eval --run r", None)]
    assert small(["train", "--epochs", "15", "--handoff-epoch", "9", "--model", "gpt2"])[-4:] == \
        ["--epochs", "2", "--handoff-epoch", "1"]


@pytest.fixture
def workdir(tmp_path, cache, monkeypatch):
    """A user's working directory: the course files in ./data and a starter checkout beside it."""
    require_tiny_gpt2()
    from sftdpo.config import find_in_data_dirs

    tok = find_in_data_dirs("gpt2-tokenizer")
    starter = tmp_path / "cs224n-gpt" / "data"
    starter.mkdir(parents=True)
    write_synthetic_qqp(starter / "quora-train.csv", 64, seed=0)
    write_synthetic_qqp(starter / "quora-dev.csv", 32, seed=1)
    rows = write_synthetic_qqp(tmp_path / "test.csv", 8, seed=2).read_text().splitlines()
    (starter / "quora-test-student.csv").write_text("\n".join(r.rsplit("\t", 1)[0] for r in rows) + "\n")
    for f in (FIX / "sonnets").iterdir():
        shutil.copy(f, starter / f.name)
    work = tmp_path / "work"
    for sub, pattern in (("qqp", "quora-*.csv"), ("sonnets", "*sonnets*.txt")):
        (work / "data" / sub).mkdir(parents=True)
        for f in starter.glob(pattern):
            shutil.copy(f, work / "data" / sub / f.name)
    env_data = tmp_path / "env-data"
    env_data.mkdir()
    (env_data / "gpt2-tokenizer").symlink_to(tok.resolve())
    monkeypatch.setenv("SFTDPO_DATA_DIR", str(env_data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(work)
    return work


def _bash(script: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euc", script], cwd=cwd, capture_output=True, text=True, env=os.environ,
                          timeout=120)


@pytest.mark.parametrize("page", PAGES)
def test_every_command_on_the_page_runs(page, workdir, capsys):
    """Catches a command whose flag was renamed or removed, a file name a page promises that a command
    does not write, a step that depends on a step the page left out, and an unmarked command that
    needs a GPU, the network or a cluster."""
    from sftdpo.cli import main

    cmds = page_commands(page, (ROOT / page).read_text(encoding="utf-8"))
    for c in cmds:
        where = f"{page}:{c.line}: {c.text.splitlines()[0]}"
        if c.needs:
            assert c.needs in REASONS, f"{where}: unknown reason {c.needs!r} (one of {sorted(REASONS)})"
            continue
        word = c.text.split()[0]
        assert word not in NEVER_UNMARKED, f"{where}: mark it `# needs: REASON` (the test will not run it)"
        if word != "sftdpo":
            proc = _bash(c.text, workdir)
            assert proc.returncode == 0, f"{where}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
            continue
        words = _bash("printf '%s\\0' " + c.text[len("sftdpo"):], workdir)
        assert words.returncode == 0, f"{where}: {words.stderr}"
        argv = small([w for w in words.stdout.split("\0") if w])
        try:
            rc = main(argv)
        except SystemExit as e:  # --help
            rc = e.code or 0
        out = capsys.readouterr()
        assert rc == 0, f"{where}\nran: sftdpo {' '.join(argv)}\n{out.out[-2000:]}{out.err[-3000:]}"
