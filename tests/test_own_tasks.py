"""Your own task: `--task classify` and `--task generate` on files in the ecosystem's formats, preference
pairs from a file, task files and specs, and proof that the paper's tasks are the same machinery
(QQP as classify == paraphrase; sonnets as generate == sonnet; v1 pairs from a file == built-in v1)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from sftdpo.cli import main
from sftdpo.config import RunConfig, SftdpoError
from sftdpo.data import load_task_data
from sftdpo.data.classify import load_classify_data
from sftdpo.models import load_model
from sftdpo.tasks import SONNET_PROMPT_LINES, make_task
from sftdpo.train.loop import Run, train

from conftest import SONNET_FILES, qqp_files, require_tiny_gpt2, write_jsonl

PARAPHRASE_TEMPLATE = 'Question 1: "{question1}"\nQuestion 2: "{question2}\nAre these questions asking the same thing?\n'
TINY = dict(model="tiny-llama", device="cpu", precision="fp32", eval_batch_size=8, log_every=1)


def records(out: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def outputs(out: Path) -> list[tuple[str, str, str]]:
    return [(r["id"], r["prediction"], r["reference"]) for r in map(json.loads, (out / "dev_outputs.jsonl").read_text().splitlines())]


def cli(*args: str) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(["-q", *args])
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue()


# -- the three equivalences ---------------------------------------------------------------------

def test_qqp_as_classify_is_the_paraphrase_task(cache, tmp_path):
    """The examples the paraphrase run used, written as JSONL (question1, question2, label) and run as
    --task classify with the paraphrase template: the same dev predictions and metrics, both stages."""
    files = qqp_files(tmp_path, 40, 16)
    common = dict(regime="sft-dpo", epochs=2, handoff_epoch=1, batch_size=8, lr=3e-3, dpo_lr=2e-3, **TINY)
    para_cfg = RunConfig(task="paraphrase", **files, **common)
    para = train(para_cfg, tmp_path / "para")
    data = load_task_data(para_cfg)
    for split, examples in (("train", data.train), ("dev", data.dev)):
        write_jsonl(tmp_path / f"{split}.jsonl", [{"id": e.id, "question1": e.q1, "question2": e.q2, "label": e.label}
                                                  for e in examples])
    cls = train(RunConfig(task="classify", template=PARAPHRASE_TEMPLATE, labels="0=no,1=yes", train=str(tmp_path / "train.jsonl"),
                          dev=str(tmp_path / "dev.jsonl"), **common), tmp_path / "cls")
    assert outputs(tmp_path / "cls") == outputs(tmp_path / "para") and len(outputs(tmp_path / "para")) > 8
    assert (cls["dev/accuracy"], cls["dev/macro_f1"], cls["dev/f1_yes"]) == \
        (para["dev/accuracy"], para["dev/macro_f1"], para["dev/f1_positive"])
    steps = [(r["stage"], r["loss"]) for r in records(tmp_path / "para", "train")]
    assert {s for s, _ in steps} == {"sft", "dpo"}
    assert [(r["stage"], r["loss"]) for r in records(tmp_path / "cls", "train")] == steps


def sonnet_rows(sonnets) -> list[dict]:
    """Sonnets as prompt-completion rows: the first 3 lines and their newline, then the rest of the text."""
    rows = []
    for s in sonnets:
        cut = len(s.prompt(SONNET_PROMPT_LINES)) + 1
        assert s.text[: cut - 1] == s.prompt(SONNET_PROMPT_LINES)
        rows.append({"id": str(s.number), "prompt": s.text[:cut], "completion": s.text[cut:]})
    return rows


def test_sonnets_as_generate_are_the_sonnet_task(cache, tmp_path):
    """Sonnets written as prompt-completion JSONL and run as --task generate (loss on every token, as
    the sonnet task trains whole sonnets): the same losses, pairs and generations, both stages."""
    common = dict(regime="sft-dpo", epochs=2, handoff_epoch=1, batch_size=2, lr=3e-3, dpo_lr=2e-3, max_new_tokens=12, **TINY)
    son_cfg = RunConfig(task="sonnet", **SONNET_FILES, **common)
    son = train(son_cfg, tmp_path / "son")
    data = load_task_data(son_cfg)
    write_jsonl(tmp_path / "train.jsonl", sonnet_rows(data.train))
    write_jsonl(tmp_path / "dev.jsonl", sonnet_rows(data.dev))
    gen = train(RunConfig(task="generate", completion_only_loss=False, train=str(tmp_path / "train.jsonl"),
                          dev=str(tmp_path / "dev.jsonl"), **common), tmp_path / "gen")
    steps = [(r["stage"], r["loss"]) for r in records(tmp_path / "son", "train")]
    assert {s for s, _ in steps} == {"sft", "dpo"}
    assert [(r["stage"], r["loss"]) for r in records(tmp_path / "gen", "train")] == steps
    pairs = lambda out: [(p["prompt"], p["chosen"], p["rejected"])  # noqa: E731
                         for p in map(json.loads, (out / "dpo" / "pairs.jsonl").read_text().splitlines()[1:])]
    assert pairs(tmp_path / "gen") == pairs(tmp_path / "son")
    son_full = {i: p for i, p, _ in outputs(tmp_path / "son")}
    prompts = {str(s.number): s.prompt(SONNET_PROMPT_LINES) for s in data.dev}
    for i, completion, _ in outputs(tmp_path / "gen"):  # the sonnet task reports prompt lines + generation
        assert son_full[i].startswith(prompts[i]) and son_full[i][len(prompts[i]):].strip() == completion
    assert son["dev/chrf_continuation"] == pytest.approx(gen["dev/chrf"], abs=1e-9)


def test_v1_pairs_from_a_trl_file_are_the_built_in_v1_run(cache, tmp_path):
    common = dict(task="sonnet", regime="sft-dpo", epochs=2, handoff_epoch=1, batch_size=2, lr=3e-3, dpo_lr=2e-3,
                  max_new_tokens=12, **SONNET_FILES, **TINY)
    built = train(RunConfig(**common), tmp_path / "built")
    rows = [json.loads(x) for x in (tmp_path / "built" / "dpo" / "pairs.jsonl").read_text().splitlines()[1:]]
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                                           for r in rows])
    from_file = train(RunConfig(**common, pairs=f"file:{tmp_path / 'pairs.jsonl'}"), tmp_path / "file")
    assert records(tmp_path / "file", "train") and \
        [(r["stage"], r["loss"], r.get("rewards/margins")) for r in records(tmp_path / "file", "train")] == \
        [(r["stage"], r["loss"], r.get("rewards/margins")) for r in records(tmp_path / "built", "train")]
    assert {k: v for k, v in from_file.items() if k.startswith("dev/")} == {k: v for k, v in built.items() if k.startswith("dev/")}


# -- formats ------------------------------------------------------------------------------------

ROWS = [{"id": f"r{i}", "text": t, "label": lab} for i, (t, lab) in enumerate(
    [("the cat sat", 0), ("stocks fell", 1), ("rain today", 2), ("dogs bark", 0), ("bonds rose", 1), ("snow again", 2),
     ("mice squeak", 0), ("gold up", 1), ("sunny skies", 2)])]


def write_formats(tmp_path: Path, rows: list[dict]) -> dict[str, str]:
    out = {}
    for sep, ext in ((",", "csv"), ("\t", "tsv")):
        p = tmp_path / f"rows.{ext}"
        with p.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=sep)
            w.writeheader()
            w.writerows(rows)
        out[ext] = str(p)
    out["jsonl"] = str(write_jsonl(tmp_path / "rows.jsonl", rows))
    import datasets

    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    out["parquet"] = str(tmp_path / "rows.parquet")
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "saved"))
    out["saved"] = str(tmp_path / "saved")
    return out


def test_classify_reads_csv_tsv_jsonl_parquet_and_saved_datasets(tmp_path):
    files = write_formats(tmp_path, ROWS)
    seen = []
    for fmt, path in files.items():
        kw = dict(dataset=path) if fmt == "saved" else dict(train=path, dev=path)
        cfg = RunConfig(task="classify", template="Topic of: {text}\nAnswer:", labels="0=animal,1=money,2=weather", **kw)
        with pytest.raises(SftdpoError, match="every dev row also occurs in train"):
            load_classify_data(cfg)  # the same rows as train and dev: refused, whatever the format
        dev = tmp_path / f"dev-{fmt}.jsonl"
        write_jsonl(dev, [dict(r, text=r["text"] + "!") for r in ROWS])
        data = load_classify_data(RunConfig(**{**cfg.to_dict(), "dataset": None, "train": path if fmt != "saved" else
                                               files["jsonl"], "dev": str(dev)}))
        seen.append([(e.id, e.fields["text"], e.label) for e in data.train])
    assert all(s == seen[0] for s in seen) and seen[0][2] == ("r2", "rain today", "2")


def test_three_classes_train_with_every_wrong_label_and_the_hardest(cache, tmp_path):
    train_f = write_jsonl(tmp_path / "train.jsonl", ROWS * 2)
    dev_f = write_jsonl(tmp_path / "dev.jsonl", [dict(r, text=r["text"] + " now") for r in ROWS])
    base = dict(task="classify", template="Topic of: {text}\nAnswer:", labels="0=animal,1=money,2=weather",
                train=str(train_f), dev=str(dev_f), regime="dpo", epochs=1, batch_size=6, dpo_lr=1e-3, **TINY)
    run = Run(RunConfig(**base), tmp_path / "v1")
    run.build()
    obj = run.objective("dpo")
    assert obj.describe()["pairs"] == 2 * len(run.task.train) and tuple(obj.ref_rejected.shape) == (len(run.task.train), 2)
    hard = Run(RunConfig(**base, pairs="hardest"), tmp_path / "hard")
    hard.build()
    hobj = hard.objective("dpo")
    assert hobj.describe()["pairs"] == len(hard.task.train) and tuple(hobj.ref_rejected.shape) == (len(hard.task.train), 1)
    # the hardest wrong label is the one v1 rates highest, per prompt
    assert torch_equal(hobj.ref_rejected[:, 0], obj.ref_rejected.max(dim=1).values)
    s = train(RunConfig(**base), tmp_path / "trained")
    assert set(s) >= {"dev/accuracy", "dev/macro_f1", "dev/f1_animal", "dev/f1_money", "dev/f1_weather"}
    assert (tmp_path / "trained" / "predictions.csv").read_text().splitlines()[0] == "id,prediction,label"


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_conversational_rows_use_the_chat_template(llama_base, cache, tmp_path):
    """Conversations (`messages`) go through the tokenizer's own chat template: the training target is
    the rendered assistant turn (its end-of-turn token, no extra end token), and each dev completion
    the run writes is, by id, transformers' greedy `generate` on the checkpoint's weights from the
    conversation rendered here by `apply_chat_template(..., add_generation_prompt=True)`; dev/chrf is
    sacrebleu's against the assistant messages. Catches the chat template not applied (the raw text or
    the template without its generation prompt as the prompt), the template's markup in the reference,
    completions misaligned with their conversations, a constant completion."""
    import oracle

    words = ("red", "blue", "green", "gold", "pink", "gray", "black", "white")
    chats = [{"id": f"c{i}", "messages": [{"role": "user", "content": f"Say {w} twice."},
                                          {"role": "assistant", "content": f"{w} {w}"}]} for i, w in enumerate(words)]
    write_jsonl(tmp_path / "train.jsonl", chats)
    teal = {"id": "teal", "messages": [{"role": "user", "content": "Say teal twice."},
                                       {"role": "assistant", "content": "teal teal"}]}
    dev = [*chats[:5], teal]  # not all of dev in train: that is refused
    write_jsonl(tmp_path / "dev.jsonl", dev)
    cfg = RunConfig(task="generate", train=str(tmp_path / "train.jsonl"), dev=str(tmp_path / "dev.jsonl"), epochs=1,
                    batch_size=4, lr=1e-3, temperature=0.0, max_new_tokens=6, **{**TINY, "model": str(llama_base)})
    tok = oracle.load_tokenizer(llama_base)
    task = make_task(cfg, load_model(str(llama_base))[1])
    seq, start = task.train_ids[0], task.loss_start[0]
    assert tok.decode(seq[start:]) == "red red<|im_end|>\n"  # the completion is the loss; no extra end token
    s = train(cfg, tmp_path / "run")
    model = oracle.load_run_model(llama_base, tmp_path / "run")
    want, gaps = {}, []
    for c in dev:
        prompt = tok.apply_chat_template(c["messages"][:1], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n")
        want[c["id"]], gap = oracle.greedy_completion(model, tok, prompt, cfg.max_new_tokens)
        gaps.append(gap)
    assert min(gaps) > oracle.tie_band("fp32") and len(set(want.values())) >= 3, (want, min(gaps))
    assert outputs(tmp_path / "run") == [(c["id"], want[c["id"]].strip(), c["messages"][1]["content"]) for c in dev]
    gens = [json.loads(x) for x in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    assert [g["completion"] for g in gens] == [want[c["id"]].strip() for c in dev]
    hyps, refs = [want[c["id"]].strip() for c in dev], [c["messages"][1]["content"] for c in dev]
    assert s["dev/chrf"] == pytest.approx(oracle.corpus_chrf(hyps, refs), abs=1e-9)
    require_tiny_gpt2()
    no_template = dict(cfg.to_dict(), model="tiny-gpt2")
    rc, err = cli("train", "--config", _dump(tmp_path / "c.json", no_template), "--out", str(tmp_path / "x"))
    assert rc == 2 and "needs a chat template" in err and err.count("\n") == 1


def _dump(path: Path, cfg: dict) -> str:
    path.write_text(json.dumps(cfg))
    return str(path)


def test_language_modelling_rows_prompt_with_their_first_lines(cache, tmp_path):
    texts = [{"text": f"line one {i}\nline two {i}\nline three {i}"} for i in range(6)]
    write_jsonl(tmp_path / "t.jsonl", texts)
    write_jsonl(tmp_path / "d.jsonl", [{"text": "dev one\ndev two\ndev three"}])
    cfg = RunConfig(task="generate", train=str(tmp_path / "t.jsonl"), dev=str(tmp_path / "d.jsonl"), prompt_lines=2, **TINY)
    _, tok = load_model("tiny-llama")
    task = make_task(cfg, tok)
    assert (task.dev[0].prompt, task.dev[0].completion) == ("dev one\ndev two\n", "dev three")
    assert task.loss_start[0] == 0  # a text row trains on every token
    assert task.pair_examples[0].prompt == "line one 0\nline two 0\n"


# -- task files and specs --------------------------------------------------------------------------

def test_a_task_file_and_a_spec_that_defines_tasks(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_own_data(tmp_path / "data" / "own")
    task_file = tmp_path / "topics.yaml"
    task_file.write_text(yaml.safe_dump({"name": "topics", "kind": "classify", "train": "data/own/topics-train.jsonl",
                                         "dev": "data/own/topics-dev.jsonl", "template": "Topic of: {text}\nAnswer:",
                                         "labels": "0=animal,1=money,2=weather"}))
    rc, err = cli("train", "--task-file", str(task_file), "--model", "tiny-llama", "--device", "cpu", "--precision", "fp32",
                  "--epochs", "1", "--out", "run")
    assert rc == 0, err
    conf = json.loads((tmp_path / "run" / "config.json").read_text())["config"]
    assert conf["task"] == "classify" and conf["task_name"] == "topics" and Path(conf["train"]).is_absolute()
    from sftdpo.study import run_study
    from sftdpo.store import Store

    out = run_study("own-tasks", tmp_path / "study", overrides={"model": "tiny-llama", "epochs": 2, "handoff_epoch": 1,
                                                               "precision": "fp32", "device": "cpu", "max_new_tokens": 8})
    with Store(out / "study.db") as store:
        runs = store.runs()
    assert runs and all(r["status"] == "done" for r in runs), [(r["name"], r["error"]) for r in runs]
    assert {r["config"]["task_name"] for r in runs} == {"topics", "completions"}
    report = (out / "report" / "report.md").read_text()
    assert "Task topics (classify)" in report and "Task completions (generate)" in report


def write_own_data(folder: Path) -> None:
    """The files the shipped `own-tasks` spec reads (data/own/ under the working directory)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "topics-train.jsonl", ROWS * 2)
    write_jsonl(folder / "topics-dev.jsonl", [dict(r, text=r["text"] + " now") for r in ROWS])
    pc = [{"prompt": f"Count from {i}:", "completion": " " + " ".join(str(i + k) for k in range(1, 5))} for i in range(10)]
    write_jsonl(folder / "completions-train.jsonl", pc[:8])
    write_jsonl(folder / "completions-dev.jsonl", pc[8:])


