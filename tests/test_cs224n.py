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
from sftdpo.config import RunConfig, SftdpoError
from sftdpo.data import load_task_data
from sftdpo.models import load_model, load_tokenizer
from sftdpo.ops.generation import nucleus
from sftdpo.tasks import make_task
from sftdpo.tasks.classify import cs224n_preprocess
from sftdpo.predict import predict_run
from sftdpo.train.loop import load_run, train

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


# -- issue 27: the course files as the starter writes them, the course recipe, the CLI around them -----

def starter_load_paraphrase_data(path, split="train"):  # datasets.py::load_paraphrase_data
    import csv

    out = []
    with open(path, 'r') as fp:
        for record in csv.DictReader(fp, delimiter='\t'):
            if split == 'test':
                out.append((starter_preprocess_string(record['sentence1']),
                            starter_preprocess_string(record['sentence2']), record['id'].lower().strip()))
                continue
            try:
                sent_id = record['id'].lower().strip()
                out.append((starter_preprocess_string(record['sentence1']), starter_preprocess_string(record['sentence2']),
                            int(float(record['is_duplicate'])), sent_id))
            except:  # noqa: E722 - the starter's own bare except
                pass
    return out


def starter_para_file(ids, preds) -> str:  # paraphrase_detection.py::test's writing loop
    return "id \t Predicted_Is_Paraphrase \n" + "".join(f"{p}, {s} \n" for p, s in zip(ids, preds))


def starter_sonnet_file(tok, prompts, new_ids) -> str:  # sonnet_generation.py::generate_submission_sonnets
    out = "--Generated Sonnets-- \n\n"
    for sonnet_id, (prompt, new) in enumerate(zip(prompts, new_ids)):
        encoding = tok(prompt, return_tensors='pt', padding=False, truncation=True)
        decoded_output = tok.decode(encoding['input_ids'][0].tolist() + list(new))
        out += f"\n{sonnet_id}\n" + f'{decoded_output}\n\n'
    return out


@torch.no_grad()
def starter_argmax_ids(model, tok, prompts) -> list[int]:
    """evaluation.py::model_eval_paraphrase's prediction, one prompt at a time: the argmax over the whole
    vocabulary of the logits at the last non-pad position (models/gpt2.py::GPT2Model.forward)."""
    model.eval()
    preds = []
    for p in prompts:
        enc = tok([p], return_tensors="pt", padding=True, truncation=True)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        last = enc["attention_mask"].sum(dim=1) - 1
        preds.append(int(np.argmax(logits[torch.arange(1), last].numpy(), axis=1)[0]))
    return preds


def test_a_stray_token_never_reads_as_a_label():
    """Catches a binary file writing a stray token's own id (GPT-2's token 1 is `"`, a likely answer after a
    prompt full of quotes: it would read as "paraphrase"), and a token-id file writing 1/0 for the labels."""
    from sftdpo.predict import para_prediction

    token_of = {"0": 3919, "1": 8505}
    preds = ["1", "0", "token:1", "token:0", "token:46537"]
    assert [para_prediction(p, token_of, "token-id") for p in preds] == ["8505", "3919", "1", "0", "46537"]
    assert [para_prediction(p, token_of, "binary") for p in preds] == ["1", "0", "-1", "-1", "-1"]


