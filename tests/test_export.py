"""`sftdpo export`: the exported directory, loaded only through transformers / PEFT, makes the run's
dev predictions; --keep-checkpoints decides what a finished run keeps."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from sftdpo.cli import main
from sftdpo.config import RunConfig, SftdpoError
from sftdpo.export import export_run
from sftdpo.train.loop import Run, evaluate_run, load_run, train

from conftest import qqp_files


@pytest.fixture
def qqp(tmp_path):
    return qqp_files(tmp_path, 24, 12)


def cfg(qqp, **kw):
    base = dict(task="paraphrase", model="tiny-llama", device="cpu", precision="fp32", batch_size=8, lr=3e-3,
                epochs=1, eval_batch_size=8, eval_init=False, **qqp)
    return RunConfig(**{**base, **kw})


def run_predictions(run_dir: Path) -> list[str]:
    return [json.loads(line)["prediction"] for line in (run_dir / "dev_outputs.jsonl").read_text().splitlines()]


@torch.no_grad()
def plain_predictions(run_dir: Path, model, tok) -> list[str]:
    """The run's dev prompts (sftdpo's template) through a model and tokenizer as transformers loads
    them: the label word with the larger next-token logit."""
    task = load_run(run_dir).task
    model.eval()
    preds = []
    for e, want_ids in zip(task.dev, task.dev_ids):
        ids = tok(task.prompt(e), add_special_tokens=False).input_ids
        assert ids == want_ids  # the exported tokenizer reads the prompt as the run did
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        preds.append(task.label_values[int(logits[task.label_ids].argmax())])
    return preds


LABELS = [("0", "no"), ("1", "yes")]


def test_fft_export_loads_with_from_pretrained_and_predicts_as_the_run(peaked_run, gpt2_base, cache, tmp_path):
    """A run whose dev accuracy peaks mid-run (tests/oracle.py::PEAKED), exported (the best checkpoint by
    default) and loaded with transformers' from_pretrained alone: its tokenizer reads the CS224N prompt
    (written out in oracle.py) as the run did, and its predictions equal, by id, the plain evaluator's on
    checkpoints/best, score the summary's best/dev/accuracy with scikit-learn, predict both labels,
    and differ from the last epoch's. Catches the last (or the untrained) weights exported, the
    tokenizer or the config of another model, a model card that names another run."""
    from sklearn.metrics import accuracy_score
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import oracle
    from oracle import PEAKED

    run_dir = peaked_run["run"]
    out = export_run(run_dir, tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel"
    dev = oracle.paraphrase_dev(peaked_run["files"])
    prompts = oracle.paraphrase_prompts(dev)
    exported = {i: p for i, (p, _) in oracle.cloze_predictions(model, tok, prompts, LABELS).items()}
    best = oracle.cloze_predictions(oracle.load_run_model(gpt2_base, run_dir, "best"), oracle.load_tokenizer(gpt2_base),
                                    prompts, LABELS)
    last = oracle.cloze_predictions(oracle.load_run_model(gpt2_base, run_dir, "last"), oracle.load_tokenizer(gpt2_base),
                                    prompts, LABELS)
    assert exported == {i: p for i, (p, _) in best.items()}
    assert min(Counter(exported.values())[v] for v, _ in LABELS) >= 3, Counter(exported.values())
    assert sum(exported[i] != last[i][0] for i in dev) >= 3  # the test tells best from last
    summary = json.loads((run_dir / "summary.json").read_text())
    ids = sorted(dev)
    assert summary["best/dev/accuracy"] == pytest.approx(accuracy_score([dev[i]["label"] for i in ids],
                                                                        [exported[i] for i in ids]), abs=1e-12)
    card = (out / "README.md").read_text()
    assert str(gpt2_base) in card and "## Dev metrics" in card and "dev/accuracy" in card and f"SFT for {PEAKED['handoff_epoch']} epochs, then DPO" in card
    assert f"best epoch: {summary['best_epoch']}" in card
    assert json.loads((out / "sftdpo_config.json").read_text())["hash"] == summary["run_hash"]


def test_lora_export_adapter_and_merged(gpt2_base, cache, tmp_path):
    """A LoRA run (GPT-2's fused attention input adapted, 2 epochs) exported as a PEFT adapter and as a
    merged model: the adapter on the base loaded by transformers (PeftModel.from_pretrained), and the
    merged model by from_pretrained alone, predict, by id, what the plain evaluator predicts with the
    best checkpoint's adapter weights in a PEFT model configured in oracle.py (merging moves logits by
    fp32 rounding only: ties within it excepted); both labels are predicted several times. Catches an
    adapter exported without its trained weights, another checkpoint's adapter, a merge that drops or
    doubles the adapter (alpha / r scaling), an adapter_config with other targets."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import oracle

    files = oracle.qqp_files(tmp_path)
    run_dir = tmp_path / "run"
    c = RunConfig(task="paraphrase", model=str(gpt2_base), **files, device="cpu", precision="fp32", batch_size=8,
                  eval_batch_size=8, eval_init=False, epochs=2, lr=3e-2, param="lora", lora_rank=4, lora_alpha=16.0,
                  lora_targets="c_attn", lora_dropout=0.1)
    train(c, run_dir)
    dev = oracle.paraphrase_dev(files)
    prompts = oracle.paraphrase_prompts(dev)
    want = oracle.cloze_predictions(oracle.load_run_model(gpt2_base, run_dir, "best", lora=oracle.LORA_GPT2_C_ATTN),
                                    oracle.load_tokenizer(gpt2_base), prompts, LABELS)
    assert min(Counter(p for p, _ in want.values())[v] for v, _ in LABELS) >= 3
    adapter = export_run(run_dir, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").exists() and not (adapter / "model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(gpt2_base), adapter).eval()
    tok = AutoTokenizer.from_pretrained(adapter)
    got = {i: p for i, (p, _) in oracle.cloze_predictions(peft_model, tok, prompts, LABELS).items()}
    assert oracle.disagreements(got, want, "fp32")[0] == []
    merged = export_run(run_dir, tmp_path / "merged", merge=True)
    assert not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    got = {i: p for i, (p, _) in oracle.cloze_predictions(model, AutoTokenizer.from_pretrained(merged), prompts, LABELS).items()}
    wrong, ties = oracle.disagreements(got, want, "fp32")
    assert not wrong and ties <= 1
    # the adapter matters: the bare base predicts otherwise on some example
    bare = oracle.cloze_predictions(AutoModelForCausalLM.from_pretrained(gpt2_base).eval(), tok, prompts, LABELS)
    assert sum(bare[i][0] != want[i][0] for i in dev) >= 3


