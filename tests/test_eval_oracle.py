"""Evaluation checked by an independent evaluator (issue 23 §2): for each task kind, a run trained briefly
so that its predictions vary, and what it wrote (dev_outputs.jsonl, predictions.csv, generations, the
summary's metrics) against tests/oracle.py: the run's checkpoint loaded into transformers (PEFT for
LoRA), the raw data files parsed in the test, one example at a time through the model's own forward
or `generate`, metrics from scikit-learn and sacrebleu.

Wrong implementations these catch (each made by hand and seen to fail; the lasting ones are in
tests/mutants.yaml): predictions shifted by one example, dev predictions from the train set, a
constant predictor, the label pair decided by the lower logit, evaluation in training mode (dropout
on), the prompt without the CS224N template or preprocessing, chrF of the continuation reported as
the full sonnet's, samples decoded from the wrong logits."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from sklearn.metrics import f1_score

from sftdpo.config import RunConfig
from sftdpo.train.loop import train

import oracle

COMMON = dict(device="cpu", batch_size=8, eval_batch_size=8, eval_init=False, log_every=100)


@pytest.fixture
def qqp(tmp_path) -> dict[str, str]:
    return oracle.qqp_files(tmp_path)


# (param, conventions, precision, base model, epochs, lr). Under --conventions cs224n the argmax over the
# whole vocabulary decides, so that case trains the noisy GPT-2 for one short epoch: many answers are
# still other tokens than yes/no, where argmax and the label pair disagree.
PARAPHRASE_CASES = [
    ("fft", "sftdpo", "fp32", "gpt2_base", 3, 1e-2),
    ("lora", "cs224n", "fp32", "gpt2_noisy", 1, 1.5e-2),
    ("fft", "sftdpo", "bf16", "gpt2_base", 3, 1e-2),
]


@pytest.mark.parametrize("param, conventions, precision, base, epochs, lr", PARAPHRASE_CASES,
                         ids=["fft-sftdpo-fp32", "lora-cs224n-fp32", "fft-sftdpo-bf16"])
def test_paraphrase_predictions_equal_a_plain_evaluator(param, conventions, precision, base, epochs, lr, request, qqp,
                                                        cache, tmp_path):
    """QQP through `train()`: dev_outputs.jsonl and predictions.csv equal, by id, the plain evaluator on
    the checkpoint's weights, with the CS224N prompt written out here (its text preprocessed as the
    starter does under --conventions cs224n, where the argmax over the whole vocabulary is the rule and
    dev/non_label_rate the share of other tokens); bf16 runs are held against the evaluator under bf16
    autocast, ties within rounding excepted. Catches ids misaligned with predictions, train examples as
    dev, a constant predictor, the lower logit of the label pair, the label pair where the argmax rules,
    the starter's preprocessing left out, a wrong prompt."""
    base = request.getfixturevalue(base)
    lora = param == "lora"
    cs224n = conventions == "cs224n"
    cfg = RunConfig(task="paraphrase", model=str(base), **qqp, **COMMON, precision=precision, epochs=epochs, lr=lr,
                    param=param, conventions=conventions,
                    **(dict(lora_rank=4, lora_alpha=16.0, lora_targets="c_attn", lora_dropout=0.1) if lora else {}))
    out = tmp_path / "run"
    s = train(cfg, out)
    model = oracle.load_run_model(base, out, "last", lora=oracle.LORA_GPT2_C_ATTN if lora else None)
    dev = oracle.paraphrase_dev(qqp)
    assert len(dev) >= 30
    preds = oracle.check_cloze_run(out, model, oracle.load_tokenizer(base), oracle.paraphrase_prompts(dev, preprocess=cs224n),
                                   {i: r["label"] for i, r in dev.items()}, [("0", "no"), ("1", "yes")], precision,
                                   argmax=cs224n)
    if cs224n:
        other = sum(p.startswith("token:") for p in preds.values())
        assert other >= 3 and s["dev/non_label_rate"] == pytest.approx(other / len(preds), abs=1e-12)


# -- three classes from your own files -------------------------------------------------------------

CLASSES = {"0": ("animal", ["cat", "dog", "horse", "cow", "bird", "fish", "sheep", "goat"]),
           "1": ("money", ["coin", "bank", "loan", "cash", "price", "debt", "tax", "wage"]),
           "2": ("weather", ["rain", "snow", "wind", "storm", "fog", "frost", "hail", "cloud"])}
TRAIN_FRAMES = ["I saw a {n}", "There is a {n}", "We talked about the {n}", "Tell me about the {n}"]
DEV_FRAMES = ["My friend likes the {n}", "Look at that {n}"]
TEMPLATE = "Text: {text}"