def test_the_cs224n_preset_is_fp32_and_the_recipe_is_the_starters_set_up():
    """The starter trains and evaluates in fp32 and its get_args()/train() fix lr 1e-5 (AdamW, no scheduler,
    no clip_grad), 10 epochs, batch 8, seed 11711, gpt2: catches a recipe or preset that drops one of them
    (e.g. leaves sftdpo's warm-up and linear decay, or bf16 autocast)."""
    from sftdpo.cli import build_parser, config_from_args

    assert RunConfig(conventions="cs224n").precision == "fp32" and RunConfig().precision == "auto"
    assert RunConfig(conventions="cs224n", precision="bf16").precision == "bf16"  # explicit wins
    cfg = config_from_args(build_parser().parse_args(["train", "--recipe", "cs224n-starter", "--task", "sonnet"]))
    assert (cfg.model, cfg.param, cfg.regime, cfg.lr, cfg.epochs, cfg.batch_size, cfg.grad_accum, cfg.seed) == \
        ("gpt2", "fft", "sft", 1e-5, 10, 8, 1, 11711)
    assert (cfg.schedule, cfg.warmup_ratio, cfg.max_grad_norm, cfg.weight_decay, cfg.precision, cfg.conventions) == \
        ("constant", 0.0, 0.0, 0.0, "fp32", "cs224n")
    assert (cfg.temperature, cfg.top_p, cfg.max_new_tokens, cfg.prompt_newline) == (1.2, 0.9, 128, False)
    flags = config_from_args(build_parser().parse_args(["train", "--recipe", "cs224n-starter", "--model", "tiny-gpt2",
                                                        "--epochs", "2"]))
    assert (flags.model, flags.epochs, flags.lr) == ("tiny-gpt2", 2, 1e-5)  # flags given win, the rest stays


def test_course_reader_keeps_the_starters_rows_and_ids(tmp_path):
    """The CS224N reader against the starter's load_paraphrase_data: the same rows survive (a row with an
    extra field kept, a row cut short skipped) with the same lower-cased ids and labels, the same texts
    after preprocess_string, except where docs/cs224n.md says sftdpo differs: a doubly escaped question
    is un-escaped. Catches skipping extra-field rows or keeping ids as written."""
    import csv

    from sftdpo.data import read_qqp

    path = tmp_path / "quora-dev.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "sentence1", "sentence2", "is_duplicate"])
        w.writerow(["11 AB12-Cd34", "What is X?", "What's X?", "1.0"])
        w.writerow(["12 ef56", "How do birds fly?", "Can pigs fly?", "0.0", "a stray field"])
        w.writerow(["13 gh78", "A question cut short"])
        w.writerow(["14 ij90", '"Do I need ""the"" here?"', "Is it needed?", "0.0"])
    ours, fmt = read_qqp(path)
    theirs = starter_load_paraphrase_data(path)
    assert fmt == "cs224n-gpt" and [e.id for e in ours] == [r[3] for r in theirs] == ["11 ab12-cd34", "12 ef56", "14 ij90"]
    assert [e.label for e in ours] == [r[2] for r in theirs]
    texts = [(cs224n_preprocess(e.q1), cs224n_preprocess(e.q2)) for e in ours]
    assert texts[:2] == [r[:2] for r in theirs[:2]]
    assert texts[2][0] == cs224n_preprocess('Do I need "the" here?') != theirs[2][0]  # sftdpo un-escapes


def test_preview_of_gpt2_works_offline_from_the_data_directory(cache, monkeypatch, capsys):
    """`preview --model gpt2` with no network and no hub cache reads the GPT-2 tokenizer files of the data
    directory (it failed before): the starter's prompt, with GPT-2's yes/no tokens 8505/3919."""
    from sftdpo.config import find_in_data_dirs

    if find_in_data_dirs("gpt2-tokenizer") is None:
        pytest.skip("no gpt2-tokenizer/ in the data directory (set SFTDPO_DATA_DIR)")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache / "no-hub-cache"))
    assert cli("preview", "--task", "paraphrase", "--model", "gpt2", "--conventions", "cs224n", "--n", "1",
               "--train", str(FIX / "qqp" / "quora-train.csv"), "--dev", str(FIX / "qqp" / "quora-dev.csv")) == 0
    out = capsys.readouterr().out
    assert "model gpt2's tokenizer" in out and "0='no' (token 3919), 1='yes' (token 8505)" in out


