"""The CS224N conventions (docs/cs224n.md), each held against a re-implementation of the starter code's
path written for this test (from drew0523/public_cs224n_gpt at 7570cfa: datasets.py, evaluation.py,
paraphrase_detection.py, sonnet_generation.py); `sftdpo preview` and `sftdpo predict`."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from sacrebleu.metrics import CHRF
from sklearn.metrics import accuracy_score, f1_score

from sftdpo.cli import main
from sftdpo.config import RunConfig
from sftdpo.data import load_task_data
from sftdpo.models import load_model, load_tokenizer
from sftdpo.ops.generation import nucleus
from sftdpo.tasks import make_task
from sftdpo.tasks.classify import cs224n_preprocess
from sftdpo.train.loop import train

from conftest import FIX, SONNET_FILES, qqp_files, require_tiny_gpt2


# -- the starter's code paths, re-implemented for the tests ---------------------------------------

def starter_preprocess_string(s):  # datasets.py::preprocess_string
    return ' '.join(s.lower()
                    .replace('.', ' .')
                    .replace('?', ' ?')
                    .replace(',', ' ,')
                    .replace('\'', ' \'')
                    .split())


def starter_train_prompt(s1, s2):  # datasets.py::ParaphraseDetectionDataset.collate_fn
    return f'Question 1: "{s1}"\nQuestion 2: "{s2}\nAre these questions asking the same thing?\n'


def starter_test_prompt(s1, s2):  # datasets.py::ParaphraseDetectionTestDataset.collate_fn
    return f'Is "{s1}" a paraphrase of "{s2}"? Answer "yes" or "no": '


def starter_load_sonnets(path):  # datasets.py::SonnetsDataset._load_sonnets
    with open(path, 'r', encoding='utf-8') as f:
        text = f.read()
    sonnets = re.split(r'\n\s*\d+\s*\n', text)[1:]
    return [s.strip() for s in sonnets]


def starter_top_p_keep(probs_sorted, top_p):  # sonnet_generation.py::SonnetGPT.generate
    cumulative_probs = torch.cumsum(probs_sorted, dim=-1)
    top_p_mask = cumulative_probs <= top_p
    top_p_mask[..., 1:] = top_p_mask[..., :-1].clone()
    top_p_mask[..., 0] = True
    return top_p_mask


def starter_test_sonnet(test_path, gold_path):  # evaluation.py::test_sonnet
    chrf = CHRF()
    generated_sonnets = starter_load_sonnets(test_path)
    true_sonnets = starter_load_sonnets(gold_path)
    max_len = min(len(true_sonnets), len(generated_sonnets))
    return float(chrf.corpus_score(generated_sonnets[:max_len], [true_sonnets[:max_len]]).score)


def read_para_output(path):
    """A para-*-output.csv as written by paraphrase_detection.py::test: `id \\t Predicted_Is_Paraphrase ` and
    `<id>, <pred> ` rows (the id holds a space; split at the last comma)."""
    lines = Path(path).read_text().split("\n")
    assert lines[0] == "id \t Predicted_Is_Paraphrase " and lines[-1] == ""
    rows = [ln.rsplit(", ", 1) for ln in lines[1:-1]]
    assert all(pred.endswith(" ") for _, pred in rows)
    return {i: pred.strip() for i, pred in rows}


# -- conventions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["What's the best way, e.g. to learn?  Don't know.", "A\tB\nC", "Is it 3.5?It's ok,yes",
                                  "curly ’ stays", "   "])
def test_preprocess_is_the_starters(text):
    assert cs224n_preprocess(text) == starter_preprocess_string(text)


def test_paraphrase_prompts_and_label_tokens_are_the_starters(cache, tmp_path):
    require_tiny_gpt2()
    tok = load_tokenizer("tiny-gpt2")
    data = dict(train=str(FIX / "qqp" / "quora-train.csv"), dev=str(FIX / "qqp" / "quora-dev.csv"))
    for conv, pre in (("sftdpo", lambda s: s), ("cs224n", starter_preprocess_string)):
        task = make_task(RunConfig(task="paraphrase", model="tiny-gpt2", conventions=conv, **data), tok)
        for e in task.train:
            assert task.prompt(e) == starter_train_prompt(pre(e.q1), pre(e.q2))
    # the starter's labels: the words, tokenized without a leading space
    ids = tok(["yes", "no"], return_tensors="pt", padding=True, truncation=True)["input_ids"].flatten().tolist()
    assert (task.yes_id, task.no_id) == tuple(ids) == (8505, 3919)
    cfg = RunConfig(conventions="cs224n")
    assert (cfg.preprocess, cfg.predict, cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.prompt_newline, cfg.max_length) == \
        ("cs224n", "argmax", 1.2, 0.9, 128, False, 1024)
    assert RunConfig.from_dict({"conventions": "cs224n", "temperature": 0.7}).temperature == 0.7  # explicit fields win


def test_argmax_prediction_and_its_macro_f1_are_the_starters(cache, tmp_path):
    """An untrained tiny model's argmax is mostly a token that is no label: the starter counts it
    wrong and as a class of its own in macro-F1; so does --predict argmax."""
    require_tiny_gpt2()
    files = qqp_files(tmp_path, 24, 16)
    cfg = RunConfig(task="paraphrase", model="tiny-gpt2", conventions="cs224n", device="cpu", precision="fp32", **files)
    model, tok = load_model("tiny-gpt2")
    model.eval()
    task = make_task(cfg, tok)
    ev = task.evaluate(model, torch.device("cpu"), "fp32")
    y_true, y_pred = [], []
    with torch.no_grad():  # evaluation.py::model_eval_paraphrase, one example at a time
        for e in task.dev:
            enc = tok([task.prompt(e)], return_tensors="pt", padding=True, truncation=True)
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            last = enc["attention_mask"].sum(dim=1) - 1
            logits = out[torch.arange(1), last].numpy()
            y_pred.append(int(np.argmax(logits, axis=1)[0]))
            y_true.append(task.yes_id if e.label == 1 else task.no_id)
    assert ev.metrics["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert ev.metrics["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    stray = sum(p not in (task.yes_id, task.no_id) for p in y_pred) / len(y_pred)
    assert ev.metrics["non_label_rate"] == pytest.approx(stray) and stray > 0


def test_sonnet_prompt_split_and_top_p_are_the_starters(cache):
    cfg = RunConfig(task="sonnet", model="tiny-llama", conventions="cs224n", **SONNET_FILES)
    task = make_task(cfg, load_tokenizer("tiny-llama"))
    assert [s.text for s in task.dev] == starter_load_sonnets(SONNET_FILES["dev"])
    starter_prompts = starter_load_sonnets(FIX / "sonnets" / "sonnets_held_out_dev.txt")
    assert [task.prompt_text(s) for s in task.dev] == starter_prompts  # 3 lines, no trailing newline
    assert all(not p.endswith("\n") and p.count("\n") == 2 for p in starter_prompts)
    g = torch.Generator().manual_seed(0)
    for top_p in (0.5, 0.9):
        logits = torch.randn(8, 3000, generator=g, dtype=torch.float64) * 2
        p, idx = nucleus(logits, top_p)
        probs, order = torch.sort(logits.softmax(-1), descending=True)
        keep = starter_top_p_keep(probs, top_p)
        for r in range(8):
            assert set(idx[r][p[r] > 0].tolist()) == set(order[r][keep[r]].tolist())


# -- sftdpo predict: the course's files, read back as the starter reads them --------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A paraphrase run (LoRA) and a sonnet run (FFT), tiny-gpt2, two epochs each."""
    require_tiny_gpt2()
    root = tmp_path_factory.mktemp("predict")
    cache = root / "cache"
    import os

    os.environ["SFTDPO_CACHE_DIR"] = str(cache)
    files = qqp_files(root, 40, 16)
    common = dict(model="tiny-gpt2", device="cpu", precision="fp32", epochs=2, batch_size=8, eval_batch_size=8)
    para = train(RunConfig(task="paraphrase", param="lora", lr=5e-3, **files, **common), root / "para")
    son = train(RunConfig(task="sonnet", lr=1e-3, max_new_tokens=24, conventions="cs224n", **SONNET_FILES,
                          **{**common, "batch_size": 2}), root / "son")
    yield root, para, son
    os.environ.pop("SFTDPO_CACHE_DIR", None)


