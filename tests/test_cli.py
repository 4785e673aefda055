"""The command line explains itself: grouped flags with their choices and defaults, --version, the
README's commands exist, and progress lines where no terminal is attached."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sftdpo import __version__
from sftdpo.cli import FLAG_GROUPS, build_parser, main
from sftdpo.config import RunConfig

from conftest import qqp_files

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_has_one_flag_with_help_in_one_group(capsys):
    fields = [f.name for f in dataclasses.fields(RunConfig) if f.name != "data_fingerprint"]
    grouped = [name for helps in FLAG_GROUPS.values() for name in helps]
    assert sorted(grouped) == sorted(fields)  # each field once: a new field needs its help line
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for title in FLAG_GROUPS:
        assert f"\n{title}:\n" in text
    assert "--task {paraphrase,sonnet,classify,generate}" in text and "--regime {sft,dpo,sft-dpo}" in text
    assert "--use-rslora [true|false]" in text and "--keep-checkpoints KEEP_CHECKPOINTS" in text
    beta = re.search(r"--beta BETA\s+(.*?)\n  --", text, re.S).group(1)
    assert "DPO beta" in " ".join(beta.split()) and "(default: 0.1)" in " ".join(beta.split())
    assert "(default: unset)" in text and "(default: None)" not in text


def test_version_and_readme_commands_exist(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"sftdpo {__version__}"
    readme = (ROOT / "README.md").read_text()
    sub = build_parser()._subparsers._group_actions[0].choices
    used = set(re.findall(r"^\s*sftdpo ([a-z]+)", readme, re.M))
    assert used and used <= set(sub), f"README commands that do not exist: {used - set(sub)}"
    study = sub["study"]._subparsers._group_actions[0].choices
    assert set(re.findall(r"^\s*sftdpo study ([a-z]+)", readme, re.M)) <= set(study)


def test_without_a_terminal_each_epoch_and_evaluation_is_a_line(cache, tmp_path):
    """As under CI or nohup: stderr is a pipe, so no bars, and a line per epoch and per evaluation."""
    train, dev = qqp_files(tmp_path, 16, 8).values()
    proc = subprocess.run([sys.executable, "-m", "sftdpo.cli", "train", "--task", "paraphrase", "--model", "tiny-llama",
                           "--device", "cpu", "--precision", "fp32", "--epochs", "2", "--batch-size", "8",
                           "--train", str(train), "--dev", str(dev), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300, env=os.environ)
    assert proc.returncode == 0, proc.stderr[-2000:]
    err = proc.stderr
    assert re.search(r"^epoch 1/2 \(sft\): accuracy=\S+ .*\[\d+:\d\d elapsed, ETA \d+:\d\d\]$", err, re.M), err
    assert re.search(r"^epoch 2/2 \(sft\): .*ETA 0:00\]$", err, re.M)
    evals = [l for l in err.splitlines() if l.startswith("evaluated")]
    assert len(evals) >= 2 and all(re.fullmatch(r"evaluated \d+ dev examples in \d+:\d\d", l) for l in evals), evals
    assert "\r" not in err and "it/s" not in err  # no progress bars in a log
