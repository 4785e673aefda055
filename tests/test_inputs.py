"""Bad input gets one clear line, a non-zero exit and no result that looks complete; one writer per
directory; a run's identity is the data it read. Through the CLI (`sftdpo.cli.main`), as a user meets them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sftdpo.cli import main
from sftdpo.config import RunConfig, SftdpoError
from sftdpo.files import DirLock
from sftdpo.study.spec import expand, parse_set

from conftest import SONNET_FILES, qqp_files

TINY = ["--model", "tiny-llama", "--device", "cpu", "--precision", "fp32", "--epochs", "1", "--batch-size", "8",
        "--eval-batch-size", "8"]


@pytest.fixture
def qqp(tmp_path):
    return qqp_files(tmp_path, 24, 8)


def cli(*args: str) -> tuple[int, str]:
    """(exit status, stderr) of `sftdpo ARGS`, run in this process."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(["-q", *args])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, err.getvalue()


def one_line_error(rc: int, err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc not in (0, None), err
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def no_result(out: Path) -> None:
    assert not (out / "summary.json").exists() and not (out / "config.json").exists()


def train_args(task: str, files: dict, out: Path, *extra: str) -> list[str]:
    return ["train", "--task", task, "--train", files["train"], "--dev", files["dev"], *TINY, "--out", str(out), *extra]


# -- values: types and ranges -------------------------------------------------------------------

def test_yaml_and_set_values_are_the_numbers_they_are(tmp_path, cache):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("lr: 1e-3\nepochs: '2'\nbalance_labels: yes\npairs_temperatures: 0.7,1.3\n")
    from sftdpo.cli import load_config_file

    cfg = RunConfig.from_dict(load_config_file(str(cfg_file)))
    assert (cfg.lr, cfg.epochs, cfg.balance_labels, cfg.pairs_temperatures) == (0.001, 2, True, (0.7, 1.3))
    assert RunConfig.from_dict(parse_set(["dpo_lr=5e-6", "max_train_examples=null"])).dpo_lr == 5e-6
    spec = {"name": "s", "defaults": {"lr": "1e-3", "model": "tiny-llama", "regime": "sft-dpo", "epochs": 2,
                                      "handoff_epoch": 1}, "grid": {"seed": [0, 1]},
            "overrides": [{"when": {"lr": 0.001}, "set": {"dpo_lr": "2e-6"}}]}
    runs = expand(spec)
    assert [c.lr for _, c in runs] == [0.001, 0.001] and all(c.dpo_lr == 2e-6 for _, c in runs)


@pytest.mark.parametrize("value,field,expected", [
    ({"lr": "abc"}, "lr", "a number"), ({"epochs": 2.5}, "epochs", "an integer"), ({"model": 3}, "model", "a string"),
    ({"use_dora": "maybe"}, "use_dora", "true or false"), ({"epochs": True}, "epochs", "an integer"),
    ({"pairs_temperatures": "hot"}, "pairs_temperatures", "a list of numbers")])
def test_every_field_is_type_checked_by_name(value, field, expected):
    with pytest.raises(SftdpoError, match=f"{field} must be {expected}"):
        RunConfig.from_dict(value)


@pytest.mark.parametrize("flags,needle", [
    (["--beta", "0"], "--beta must be > 0"), (["--beta", "-1"], "--beta must be > 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"), (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "-0.5"], "--temperature must be >= 0"),
    (["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    (["--warmup-ratio", "1.5"], "--warmup-ratio must be in [0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--max-length", "1"], "--max-length must be >= 2"),
    (["--max-length", "8"], "too short for the paraphrase prompt"),
    (["--lr", "abc"], "--lr"),
])
def test_out_of_range_values_are_one_line(flags, needle, qqp, cache, tmp_path):
    out = tmp_path / "run"
    rc, err = cli(*train_args("paraphrase", qqp, out, *flags))
    one_line_error(rc, err, needle)
    no_result(out)


def test_sonnet_max_length_must_hold_a_prompt(cache, tmp_path):
    out = tmp_path / "run"
    one_line_error(*cli(*train_args("sonnet", SONNET_FILES, out, "--max-length", "10")), "too short for the sonnet prompts")
    no_result(out)


def test_temperature_zero_is_greedy(cache, tmp_path):
    from sftdpo.ops.generation import sample_next
    import torch

    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_next(logits, 0.0, 0.9).tolist() == [1, 0]
    RunConfig(temperature=0.0).validate()


# -- data -----------------------------------------------------------------------------------------

def test_sonnet_dev_file_of_prompts_is_refused(cache, tmp_path):
    out = tmp_path / "run"
    files = dict(train=SONNET_FILES["train"], dev=str(Path(SONNET_FILES["train"]).parent / "sonnets_held_out_dev.txt"))
    one_line_error(*cli(*train_args("sonnet", files, out)), "TRUE_sonnets_held_out_dev.txt", "no lines after the 3-line")
    no_result(out)


def test_qqp_labels_other_than_0_1_are_an_error_with_the_line(qqp, cache, tmp_path):
    bad = tmp_path / "bad.csv"
    lines = Path(qqp["train"]).read_text().splitlines()
    lines[3] = lines[3].rsplit("\t", 1)[0] + "\t2"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    one_line_error(*cli(*train_args("paraphrase", dict(qqp, train=str(bad)), out)), "line 4", "label '2' is not 0/1")
    no_result(out)


def test_dev_identical_to_train_is_named(qqp, cache, tmp_path):
    out = tmp_path / "run"
    one_line_error(*cli(*train_args("paraphrase", dict(qqp, dev=qqp["train"]), out)), "every dev pair also occurs in train")
    no_result(out)
    same = dict(train=SONNET_FILES["dev"], dev=SONNET_FILES["dev"])
    one_line_error(*cli(*train_args("sonnet", same, out)), "every training sonnet is also a dev sonnet")
    no_result(out)


def test_non_utf8_sonnet_file(cache, tmp_path):
    bad = tmp_path / "sonnets.txt"
    bad.write_bytes(Path(SONNET_FILES["train"]).read_bytes().replace(b"the", b"th\xe9", 1))
    out = tmp_path / "run"
    one_line_error(*cli(*train_args("sonnet", dict(SONNET_FILES, train=str(bad)), out)), "not valid UTF-8")
    no_result(out)


@pytest.mark.parametrize("name,text,needle", [("c.json", '{"lr": 1e-3,,}', "not valid JSON"),
                                              ("c.yaml", "lr: [1e-3\n", "not valid YAML"),
                                              ("c.yaml", "- lr\n- epochs\n", "must hold a mapping")])
def test_malformed_config_files(name, text, needle, tmp_path):
    f = tmp_path / name
    f.write_text(text)
    one_line_error(*cli("train", "--config", str(f), "--out", str(tmp_path / "run")), needle)
    no_result(tmp_path / "run")


def test_out_that_is_a_file_under_a_file_or_not_writable(qqp, cache, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    one_line_error(*cli(*train_args("paraphrase", qqp, f)), "is a file, not a directory")
    one_line_error(*cli(*train_args("paraphrase", qqp, f / "run")), "which is a file")
    one_line_error(*cli(*train_args("paraphrase", qqp, Path("/proc/1/sftdpo-run"))), "cannot be created")
    assert f.read_text() == "x"


def test_empty_model_directory(qqp, cache, tmp_path):
    (tmp_path / "model").mkdir()
    out = tmp_path / "run"
    args = train_args("paraphrase", qqp, out)
    args[args.index("tiny-llama")] = str(tmp_path / "model")
    one_line_error(*cli(*args), "has no config.json", "not a Hugging Face model directory")
    no_result(out)


# -- study specs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,needle", [
    ({"grid": {}}, "its grid is empty"),
    ({"grid": {"seed": []}}, "grid axis 'seed' is an empty list"),
    ({"grid": {"seed": [0]}, "overrides": [{"when": {"tsk": "sonnet"}, "set": {"lr": 1e-4}}]},
     "overrides[0].when names tsk"),
    ({"grid": {"seed": [0]}, "exclude": [{"regim": "sft"}]}, "exclude[0] names regim"),
    ({"grid": {"sed": [0, 1]}}, "grid axis 'sed' sets sed, not a config field"),
])
def test_bad_study_specs(spec, needle, tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "s", "defaults": {"model": "tiny-llama"}, **spec}))
    one_line_error(*cli("study", "run", str(f), "--out", str(tmp_path / "study")), needle)
    assert not (tmp_path / "study").exists()