def write_topics(path: Path, frames: list[str], prefix: str) -> Path:
    rows = [{"id": f"{prefix}{k}-{v}-{n}", "text": fr.format(n=n), "label": int(v)}
            for k, fr in enumerate(frames) for v, (_, nouns) in CLASSES.items() for n in nouns]
    random.Random(0).shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_three_class_predictions_equal_a_plain_evaluator(gpt2_base, cache, tmp_path):
    """--task classify, 3 classes from JSONL files: dev_outputs.jsonl and predictions.csv equal, by
    id, the label word with the highest next-token logit after the --template prompt filled here, with
    every class predicted several times; accuracy and macro-F1 are scikit-learn's. Catches the classes'
    words or tokens misassigned, misaligned ids, a constant predictor, dropout on at evaluation."""
    train_f = write_topics(tmp_path / "train.jsonl", TRAIN_FRAMES, "t")
    dev_f = write_topics(tmp_path / "dev.jsonl", DEV_FRAMES, "d")
    labels = ",".join(f"{v}={w}" for v, (w, _) in CLASSES.items())
    cfg = RunConfig(task="classify", model=str(gpt2_base), train=str(train_f), dev=str(dev_f), template=TEMPLATE,
                    labels=labels, epochs=3, lr=7e-3, precision="fp32", **COMMON)
    out = tmp_path / "run"
    s = train(cfg, out)
    rows = oracle.read_jsonl(dev_f)
    preds = oracle.check_cloze_run(out, oracle.load_run_model(gpt2_base, out), oracle.load_tokenizer(gpt2_base),
                                   {r["id"]: TEMPLATE.format(text=r["text"]) for r in rows},
                                   {r["id"]: str(r["label"]) for r in rows},
                                   [(v, w) for v, (w, _) in CLASSES.items()], "fp32")
    ids = sorted(preds)
    per_class = f1_score([str(next(r["label"] for r in rows if r["id"] == i)) for i in ids], [preds[i] for i in ids],
                         labels=list(CLASSES), average=None, zero_division=0)
    assert [s[f"dev/f1_{w}"] for w, _ in CLASSES.values()] == pytest.approx(list(per_class), abs=1e-12)


# -- generation ------------------------------------------------------------------------------------

def write_sonnet_files(folder: Path, n_train: int, n_dev: int) -> dict[str, str]:
    """Sonnet files in the CS224N layout (a header, then each sonnet after a line holding its number),
    the dev sonnets also as the course's held-out prompt file (their first three lines)."""
    fix = Path(__file__).parent / "fixtures" / "data" / "sonnets"
    lines = [ln.strip() for name in ("sonnets.txt", "TRUE_sonnets_held_out_dev.txt")
             for ln in (fix / name).read_text(encoding="utf-8").splitlines()[3:] if ln.strip() and not ln.strip().isdigit()]
    rng = random.Random(3)
    sonnets = {}
    for num in range(1, n_train + n_dev + 1):
        body = rng.sample(lines, 6)
        sonnets[num] = "\n".join(body[:4] + ["  " + body[4], "  " + body[5]])

    def write(name: str, nums: range, keep: int | None = None) -> str:
        text = "A header, as the Folger text has\n\n" + "".join(
            f"\n{n}\n\n" + "\n".join(sonnets[n].split("\n")[:keep]) + "\n" for n in nums)
        (folder / name).write_text(text, encoding="utf-8")
        return str(folder / name)

    dev = range(n_train + 1, n_train + n_dev + 1)
    write("sonnets_held_out_dev.txt", dev, keep=3)
    return dict(train=write("sonnets.txt", range(1, n_train + 1)), dev=write("TRUE_sonnets_held_out_dev.txt", dev))