def cli(*args):
    return main(["-q", *args])


def test_para_dev_output_reproduces_the_runs_dev_metrics(trained, capsys):
    root, para, _ = trained
    weights = (root / "para" / "checkpoints" / "last" / "weights.safetensors").read_bytes()
    assert cli("predict", str(root / "para"), "--checkpoint", "last") == 0
    preds = read_para_output(root / "para" / "predictions" / "para-dev-output.csv")
    gold = {e.id: e.label for e in load_task_data(RunConfig.from_dict(
        json.loads((root / "para" / "config.json").read_text())["config"])).dev}
    ids = list(preds)
    assert set(ids) == set(gold) and len(ids) > 8
    y_true, y_pred = [gold[i] for i in ids], [int(preds[i]) for i in ids]
    assert accuracy_score(y_true, y_pred) == para["dev/accuracy"]
    assert f1_score(y_true, y_pred, average="macro") == pytest.approx(para["dev/macro_f1"], abs=1e-12)
    # a LoRA run predicts with its adapter, never merged into what it saved
    assert (root / "para" / "checkpoints" / "last" / "weights.safetensors").read_bytes() == weights
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(str(root / "para" / "checkpoints" / "last" / "weights.safetensors")))


def test_para_test_output_with_either_prompt(trained):
    root, _, _ = trained
    test = FIX / "qqp" / "quora-test-student.csv"
    for prompt in ("train", "cs224n"):
        out = root / f"test-{prompt}"
        assert cli("predict", str(root / "para"), "--split", "test", "--test", str(test), "--test-prompt", prompt,
                   "--out", str(out)) == 0
        preds = read_para_output(out / "para-test-output.csv")
        assert list(preds) == ["601 a1b2c3d4-0000-4111-8222-933344455566", "602 b2c3d4e5-1111-4222-8333-a44455566677"]
        assert set(preds.values()) <= {"0", "1"}