def test_only_that_matches_nothing(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text(yaml.safe_dump({"name": "s", "defaults": {"model": "tiny-llama"}, "grid": {"seed": [0, 1]}}))
    one_line_error(*cli("study", "run", str(f), "--out", str(tmp_path / "study"), "--only", "seed=7"), "matches --only seed=7")
    assert not (tmp_path / "study").exists()


# -- one writer per directory ---------------------------------------------------------------------

def test_a_second_writer_is_refused_with_the_holder_named(qqp, cache, tmp_path):
    out = tmp_path / "run"
    with DirLock(out, "sftdpo train (another one)"):
        one_line_error(*cli(*train_args("paraphrase", qqp, out)), f"process {os.getpid()}", "is being trained by")
    no_result(out)
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "defaults": {"task": "paraphrase", "model": "tiny-llama", **qqp},
                                    "grid": {"seed": [0]}}))
    with DirLock(tmp_path / "study", "sftdpo study run s"):
        one_line_error(*cli("study", "run", str(spec), "--out", str(tmp_path / "study")), "is in use by process",
                       "sftdpo study run s")
    assert not (tmp_path / "study" / "runs").exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(qqp, cache, tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path[:0] = sys.argv[2:]; "
                               "from sftdpo.files import DirLock; DirLock(sys.argv[1], 'doomed').acquire(); "
                               "print('held', flush=True); time.sleep(60)", str(out), *sys.path],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    one_line_error(*cli(*train_args("paraphrase", qqp, out)), f"process {holder.pid} (doomed)")
    holder.kill()
    holder.wait()
    rc, err = cli(*train_args("paraphrase", qqp, out))
    assert rc == 0, err
    assert (out / "summary.json").exists()