@pytest.mark.parametrize("decoding", ["greedy", "nucleus-of-one"])
def test_sonnet_continuations_equal_transformers_generate(decoding, gpt2_noisy, cache, tmp_path):
    """Sonnets: each dev sonnet's generation (dev_outputs.jsonl, generations*.txt) is its three-line
    prompt from the course's held-out prompt file, a newline, and what transformers' greedy
    `generate` continues it with on the checkpoint's weights; dev/chrf is sacrebleu's chrF of those
    full sonnets, dev/chrf_continuation of the continuations alone. "nucleus-of-one" samples (two
    samples, temperature 0.7) with a top-p so small that the nucleus holds only the most likely token:
    the one setting where the sampled path has an independent oracle (transformers' sampler with the
    same seed draws other random numbers). Catches chrF of the continuation reported as the full
    sonnet's, prompts or generations misaligned with their sonnets, decoding from the wrong position
    or logits, samples written to the wrong file."""
    files = write_sonnet_files(tmp_path, 10, 6)
    kw = dict(temperature=0.0) if decoding == "greedy" else dict(temperature=0.7, top_p=1e-6, num_samples=2)
    cfg = RunConfig(task="sonnet", model=str(gpt2_noisy), **files, epochs=2, lr=1e-3, batch_size=4, eval_batch_size=4,
                    max_new_tokens=12, precision="fp32", device="cpu", eval_init=False, log_every=100, **kw)
    out = tmp_path / "run"
    s = train(cfg, out)
    model, tok = oracle.load_run_model(gpt2_noisy, out), oracle.load_tokenizer(gpt2_noisy)
    prompts = oracle.read_sonnets(Path(files["dev"]).parent / "sonnets_held_out_dev.txt")
    refs = oracle.read_sonnets(files["dev"])
    conts, gaps = {}, []
    for num, prompt in prompts.items():
        conts[num], gap = oracle.greedy_completion(model, tok, prompt + "\n", cfg.max_new_tokens)
        gaps.append(gap)
    # no step of the greedy path is within rounding of a tie, so any correct decoder takes the same path
    assert min(gaps) > oracle.tie_band("fp32"), min(gaps)
    assert len(set(conts.values())) == len(conts), "the continuations do not vary: the check is weak"
    full = {n: (prompts[n] + "\n" + c).strip() for n, c in conts.items()}
    assert oracle.run_outputs(out) == {str(n): t for n, t in full.items()}
    for k in range(cfg.num_samples):
        name = "generations.txt" if k == 0 else f"generations_sample{k}.txt"
        assert oracle.read_sonnets(out / name) == full
    nums = sorted(refs)
    cont_refs = ["\n".join([ln for ln in refs[n].split("\n") if ln.strip()][3:]) for n in nums]
    assert s["dev/chrf"] == pytest.approx(oracle.corpus_chrf([full[n] for n in nums], [refs[n] for n in nums]), abs=1e-9)
    assert s["dev/chrf_continuation"] == pytest.approx(
        oracle.corpus_chrf([conts[n].strip() for n in nums], cont_refs), abs=1e-9)


def test_generate_completions_equal_transformers_generate(gpt2_noisy, cache, tmp_path):
    """--task generate on prompt-completion JSONL: generations.jsonl and dev_outputs.jsonl hold, by id,
    transformers' greedy `generate` continuation of each prompt (its tokens, no special tokens added)
    on the checkpoint's weights, and dev/chrf and dev/bleu are sacrebleu's on them against the
    references. Catches completions misaligned with ids, the prompt fed twice or not at all, the end
    token kept in the text, scores on the wrong side."""
    words = ["red", "blue", "green", "gold", "pink", "gray", "black", "white", "brown", "teal"]
    rng = random.Random(0)

    def rows(n: int, prefix: str) -> list[dict]:
        out = []
        for i in range(n):
            a, b = rng.sample(words, 2)
            out.append({"id": f"{prefix}{i}", "prompt": f"Colours: {a}, {b}.\nReversed:", "completion": f" {b}, {a}."})
        return out

    train_rows, dev_rows = rows(48, "t"), rows(8, "d")
    for name, rs in (("train.jsonl", train_rows), ("dev.jsonl", dev_rows)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rs))
    cfg = RunConfig(task="generate", model=str(gpt2_noisy), train=str(tmp_path / "train.jsonl"),
                    dev=str(tmp_path / "dev.jsonl"), epochs=2, lr=1e-3, temperature=0.0, max_new_tokens=8,
                    precision="fp32", **COMMON)
    out = tmp_path / "run"
    s = train(cfg, out)
    model, tok = oracle.load_run_model(gpt2_noisy, out), oracle.load_tokenizer(gpt2_noisy)
    want, gaps = {}, []
    for r in dev_rows:
        want[r["id"]], gap = oracle.greedy_completion(model, tok, r["prompt"], cfg.max_new_tokens)
        gaps.append(gap)
    assert min(gaps) > oracle.tie_band("fp32"), min(gaps)
    assert len(Counter(want.values())) >= len(want) // 2, f"the completions do not vary: {want}"
    gens = {g["id"]: g for g in oracle.read_jsonl(out / "generations.jsonl")}
    assert {i: g["completion"] for i, g in gens.items()} == {i: c.strip() for i, c in want.items()}
    assert {i: g["prompt"] for i, g in gens.items()} == {r["id"]: r["prompt"] for r in dev_rows}
    assert oracle.run_outputs(out) == {i: c.strip() for i, c in want.items()}
    hyps, refs = [want[r["id"]].strip() for r in dev_rows], [r["completion"].strip() for r in dev_rows]
    assert s["dev/chrf"] == pytest.approx(oracle.corpus_chrf(hyps, refs), abs=1e-9)
    assert s["dev/bleu"] == pytest.approx(oracle.corpus_bleu(hyps, refs), abs=1e-9)