@pytest.mark.parametrize("cmd", ["eval", "predict", "export"])
def test_every_command_taking_a_run_accepts_RUN_or_run(cmd):
    """`eval --run RUN` and `predict RUN` / `export RUN`: each command takes both forms, refuses two
    different directories and none."""
    from sftdpo.cli import build_parser, run_arg
    from sftdpo.config import SftdpoError

    p = build_parser()
    extra = ["--out", "x"] if cmd == "export" else []
    assert run_arg(p.parse_args([cmd, "R", *extra])) == run_arg(p.parse_args([cmd, "--run", "R", *extra])) == "R"
    with pytest.raises(SftdpoError, match="two run directories given"):
        run_arg(p.parse_args([cmd, "R", "--run", "S", *extra]))
    with pytest.raises(SftdpoError, match=f"give the run directory: sftdpo {cmd} RUN"):
        run_arg(p.parse_args([cmd, *extra]))


@pytest.fixture(scope="module")
def argmax_runs(tmp_path_factory):
    """Two finished --conventions cs224n (argmax) paraphrase runs of tiny-gpt2 on the same data: one trained
    until it answers yes and no (lr 2e-3), one left as initialised (lr 0), whose argmax is a stray token."""
    require_tiny_gpt2()
    root = tmp_path_factory.mktemp("argmax")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTDPO_CACHE_DIR", str(root / "cache"))
        files = qqp_files(root, 40, 40)
        common = dict(task="paraphrase", model="tiny-gpt2", conventions="cs224n", device="cpu", batch_size=8,
                      eval_batch_size=8, eval_init=False, **files)
        train(RunConfig(lr=2e-3, epochs=2, **common), root / "trained")
        train(RunConfig(lr=0.0, epochs=1, **common), root / "untrained")
        yield root, files


@pytest.mark.parametrize("label_format", ["token-id", "binary"])
def test_para_dev_file_is_the_starters_bytes(argmax_runs, label_format):
    """Both runs' para-dev-output.csv, byte for byte, against the starter's writing loop fed with its own
    prediction rule (model_eval_paraphrase, one example at a time through transformers' forward) over its
    own reading of the dev file, less the pairs sftdpo drops as train overlaps (docs/cs224n.md). token-id
    (the cs224n default) writes the argmax id; binary 1/0 and -1 for a stray. Catches 1/0 in place of
    the ids, a stray id read as a label, rows out of order or misaligned, a wrong checkpoint."""
    root, files = argmax_runs
    seen = set()
    for name in ("trained", "untrained"):
        run_dir = root / name
        run = load_run(run_dir, "best")
        dev = {e.id for e in run.task.dev}
        rows = [r for r in starter_load_paraphrase_data(files["dev"]) if r[3] in dev]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert len(starter_load_paraphrase_data(files["dev"])) - len(rows) == summary["dev_dropped_overlap"]
        ids = starter_argmax_ids(run.model, run.tok, [starter_train_prompt(r[0], r[1]) for r in rows])
        seen |= {"yes" if i == 8505 else "no" if i == 3919 else "stray" for i in ids}
        want = ids if label_format == "token-id" else [{8505: 1, 3919: 0}.get(i, -1) for i in ids]
        args = ("--label-format", label_format) if label_format != "token-id" else ()  # token-id: the default
        assert cli("predict", str(run_dir), "--out", str(root / f"{name}-{label_format}"), *args) == 0
        got = (root / f"{name}-{label_format}" / "para-dev-output.csv").read_bytes()
        assert got == starter_para_file([r[3] for r in rows], want).encode()
    assert seen == {"yes", "no", "stray"}  # or the files prove less than they seem to


