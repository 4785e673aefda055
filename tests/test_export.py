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
