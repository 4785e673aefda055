"""`sftdpo export`: the exported directory, loaded only through transformers / PEFT, makes the run's
dev predictions; --keep-checkpoints decides what a finished run keeps."""

import json
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


def test_fft_export_loads_with_from_pretrained_and_predicts_as_the_run(qqp, cache, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "run"
    train(cfg(qqp, epochs=2), run_dir)  # best and final may differ: export the best, compare with its eval
    out = export_run(run_dir, tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    best = [p for _, p, _ in evaluate_run(run_dir, "best")["outputs"]]
    assert plain_predictions(run_dir, model, tok) == best
    from sftdpo.models import load_model

    untrained, _ = load_model("tiny-llama", seed=0)  # the export holds the trained weights, not the start
    ids = torch.tensor([load_run(run_dir).task.dev_ids[0]])
    assert not torch.allclose(untrained(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)
    card = (out / "README.md").read_text()
    assert "tiny-llama" in card and "## Dev metrics" in card and "dev/accuracy" in card and "regime: sft" in card
    assert json.loads((out / "sftdpo_config.json").read_text())["hash"] == json.loads(
        (run_dir / "summary.json").read_text())["run_hash"]


def test_lora_export_adapter_and_merged(qqp, cache, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftdpo.models import load_model

    run_dir = tmp_path / "run"
    c = cfg(qqp, param="lora", lora_rank=4, lora_targets="all-linear", lr=5e-2)
    train(c, run_dir)
    want = run_predictions(run_dir)
    adapter = export_run(run_dir, tmp_path / "adapter")
    assert (adapter / "adapter_config.json").exists() and not (adapter / "model.safetensors").exists()
    base, _ = load_model("tiny-llama", seed=c.seed)  # the base, as sftdpo builds it
    peft_model = PeftModel.from_pretrained(base, adapter)
    tok = AutoTokenizer.from_pretrained(adapter)
    assert plain_predictions(run_dir, peft_model, tok) == want
    merged = export_run(run_dir, tmp_path / "merged", merge=True)
    assert not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert plain_predictions(run_dir, model, AutoTokenizer.from_pretrained(merged)) == want
    # the adapter really matters: the bare base predicts otherwise on some example, or the test proves nothing
    bare, _ = load_model("tiny-llama", seed=c.seed)
    logits_base = bare(input_ids=torch.tensor([load_run(run_dir).task.dev_ids[0]])).logits
    logits_tuned = model(input_ids=torch.tensor([load_run(run_dir).task.dev_ids[0]])).logits
    assert not torch.allclose(logits_base, logits_tuned)


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
        with pytest.raises(SftdpoError, match=f"--keep-checkpoints {keep}: train it again with --keep-checkpoints best"):
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