def test_a_run_that_failed_before_training_does_not_block_the_corrected_command(qqp, cache, tmp_path):
    out = tmp_path / "run"
    one_line_error(*cli(*train_args("paraphrase", qqp, out, "--label-words", "absolutely-yes,no")), "single tokens")
    no_result(out)
    # a directory left by an older attempt that wrote its config and died before its first epoch
    out.mkdir(exist_ok=True)
    (out / "config.json").write_text(json.dumps({"config": {}, "hash": "0123456789ab"}))
    rc, err = cli(*train_args("paraphrase", qqp, out))
    assert rc == 0, err
    assert json.loads((out / "config.json").read_text())["hash"] != "0123456789ab"
    # a directory that does hold another run's trained epochs is still refused
    one_line_error(*cli(*train_args("paraphrase", qqp, out, "--lr", "1e-4")), "holds another run")


def test_a_study_run_that_could_not_start_is_not_done(qqp, cache, tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"name": "s", "defaults": {"task": "paraphrase", "model": "tiny-llama", "device": "cpu",
                                                              "precision": "fp32", "max_length": 8, **qqp},
                                    "grid": {"seed": [0]}}))
    rc, err = cli("study", "run", str(spec), "--out", str(tmp_path / "study"), "--no-report")
    assert rc == 1
    from sftdpo.store import Store

    with Store(tmp_path / "study" / "study.db") as store:
        (r,) = store.runs()
    assert r["status"] == "failed" and "too short for the paraphrase prompt" in r["error"]
    assert not (Path(r["run_dir"]) / "summary.json").exists()


# -- identity -------------------------------------------------------------------------------------

def test_a_runs_identity_is_the_data_it_read(cache, tmp_path, monkeypatch):
    from sftdpo.data import resolve_data

    copy = tmp_path / "copy"
    copy.mkdir()
    for k in ("train", "dev"):
        shutil.copy(SONNET_FILES[k], copy / Path(SONNET_FILES[k]).name)
    cfg = RunConfig(task="sonnet", model="tiny-llama", **SONNET_FILES)
    same = RunConfig(task="sonnet", model="tiny-llama", train=str(copy / "sonnets.txt"),
                     dev=str(copy / "TRUE_sonnets_held_out_dev.txt"))
    a, b = resolve_data(cfg), resolve_data(same)
    assert a.hash() == b.hash() and a.data_fingerprint  # the same examples from another place: the same run
    edited = copy / "sonnets.txt"
    edited.write_text(edited.read_text().replace("kettle", "teapot", 1))
    assert resolve_data(same).hash() != a.hash()  # other examples: another run
    # relative paths are stored absolute
    monkeypatch.chdir(copy)
    rel = resolve_data(RunConfig(task="sonnet", model="tiny-llama", train="sonnets.txt", dev="TRUE_sonnets_held_out_dev.txt"))
    assert Path(rel.train).is_absolute() and Path(rel.train).parent == copy