# -- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("change,needle", [
    (dict(label_column="topic"), "no column 'topic'"),
    (dict(template="Text: {body}\nAnswer:"), "no column 'body'"),
    (dict(labels="0=animal,1=money"), "label '2' has no word in --labels"),
    (dict(labels="0=animal,1=money market,2=weather"), "is 2 tokens for this tokenizer"),
    (dict(template="Text: {}\nAnswer:"), "is not a column name"),
])
def test_bad_classify_input_is_one_line(change, needle, cache, tmp_path):
    write_own_data(tmp_path / "own")
    cfg = dict(task="classify", template="Topic of: {text}\nAnswer:", labels="0=animal,1=money,2=weather",
               train=str(tmp_path / "own" / "topics-train.jsonl"), dev=str(tmp_path / "own" / "topics-dev.jsonl"),
               model="tiny-llama", device="cpu", precision="fp32")
    rc, err = cli("train", "--config", _dump(tmp_path / "c.json", {**cfg, **change}), "--out", str(tmp_path / "run"))
    assert rc == 2 and needle in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("row,needle", [
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "the chosen response is empty"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen and rejected are the same response"),
    ({"chosen": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}],
      "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y"}]}, "role 'wizard'"),
    ({"prompt": "p", "better": "a"}, "needs `chosen` and `rejected`"),
])
def test_bad_preference_rows_are_one_line(row, needle, cache, tmp_path):
    write_own_data(tmp_path / "own")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Count from 1:", "chosen": " 2 3", "rejected": " 9 9"}, row])
    cfg = dict(task="generate", train=str(tmp_path / "own" / "completions-train.jsonl"),
               dev=str(tmp_path / "own" / "completions-dev.jsonl"), regime="dpo", pairs=f"file:{pairs}",
               model="tiny-llama", device="cpu", precision="fp32", max_new_tokens=4)
    rc, err = cli("train", "--config", _dump(tmp_path / "c.json", cfg), "--out", str(tmp_path / "run"))
    assert rc == 2 and needle in err and f"{pairs}:2" in err and err.strip().count("\n") == 0, err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_unknown_role_in_generate_data(cache, tmp_path):
    write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}])
    cfg = dict(task="generate", train=str(tmp_path / "t.jsonl"), dev=str(tmp_path / "t.jsonl"), model="tiny-llama",
               device="cpu", precision="fp32")
    rc, err = cli("train", "--config", _dump(tmp_path / "c.json", cfg), "--out", str(tmp_path / "run"))
    assert rc == 2 and "role 'bot'" in err and f"{tmp_path / 't.jsonl'}:1" in err


def test_generate_sft_loss_is_on_the_completion_only(cache, tmp_path):
    write_own_data(tmp_path / "own")
    cfg = RunConfig(task="generate", train=str(tmp_path / "own" / "completions-train.jsonl"),
                    dev=str(tmp_path / "own" / "completions-dev.jsonl"), **TINY)
    _, tok = load_model("tiny-llama")
    task = make_task(cfg, tok)
    b = task.collate([0, 1, 2])
    for j, e in enumerate(task.train_texts[:3]):
        n_prompt, n_completion = len(task.tokens(e.prompt)), len(task.response_tokens(e.completion))
        row = b.labels[j].tolist()
        assert row[:n_prompt] == [-100] * n_prompt  # the prompt carries no loss
        assert row[n_prompt : n_prompt + n_completion] == task.response_tokens(e.completion)
        assert all(x == -100 for x in row[n_prompt + n_completion :])  # nor the padding
    assert task.sft_loss_units()[:3] == [len(task.response_tokens(e.completion)) for e in task.train_texts[:3]]