@pytest.mark.slow
def test_smollm2_exports_as_a_plain_llama_model(cache, qqp, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    train(cfg(qqp, model="smollm2-135m", lr=1e-5, max_train_examples=8, max_dev_examples=6), run_dir)
    out = export_run(run_dir, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(out)
    assert plain_predictions(run_dir, model, AutoTokenizer.from_pretrained(out)) == run_predictions(run_dir)
    assert "dequantized from its Q4_1 GGUF" in (out / "README.md").read_text()


def test_export_errors_are_one_line_and_write_nothing(qqp, cache, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    train(cfg(qqp), run_dir)
    with pytest.raises(SftdpoError, match="--merge applies to LoRA runs"):
        export_run(run_dir, tmp_path / "x", merge=True)
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SftdpoError, match="exists and is not empty"):
        export_run(run_dir, tmp_path / "full")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()  # the training's own lines (printed when an earlier test set logging up) are not export's
    assert main(["export", str(run_dir), "--out", str(tmp_path / "y"), "--push-to-hub", "me/model"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--push-to-hub me/model needs the Hugging Face hub" in err
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize("keep, left", [("all", {"best", "last"}), ("best", {"best"}), ("last", {"last"}), ("none", set())])
def test_keep_checkpoints_decides_what_a_finished_run_keeps(qqp, cache, tmp_path, keep, left):
    run_dir = tmp_path / "run"
    c = cfg(qqp, epochs=2, keep_checkpoints=keep)

    def crash(epoch):
        if epoch == 1:
            assert (run_dir / "checkpoints" / "last" / "training_state.pt").exists()  # resumable, whatever the policy
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Run(c, run_dir, on_checkpoint=crash).train()
    train(c, run_dir)  # resumes and finishes
    ckpt = run_dir / "checkpoints"
    assert ({p.name for p in ckpt.iterdir()} if ckpt.exists() else set()) == left
    assert json.loads((run_dir / "summary.json").read_text())["dev/accuracy"] is not None
    if "best" not in left:
        with pytest.raises(SftdpoError, match=f"--keep-checkpoints {keep}: train it again with --keep-checkpoints best "
                                              r"\(or all\) and a new --out"):
            evaluate_run(run_dir, "best")


# -- issue 24: what predict and export hand out (finished runs only, advice that works, atomic writes) ----

def _advised(err: str) -> list[str]:
    """The command an error line advises (between backticks), as argv for main()."""
    import shlex

    return shlex.split(err.split("`")[1])[1:]


def test_predict_and_export_refuse_an_unfinished_run_and_say_how_to_finish_it(qqp, cache, tmp_path, capsys):
    """A run interrupted after 1 of 3 epochs: predict and export refuse in one line (they wrote complete-
    looking course files and a model card saying "3 epochs" before), nothing written; the command the
    line gives resumes the run, after which both work."""
    run_dir = tmp_path / "run"

    def crash(epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Run(cfg(qqp, epochs=3), run_dir, on_checkpoint=crash).train()
    capsys.readouterr()  # what training logged (through an earlier test's handler, maybe: main() resets it)
    for argv in (["predict", str(run_dir)], ["export", "--run", str(run_dir), "--out", str(tmp_path / "model")]):
        assert main(["-q", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{run_dir} is not finished (1 of 3 epochs trained): finish it with" in err
    assert not (run_dir / "predictions").exists() and not (tmp_path / "model").exists()
    assert main(["-q", *_advised(err)]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 3
    assert main(["-q", "predict", str(run_dir)]) == 0 and (run_dir / "predictions" / "para-dev-output.csv").exists()
    assert main(["-q", "export", str(run_dir), "--out", str(tmp_path / "model")]) == 0


def test_export_without_its_weights_advises_a_retrain_that_works(qqp, cache, tmp_path, capsys):
    """--keep-checkpoints none: export says to retrain into a NEW directory (keep_checkpoints is no part of
    the run's identity, so training again on the same --out returns the finished run, still without
    weights: the old advice); the advised command, with a new directory, trains the same run again, with
    the same dev metrics, and that one exports."""
    run_dir = tmp_path / "run"
    done = train(cfg(qqp, keep_checkpoints="none"), run_dir)
    capsys.readouterr()
    assert main(["-q", "export", str(run_dir), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no best weights (it kept --keep-checkpoints none)" in err
    assert "--keep-checkpoints best --out NEW_DIR` (the same --out returns the finished run unchanged)" in err
    train(cfg(qqp, keep_checkpoints="best"), run_dir)  # the same --out: nothing retrained, still no weights
    assert not (run_dir / "checkpoints").exists()
    argv = _advised(err)
    argv[argv.index("NEW_DIR")] = str(tmp_path / "again")
    assert main(["-q", *argv]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["run_hash"] == done["run_hash"] and again["dev/accuracy"] == done["dev/accuracy"]
    assert main(["-q", "export", str(tmp_path / "again"), "--out", str(tmp_path / "model")]) == 0


def _subprocess_env(**extra) -> dict:
    import os

    import sftdpo

    src = str(Path(sftdpo.__file__).resolve().parents[1])  # the code under test (scripts/mutants.py: a scratch copy)
    return {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1", **extra}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_failed_write_leaves_the_previous_predictions_and_export(qqp, cache, tmp_path):
    """predict and export again into their earlier outputs in a process whose file-size limit
    (RLIMIT_FSIZE, half the predictions file) makes every write fail: each says so in one line, exit 2,
    and the earlier file and export directory are byte for byte as they were, no temporary left. A
    re-export into an earlier export replaces it when it can. Catches writing in place (a file cut at the
    limit) and an export that deletes the old directory before the new one is whole."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    train(cfg(qqp), run_dir)
    preds, model = tmp_path / "preds", tmp_path / "model"
    assert main(["-q", "predict", str(run_dir), "--out", str(preds)]) == 0
    assert main(["-q", "export", str(run_dir), "--out", str(model)]) == 0
    assert main(["-q", "export", str(run_dir), "--out", str(model)]) == 0  # an earlier export is replaced
    before = _snapshot(preds), _snapshot(model)
    limit = len(before[0]["para-dev-output.csv"]) // 2
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us\n"
              f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
              "from sftdpo.cli import main\n"
              f"print(main(['-q', 'predict', {str(run_dir)!r}, '--out', {str(preds)!r}]),"
              f" main(['-q', 'export', {str(run_dir)!r}, '--out', {str(model)!r}]))\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env=_subprocess_env())
    assert res.stdout.split() == ["2", "2"], res.stderr[-2000:]
    errors = res.stderr.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("sftdpo: error: could not write ") for e in errors), errors
    assert "para-dev-output.csv" in errors[0] and str(model) in errors[1]
    assert (_snapshot(preds), _snapshot(model)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dev.csv", "model", "preds", "run", "train.csv"]


def test_predict_out_elsewhere_works_on_a_read_only_run(qqp, cache, tmp_path):
    """A finished run in a directory nobody may write to (a shared results folder): predict --out elsewhere
    writes its file and touches nothing in the run; without --out it says in one line where it cannot
    write. (Root ignores permissions: as root the run directory is a read-only bind mount of itself in a
    mount namespace of the command's own.)"""
    import os
    import shlex
    import shutil
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    train(cfg(qqp), run_dir)
    for p in [run_dir, *run_dir.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    wrap: list[str] = []
    if os.geteuid() == 0:
        ro = f"mount --bind {shlex.quote(str(run_dir))} {shlex.quote(str(run_dir))} && " \
             f"mount -o remount,bind,ro {shlex.quote(str(run_dir))} && exec \"$@\""
        wrap = ["unshare", "-m", "--propagation", "private", "sh", "-c", ro, "sh"]
        if not shutil.which("unshare") or subprocess.run([*wrap, "true"], capture_output=True).returncode != 0:
            pytest.skip("running as root without a mount namespace (unshare -m): cannot make the run read-only")
    snapshot = lambda: {str(p): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)  # noqa: E731
                        for p in [run_dir, *run_dir.rglob("*")]}
    before = snapshot()

    def predict(*extra):
        return subprocess.run([*wrap, sys.executable, "-m", "sftdpo.cli", "-q", "predict", str(run_dir), *extra],
                              capture_output=True, text=True, timeout=600, env=_subprocess_env())

    try:
        res = predict("--out", str(tmp_path / "out"))
        assert res.returncode == 0, res.stderr[-2000:]
        assert (tmp_path / "out" / "para-dev-output.csv").read_text().startswith("id \t Predicted_Is_Paraphrase \n")
        res = predict()
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-2000:]
        assert f"--out {run_dir / 'predictions'} cannot be created" in res.stderr
        assert snapshot() == before
    finally:
        for p in [run_dir, *run_dir.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