def test_sonnet_files_are_the_starters_bytes_for_the_same_tokens(trained, monkeypatch):
    """generated_sonnets_dev.txt and generated_sonnets.txt, byte for byte, against generate_submission_sonnets'
    writing fed with the same tokens: the prompt from the held-out file tokenized as the starter does,
    decoded with the new tokens, unstripped, numbered 0, 1, ... First the run's own samples; then new
    tokens that end in white space (a sampled sonnet cut at --max-new-tokens after a line break, which
    these few samples need not show). Catches stripping (the old files), another header, numbering by
    sonnet number, a missing blank line."""
    from sftdpo.tasks.generate import GenerateTask

    root, _, son = trained
    run = load_run(root / "son", "last")
    cfg, task = run.cfg, run.task
    sample = dict(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    for split, held_out, name in (("dev", "sonnets_held_out_dev.txt", "generated_sonnets_dev.txt"),
                                  ("test", "sonnets_held_out.txt", "generated_sonnets.txt")):
        prompts = starter_load_sonnets(FIX / "sonnets" / held_out)
        assert cli("predict", str(root / "son"), "--checkpoint", "last", "--split", split, "--test",
                   str(FIX / "sonnets" / held_out), "--out", str(root / "bytes")) == 0
        new = task.generate_ids(run.model, prompts, run.device, run.precision, **sample,
                                num_samples=cfg.num_samples if split == "dev" else 1)
        assert (root / "bytes" / name).read_bytes() == starter_sonnet_file(run.tok, prompts, new).encode()
    ending = run.tok("\nAnd so the river runs ,  \n\n").input_ids
    monkeypatch.setattr(GenerateTask, "generate_ids", lambda self, model, prompts, *a, **k: [ending for _ in prompts])
    assert cli("predict", str(root / "son"), "--checkpoint", "last", "--out", str(root / "ws")) == 0
    prompts = starter_load_sonnets(FIX / "sonnets" / "sonnets_held_out_dev.txt")
    want = starter_sonnet_file(run.tok, prompts, [ending] * len(prompts))
    assert (root / "ws" / "generated_sonnets_dev.txt").read_bytes() == want.encode() and " \n\n\n\n\n1\n" in want


def test_a_cut_sonnet_dev_set_is_written_only_where_it_pairs(cache, tmp_path):
    """The starter's test_sonnet pairs the file's i-th sonnet with the dev file's i-th: a run evaluated on
    dev sonnets 40 and 42 of 40-43 (--max-dev-examples 2) would be scored against 40 and 41, so predict
    refuses in one line and writes nothing; a run on the first three (--max-dev-examples 3) pairs
    correctly, and the starter's score of its file is the run's dev chrF."""
    require_tiny_gpt2()
    lines = [ln for ln in (FIX / "sonnets" / "sonnets.txt").read_text().splitlines()
             if ln.strip() and not ln.strip().isdigit()][3:]
    dev = tmp_path / "TRUE_dev.txt"
    dev.write_text("Header\n\n" + "\n\n".join(f"{40 + i}\n\n" + "\n".join(lines[i:i + 6]) for i in range(4)) + "\n")
    common = dict(task="sonnet", model="tiny-gpt2", conventions="cs224n", device="cpu", lr=1e-3, epochs=1,
                  batch_size=2, max_new_tokens=8, eval_init=False, train=SONNET_FILES["train"], dev=str(dev))
    train(RunConfig(max_dev_examples=2, **common), tmp_path / "two")
    with pytest.raises(SftdpoError, match=r"evaluated on 2 of the 4 dev sonnets .*: 40, 42\); the starter's test_sonnet "
                                          r"pairs the file's i-th sonnet with the i-th true one \(40, 41, 42, \.\.\.\)"):
        predict_run(tmp_path / "two", out=tmp_path / "two-out")
    assert not (tmp_path / "two-out" / "generated_sonnets_dev.txt").exists()
    three = train(RunConfig(max_dev_examples=3, **common), tmp_path / "three")
    path = predict_run(tmp_path / "three", checkpoint="last")
    assert starter_test_sonnet(path, dev) == pytest.approx(three["dev/chrf"], abs=1e-9)


def test_recipe_cs224n_starter_from_the_course_files_to_the_submission_files(cache, tmp_path, capsys):
    """`sftdpo train --recipe cs224n-starter --task paraphrase|sonnet`, one command per task from the course
    files (test input beside --train, as in the course's data/ folder) to its two course files, with the
    starter's set-up (lr constant at every logged step, no warm-up; fp32; seed 11711), read back the
    starter's way: para-dev-output.csv scores the best epoch's dev accuracy on the gold token ids, the test
    file holds every test id with the starter's test prompt's argmax, generated_sonnets_dev.txt scores the
    last epoch's chrF under test_sonnet. Then the weights are swapped under the files: the best checkpoint
    replaced by the untrained weights and the same command run again rewrites the paraphrase files from
    them (the untrained accuracy) and leaves the sonnet files unchanged (they come from the last epoch).
    Catches the recipe losing a setting, sonnets from the best epoch or paraphrase from the last, a test
    file on the train template. (--model tiny-gpt2 and a larger --lr so that training changes the answers.)"""
    require_tiny_gpt2()
    import shutil

    from sftdpo.models import load_model
    from sftdpo.train.checkpoint import save_weights

    course = tmp_path / "data"  # the course's data/ folder: train, dev and test files side by side
    course.mkdir()
    files = qqp_files(course, 40, 24)
    shutil.copy(FIX / "qqp" / "quora-test-student.csv", course / "quora-test-student.csv")
    for f in ("sonnets.txt", "TRUE_sonnets_held_out_dev.txt", "sonnets_held_out.txt"):
        shutil.copy(FIX / "sonnets" / f, course / f)
    small = ["--model", "tiny-gpt2", "--epochs", "2", "--max-new-tokens", "24"]
    para = ["train", "--recipe", "cs224n-starter", "--task", "paraphrase", "--train", files["train"], "--dev",
            files["dev"], "--lr", "2e-3", "--out", str(tmp_path / "para"), *small]
    son = ["train", "--recipe", "cs224n-starter", "--task", "sonnet", "--train", str(course / "sonnets.txt"), "--dev",
           str(course / "TRUE_sonnets_held_out_dev.txt"), "--lr", "1e-3", "--batch-size", "2",
           "--out", str(tmp_path / "son"), *small]
    assert cli(*para) == 0 and cli(*son) == 0
    out = capsys.readouterr().out
    files_para = [tmp_path / "para" / "predictions" / n for n in ("para-dev-output.csv", "para-test-output.csv")]
    files_son = [tmp_path / "son" / "predictions" / n for n in ("generated_sonnets_dev.txt", "generated_sonnets.txt")]
    assert all(f"course file                  {p}" in out for p in files_para + files_son)
    for task in ("para", "son"):
        cfg = json.loads((tmp_path / task / "config.json").read_text())
        assert cfg["precision"] == "fp32" and cfg["config"]["seed"] == 11711 and cfg["config"]["max_grad_norm"] == 0
        lrs = {r["lr"] for r in map(json.loads, (tmp_path / task / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"}
        assert lrs == {2e-3 if task == "para" else 1e-3}  # constant from the first logged step: no warm-up, no decay
    p_sum = json.loads((tmp_path / "para" / "summary.json").read_text())
    s_sum = json.loads((tmp_path / "son" / "summary.json").read_text())

    gold = {r[3]: (8505 if r[2] == 1 else 3919) for r in starter_load_paraphrase_data(files["dev"])}

    def dev_accuracy() -> float:
        preds = read_para_output(files_para[0])
        return accuracy_score([gold[i] for i in preds], [int(p) for p in preds.values()])

    assert dev_accuracy() == p_sum["best/dev/accuracy"] and p_sum["best/dev/accuracy"] > p_sum["init/dev/accuracy"]
    run = load_run(tmp_path / "para", "best")
    test_rows = starter_load_paraphrase_data(course / "quora-test-student.csv", split="test")
    want = starter_argmax_ids(run.model, run.tok, [starter_test_prompt(r[0], r[1]) for r in test_rows])
    assert read_para_output(files_para[1]) == {r[2]: str(p) for r, p in zip(test_rows, want)}
    chrf = starter_test_sonnet(files_son[0], course / "TRUE_sonnets_held_out_dev.txt")
    assert chrf == pytest.approx(s_sum["dev/chrf"], abs=1e-9)
    gens, prompts = starter_load_sonnets(files_son[1]), starter_load_sonnets(course / "sonnets_held_out.txt")
    assert len(gens) == len(prompts) and all(g.startswith(p) and g != p for g, p in zip(gens, prompts))

    sonnet_bytes = [f.read_bytes() for f in files_son]
    for task in ("para", "son"):
        untrained, _ = load_model("tiny-gpt2", seed=11711)  # the run's initial weights
        save_weights(untrained, tmp_path / task / "checkpoints" / "best")
    assert cli(*para) == 0 and cli(*son) == 0
    assert dev_accuracy() == p_sum["init/dev/accuracy"]
    assert [f.read_bytes() for f in files_son] == sonnet_bytes


def test_recipe_finds_its_test_input_before_training(cache, tmp_path, capsys):
    """No quora-test-student.csv beside --train, none in the data directory: one line before any training
    (not after hours), nothing written."""
    files = qqp_files(tmp_path, 16, 8)
    empty = tmp_path / "empty"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SFTDPO_DATA_DIR", str(empty))
        mp.chdir(tmp_path)
        assert main(["-q", "train", "--recipe", "cs224n-starter", "--model", "tiny-llama", "--train", files["train"],
                     "--dev", files["dev"], "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no paraphrase test input: put the CS224N quora-test-student.csv" in err
    assert not (tmp_path / "run").exists()


def test_dry_run_answers_from_the_flop_count_and_probes_only_when_asked(cache, tmp_path, monkeypatch, capsys):
    """`study run --dry-run` measures nothing (it spent minutes probing GPT-2 kinds of run before): every
    run priced by the FLOP count, said so, with what --probe would cost; --no-probe is still accepted.
    With --probe, the probe's estimated time is printed before it runs, then each kind's own time, and the
    estimates come from the measured rates."""
    import yaml

    from sftdpo.study import rates as rates_mod

    files = qqp_files(tmp_path, 16, 8)
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"name": "dry", "defaults": {"task": "paraphrase", "model": "tiny-llama", "epochs": 1,
                                                                "device": "cpu", **files}, "grid": {"seed": [0, 1]}}))
    monkeypatch.setattr(rates_mod, "probe", lambda c: pytest.fail("probed without --probe"))
    for extra in ([], ["--no-probe"]):
        assert main(["study", "run", str(spec), "--out", str(tmp_path / "s"), "--dry-run", *extra]) == 0
        out = capsys.readouterr().out
        assert re.search(r"\* 2 runs: a FLOP count at the rough rate of a 2-core CPU .* no rates cached for 1 kind\(s\) "
                         r"of run; `--dry-run --probe` measures them here, about \d+:\d\d", out)
        assert len([ln for ln in out.splitlines() if ln.startswith("  dry") or ln.startswith("  paraphrase")
                    and ln.endswith(" *")]) == 2
    calls = []

    def fake_probe(c):
        calls.append(c)
        print("PROBING")
        return rates_mod.Rates(load_s=1.0, sft_s=0.5, eval_s=0.25, dpo_prep_s=0.1, dpo_s=0.5, n_train=16, n_dev=8,
                               source="measured (test) on cpu")

    monkeypatch.setattr(rates_mod, "probe", fake_probe)
    assert main(["study", "run", str(spec), "--out", str(tmp_path / "s"), "--dry-run", "--probe"]) == 0
    out = capsys.readouterr().out
    first = out.index("probing 1 kind(s) of run on this machine first, about ")
    assert first < out.index("measuring paraphrase tiny-llama fft on this machine (1 of 1: a few batches of each stage, "
                             "twice, about ") < out.index("PROBING") < out.index("  measured in ")
    assert len(calls) == 1 and "rates measured (test) on cpu" in out and " *\n" not in out
    assert main(["study", "run", str(spec), "--probe"]) == 2  # --probe belongs to --dry-run