def test_eval_works_from_another_directory(qqp, cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = {k: os.path.relpath(v, tmp_path) for k, v in qqp.items()}
    assert cli(*train_args("paraphrase", rel, Path("run")))[0] == 0
    conf = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert Path(conf["train"]).is_absolute()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, err = cli("eval", "--run", str(tmp_path / "run"), "--checkpoint", "last")
    assert rc == 0, err


def test_reference_cache_key_covers_device_and_precision():
    import torch

    from sftdpo.objectives.dpo.pairs import PairSet
    from sftdpo.objectives.dpo.reference import reference_key

    class T:
        name = "paraphrase"

    ps = PairSet([[1, 2]], [[3]], [[4]])
    keys = {json.dumps(reference_key(RunConfig(), T(), "w", ps, torch.device(d), p), sort_keys=True)
            for d in ("cpu", "cuda") for p in ("fp32", "bf16")}
    assert len(keys) == 4


# -- encodings and formats (issue 24) -------------------------------------------------------------

FIX = Path(__file__).parent / "fixtures" / "data"


def with_bom(src: Path, dst: Path) -> Path:
    """`src` as Excel's "CSV UTF-8" writes it: a UTF-8 byte-order mark first."""
    dst.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())
    return dst


@pytest.mark.parametrize("name", ["quora-train.csv", "formats/minbert.csv", "formats/label-q1-q2-id.tsv",
                                  "formats/glue-train.tsv", "formats/glue-test.tsv", "formats/kaggle-train.csv"])
def test_a_byte_order_mark_is_not_part_of_a_qqp_file(name, tmp_path):
    """Every QQP layout reads the same examples with a byte-order mark as without. Catches a reader that
    strips the mark for format detection only (the CS224N layout then names its first column '\\ufeffid'
    and skips every row as broken)."""
    from sftdpo.data import read_qqp

    src = FIX / "qqp" / name
    assert read_qqp(with_bom(src, tmp_path / src.name)) == read_qqp(src)


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "json"])
def test_a_byte_order_mark_is_not_part_of_an_own_data_file(ext, tmp_path):
    """CSV, TSV, JSON Lines and JSON rows read the same with a byte-order mark: the first column is
    `text`, not an invisible '\\ufefftext'."""
    from sftdpo.data.records import read_rows

    rows = [{"text": "a cat", "label": "0"}, {"text": "a coin", "label": "1"}]
    src = tmp_path / f"rows.{ext}"
    if ext in ("csv", "tsv"):
        sep = "," if ext == "csv" else "\t"
        src.write_text("text" + sep + "label\n" + "".join(f"{r['text']}{sep}{r['label']}\n" for r in rows))
    elif ext == "jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        src.write_text(json.dumps(rows))
    got = read_rows(with_bom(src, tmp_path / f"bom.{ext}"))
    assert [r.fields for r in got] == rows == [r.fields for r in read_rows(src)]


def test_a_byte_order_mark_is_not_part_of_a_sonnet_file(tmp_path):
    """The first sonnet of a sonnets file with a byte-order mark is still sonnet 1 (the course's
    'number on its own line' split does not see a mark as part of a number)."""
    from sftdpo.data import read_cs224n_sonnets

    src = Path(SONNET_FILES["train"])
    headerless = tmp_path / "plain.txt"
    text = src.read_text()
    first = next(i for i, ln in enumerate(text.splitlines()) if ln.strip().isdigit())
    headerless.write_text("\n".join(text.splitlines()[first:]) + "\n")  # starts with the first sonnet's number
    assert read_cs224n_sonnets(with_bom(headerless, tmp_path / "bom.txt")) == read_cs224n_sonnets(headerless)


def classify_args(train: Path, dev: Path, out: Path) -> list[str]:
    return ["train", "--task", "classify", "--train", str(train), "--dev", str(dev), "--template", "{text}",
            "--labels", "0=no,1=yes", *TINY, "--out", str(out)]


