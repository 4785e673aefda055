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