def test_generated_sonnets_dev_reproduces_the_runs_chrf(trained):
    root, _, son = trained
    assert cli("predict", str(root / "son"), "--checkpoint", "last") == 0
    path = root / "son" / "predictions" / "generated_sonnets_dev.txt"
    text = path.read_text()
    assert text.startswith("--Generated Sonnets-- \n\n\n0\n")
    assert starter_test_sonnet(path, SONNET_FILES["dev"]) == pytest.approx(son["dev/chrf"], abs=1e-9)
    assert cli("predict", str(root / "son"), "--split", "test", "--test", str(FIX / "sonnets" / "sonnets_held_out.txt")) == 0
    gens = starter_load_sonnets(root / "son" / "predictions" / "generated_sonnets.txt")
    prompts = starter_load_sonnets(FIX / "sonnets" / "sonnets_held_out.txt")
    assert len(gens) == len(prompts) and all(g.startswith(p) for g, p in zip(gens, prompts))


def test_preview_shows_what_the_model_sees(capsys, cache):
    require_tiny_gpt2()
    data = dict(train=str(FIX / "qqp" / "quora-train.csv"), dev=str(FIX / "qqp" / "quora-dev.csv"))
    assert cli("preview", "--task", "paraphrase", "--model", "tiny-gpt2", "--conventions", "cs224n", "--n", "1",
               "--train", data["train"], "--dev", data["dev"]) == 0
    out = capsys.readouterr().out
    assert "0='no' (token 3919), 1='yes' (token 8505)" in out and "prediction: argmax" in out
    assert 'Question 1: \\"what is the best way to learn juggling ?\\"' in out or "learn juggling ?" in out
    assert "SFT: the loss is the cross-entropy of token" in out and "DPO: chosen" in out
    assert cli("preview", "--task", "sonnet", "--model", "tiny-gpt2", "--n", "2", "--prompt-newline", "false",
               "--train", SONNET_FILES["train"], "--dev", SONNET_FILES["dev"]) == 0
    out = capsys.readouterr().out
    assert out.count("\ntrain ") == 2 and out.count("\ndev ") == 2 and "the loss on positions 1.." in out
    assert "response = chosen" in out and "decoding: temperature" in out