@pytest.mark.parametrize("content,needle", [
    ("text,label\nhello,1\nworld\n", "short.csv:3: 1 field(s) where the header has 2"),
    ("text,label\n" + "a" * 200_000 + ",1\nhello,0\n", "short.csv:2: a field longer than"),
    ('text,label\n"an unclosed quote,1\nhello,0\n' + "x" * 200_000 + "\n", "short.csv:2: a field longer than"),
])
def test_a_bad_csv_row_is_one_line_with_its_line(content, needle, tmp_path, cache):
    """A CSV row one field short names its file and line (not "label 'None' has no word"); a field
    past the csv module's limit (an unclosed quote takes in the rest of the file) too, with the fix."""
    short = tmp_path / "short.csv"
    short.write_text(content)
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\nhi there,1\nbye,0\n")
    one_line_error(*cli(*classify_args(short, dev, tmp_path / "run")), needle)
    no_result(tmp_path / "run")


def test_a_parquet_file_that_is_not_parquet_is_one_line(tmp_path, cache):
    bad = tmp_path / "rows.parquet"
    bad.write_text("text,label\nhello,1\n")
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\nhi there,1\nbye,0\n")
    one_line_error(*cli(*classify_args(bad, dev, tmp_path / "run")), "rows.parquet: not a readable Parquet file")
    no_result(tmp_path / "run")


# -- checked before anything is written (issue 24) --------------------------------------------------

def generate_files(tmp_path: Path) -> dict[str, str]:
    rows = [{"prompt": f"Count from {i}:", "completion": " " + " ".join(str(i + k) for k in range(1, 5))} for i in range(10)]
    (tmp_path / "g-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:8]))
    (tmp_path / "g-dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    return {"train": str(tmp_path / "g-train.jsonl"), "dev": str(tmp_path / "g-dev.jsonl")}


def test_a_missing_pairs_file_is_a_missing_file(tmp_path, cache):
    """`--pairs file:PATH` naming a file that is not there is said as such, before anything is written,
    not looked up as a Hugging Face dataset id."""
    files = generate_files(tmp_path)
    one_line_error(*cli(*train_args("generate", files, tmp_path / "run", "--regime", "dpo", "--pairs",
                                    f"file:{tmp_path / 'nope.jsonl'}")), "nope.jsonl: no such file")
    assert not (tmp_path / "run").exists()


def test_a_pairs_file_without_rejected_is_refused_before_anything_is_written(tmp_path, cache):
    """The README's promise: a preference file without `rejected` stops the run before the untrained
    evaluation and before config.json. Catches a check made only when the DPO stage starts."""
    files = generate_files(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Count from 1:", "chosen": " 2 3"}) + "\n")
    one_line_error(*cli(*train_args("generate", files, tmp_path / "run", "--regime", "sft-dpo", "--epochs", "2",
                                    "--handoff-epoch", "1", "--pairs", f"file:{pairs}")), "needs `chosen` and `rejected`",
                   f"{pairs}:1")
    assert not (tmp_path / "run").exists()


def test_a_generate_task_whose_dev_is_its_train_is_refused(tmp_path, cache):
    """As paraphrase, sonnet and classify refuse it: dev metrics on the training examples mean nothing."""
    files = generate_files(tmp_path)
    one_line_error(*cli(*train_args("generate", {"train": files["train"], "dev": files["train"]}, tmp_path / "run")),
                   "every dev example also occurs in train")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value", [("--beta", "0.1"), ("--dpo-lr", "1e-5"), ("--loss-type", "ipo"),
                                        ("--pairs", "hardest")])
def test_dpo_flags_given_with_regime_sft_are_an_error(flag, value, qqp, tmp_path, cache):
    """A DPO setting given on the command line of a run without DPO is a mistake, as --handoff-epoch is;
    the same field from a --config file (a `study best` file, defaults) is a default and is reset."""
    one_line_error(*cli(*train_args("paraphrase", qqp, tmp_path / "run", "--regime", "sft", flag, value)),
                   f"{flag} only applies to DPO", "got regime sft")
    assert not (tmp_path / "run").exists()
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({flag.removeprefix("--").replace("-", "_"): value, "regime": "sft"}))
    from sftdpo.cli import build_parser, config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(conf), "--task", "paraphrase"]))
    assert cfg.regime == "sft"
