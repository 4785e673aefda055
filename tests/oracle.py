"""A plain evaluator written without sftdpo (issue 23 §2): the tests hold what sftdpo writes against it.

Only transformers, PEFT, torch, scikit-learn, sacrebleu and the raw data files (parsed here) are used:
a model is a Hugging Face directory built here from a transformers config, a run's weights are read
from its checkpoint's safetensors file (LoRA: into a PEFT model configured here), and every prediction
is computed one example at a time with the model's own forward or `generate`, in the precision the run
was configured with (bf16: under torch.autocast, as the run computes).

Ties: two correct implementations may disagree where the decision is within rounding of a tie. The
comparisons below accept a disagreement only on such an example, with the bound derived from the
dtype (README, Development), S being the row's largest |logit|: fp32 paths that compute the same sums
in another order agree to 1e-5·S per logit, so one path's margin (a difference of two logits) is
within 2e-5·S of the exact one and two paths' margins within 4e-5·S; a bf16 autocast path is within
4u·S (u = 2^-8) of the fp32 computation per logit, so 8u·S per margin and 16u·S between two paths.
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from sacrebleu.metrics import BLEU, CHRF
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score, f1_score

# The CS224N GPT-2 project's cloze prompt (datasets.py::ParaphraseDetectionDataset.collate_fn), written
# out here rather than imported: its unclosed quote after question 2 is part of it.
CS224N_PROMPT = 'Question 1: "{q1}"\nQuestion 2: "{q2}\nAre these questions asking the same thing?\n'

BF16_U = 2.0 ** -8
FP32_REL = 1e-5


def tie_band(precision: str) -> float:
    """How far from a tie (relative to the row's largest |logit|) a decision of two correct
    implementations must be for them to agree (see the module docstring)."""
    return 16 * BF16_U if precision == "bf16" else 2 * 2 * FP32_REL


# -- tiny base models, as Hugging Face directories (built from transformers only) ---------------

def write_tiny_gpt2(path: Path, tokenizer_dir: Path, seed: int = 0, init: float = 0.02) -> Path:
    """A 2-layer GPT-2 with the GPT-2 tokenizer; dropout left at GPT-2's 0.1 (training mode matters)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, initializer_range=init)
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_tiny_llama(path: Path, tokenizer_dir: Path, seed: int = 0, init: float = 0.02) -> Path:
    """A 2-layer Llama with tied embeddings and the given tokenizer (SmolLM2's: it has a chat template)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         initializer_range=init)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def load_tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def load_run_model(base: Path, run_dir: Path, checkpoint: str = "last", lora: dict | None = None):
    """The base directory's model with a run's checkpoint weights loaded into it, in eval mode."""
    return load_weights_file(base, Path(run_dir) / "checkpoints" / checkpoint / "weights.safetensors", lora)


def load_weights_file(base: Path, weights: Path, lora: dict | None = None):
    """The base directory's model with the weights of a safetensors file loaded into it, in eval mode.
    FFT: every weight but the tied output layer must be in the file. LoRA (`lora`: LoraConfig keyword
    arguments): a PEFT model built here, every adapter weight from the file, the base untouched."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    sd = load_file(str(weights))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, f"checkpoint weights the model does not have: {unexpected[:3]}"
    if lora is None:
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        assert set(missing) <= tied, f"FFT checkpoint lacks {sorted(set(missing) - tied)[:3]}"
    else:
        adapter = {n for n, _ in model.named_parameters() if "lora_" in n}
        assert adapter and adapter <= set(sd), f"LoRA checkpoint lacks {sorted(adapter - set(sd))[:3]}"
    return model.eval()


# LoRA on GPT-2's fused attention input (sftdpo: --lora-rank 4 --lora-alpha 16 --lora-targets c_attn)
LORA_GPT2_C_ATTN = dict(r=4, lora_alpha=16.0, target_modules=["c_attn"], fan_in_fan_out=True)


# -- raw data, parsed here -----------------------------------------------------------------------

def read_qqp_tsv(path: str | Path) -> list[dict]:
    """The CS224N GPT-format QQP file (tab-separated id, sentence1, sentence2, is_duplicate)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [dict(id=r["id"].strip(), q1=r["sentence1"], q2=r["sentence2"], label=str(int(float(r["is_duplicate"]))))
                for r in csv.DictReader(f, delimiter="\t")]


def pair_key(q1: str, q2: str) -> tuple[str, str]:
    """A question pair with case, whitespace and order folded: dev pairs that train holds are not dev."""
    return tuple(sorted(" ".join(q.lower().split()) for q in (q1, q2)))


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def read_sonnets(path: str | Path) -> dict[int, str]:
    """number -> text of a CS224N sonnet file: chunks between lines holding only a number, stripped,
    the header before the first number dropped (the starter's datasets.py::SonnetsDataset split)."""
    parts = re.split(r"\n\s*(\d+)\s*\n", Path(path).read_text(encoding="utf-8"))
    return {int(n): chunk.strip() for n, chunk in zip(parts[1::2], parts[2::2])}


def run_outputs(run_dir: Path) -> dict[str, str]:
    """id -> prediction of a run's dev_outputs.jsonl (one row per id)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "dev_outputs.jsonl").read_text().splitlines()]
    out = {r["id"]: r["prediction"] for r in rows}
    assert len(out) == len(rows), "dev_outputs.jsonl repeats an id"
    return out


# -- the evaluators --------------------------------------------------------------------------------

def _autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


@torch.no_grad()
def next_token_logits(model, tok, prompt: str, precision: str = "fp32") -> torch.Tensor:
    """The model's logits for the token after `prompt` (its tokens, no special tokens added), one
    prompt through the plain forward."""
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with _autocast(precision):
        return model(input_ids=ids).logits[0, -1].float()


def token_id(tok, word: str) -> int:
    ids = tok(word, add_special_tokens=False).input_ids
    assert len(ids) == 1, f"{word!r} is not one token"
    return ids[0]


def cloze_predictions(model, tok, prompts: dict[str, str], labels: list[tuple[str, str]], precision: str = "fp32",
                      argmax: bool = False) -> dict[str, tuple[str, float]]:
    """id -> (prediction, distance from a tie relative to the row's largest |logit|).

    label-pair: the label word (value, word) whose token has the highest logit, the first in `labels`
    on a tie. argmax: the highest logit over the whole vocabulary; a token that is no label word is
    the class `token:<id>`."""
    ids = [token_id(tok, w) for _, w in labels]
    value_of = {t: v for t, (v, _) in zip(ids, labels)}
    out = {}
    for key, prompt in prompts.items():
        logits = next_token_logits(model, tok, prompt, precision)
        scale = float(logits.abs().max())
        cand = logits if argmax else logits[ids]
        top2 = cand.topk(2)
        best = int(top2.indices[0])
        if argmax:
            pred = value_of.get(best, f"token:{best}")
        else:
            # the first of equal logits: topk does not promise an order among equals
            best = next(i for i, v in enumerate(cand.tolist()) if v == float(top2.values[0]))
            pred = labels[best][0]
        out[key] = (pred, float(top2.values[0] - top2.values[1]) / scale)
    return out


def disagreements(ours: dict[str, str], oracle: dict[str, tuple[str, float]], precision: str) -> tuple[list, int]:
    """(ids where the predictions differ although the oracle's decision is clear of a tie, ties seen)."""
    band = tie_band(precision)
    wrong = [(k, ours[k], p, gap) for k, (p, gap) in oracle.items() if ours[k] != p and gap > band]
    return wrong, sum(gap <= band for _, gap in oracle.values())


@torch.no_grad()
def greedy_completion(model, tok, prompt: str, max_new_tokens: int) -> tuple[str, float]:
    """(the greedy continuation of `prompt` as text, end of text cut off; the smallest top-2 logit gap
    over the steps taken, relative to that step's largest |logit|), with transformers' generate."""
    enc = tok(prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                         output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, enc.input_ids.size(1):].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    gaps = []
    for step in out.scores[: len(new) + 1]:  # the steps that chose the kept tokens and the end token
        s = step[0].float()
        top2 = s.topk(2).values
        gaps.append(float(top2[0] - top2[1]) / float(s.abs().max()))
    return tok.decode(new, skip_special_tokens=True).rstrip(), min(gaps)


# -- data written for these tests ------------------------------------------------------------------

_VERBS = ["fix", "paint", "clean", "sell", "buy", "build", "draw", "cook", "grow", "move", "wash", "find", "learn",
          "teach", "store", "ship"]
_OBJECTS = ["a bike", "a boat", "a wall", "a car", "bread", "a garden", "a piano", "a roof", "a sofa", "a lamp",
            "a fence", "a kite", "a tent", "a clock", "a drum", "a map"]


def write_qqp_pairs(path: Path, n: int, seed: int) -> Path:
    """A QQP file in the CS224N GPT format, half duplicates ("How do I X?" / "What is the best way to
    X?"), half not (a question about another topic); `seed` picks the topics, so a train and a dev
    file share few pairs. Learnable in a few steps from the second question's wording alone."""
    import random

    rng = random.Random(seed)
    topics = [f"{v} {o}" for v in _VERBS for o in _OBJECTS]
    rows = ["id\tsentence1\tsentence2\tis_duplicate"]
    for i in range(n):
        a = rng.choice(topics)
        if i % 2 == 0:
            rows.append(f"s{seed}-{i}\tHow do I {a}?\tWhat is the best way to {a}?\t1")
        else:
            b = rng.choice([t for t in topics if t != a])
            rows.append(f"s{seed}-{i}\tHow do I {a}?\tWhy do people {b}?\t0")
    path.write_text("\n".join(rows) + "\n")
    return path


def qqp_files(folder: Path, n_train: int = 128, n_dev: int = 40, overlap: int = 0) -> dict[str, str]:
    """`train`/`dev` paths of write_qqp_pairs files; `overlap` train pairs are appended to dev (new
    ids, the questions swapped and upper-cased): dev examples that sftdpo must drop."""
    train = write_qqp_pairs(folder / "train.csv", n_train, seed=0)
    dev = write_qqp_pairs(folder / "dev.csv", n_dev, seed=1)
    again = [r for r in read_qqp_tsv(train)][:overlap]
    with dev.open("a") as f:
        f.writelines(f"again-{k}\t{r['q2'].upper()}\t{r['q1']}\t{r['label']}\n" for k, r in enumerate(again))
    return dict(train=str(train), dev=str(dev))


# -- fixtures: the base models (tests import them by name) ----------------------------------------

@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> Path:
    """A tiny GPT-2 directory (the GPT-2 tokenizer from the data directory: skipped without it). Seed 3:
    untrained, it answers "no" to every write_qqp_pairs prompt (some seeds separate the two question
    wordings by chance, right or wrong), so what a run predicts is what it learnt."""
    from sftdpo.config import find_in_data_dirs  # only to find the tokenizer files

    tok = find_in_data_dirs("gpt2-tokenizer")
    if tok is None:
        pytest.skip("the tiny GPT-2 needs the GPT-2 tokenizer: set SFTDPO_DATA_DIR to a folder with gpt2-tokenizer/")
    return write_tiny_gpt2(tmp_path_factory.mktemp("gpt2-base"), tok, seed=3)


@pytest.fixture(scope="session")
def gpt2_noisy(gpt2_base, tmp_path_factory) -> Path:
    """The tiny GPT-2 drawn at 10x GPT-2's initialisation scale: its greedy continuations depend on the
    prompt from the start (at GPT-2's scale a briefly trained tiny model repeats one token everywhere)."""
    return write_tiny_gpt2(tmp_path_factory.mktemp("gpt2-noisy"), gpt2_base, init=0.2)


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory, shared_cache) -> Path:
    """A tiny Llama directory with SmolLM2's tokenizer (and its chat template), the tokenizer files
    as sftdpo caches them from the offline backbone's GGUF (converted by transformers); drawn at 10x
    Llama's initialisation scale, so that its greedy continuations depend on the prompt (see gpt2_noisy)."""
    from sftdpo.config import cache_dir_at
    from sftdpo.models import smollm2_tokenizer_dir  # only to find the tokenizer files

    with cache_dir_at(shared_cache):
        tok = smollm2_tokenizer_dir()
    return write_tiny_llama(tmp_path_factory.mktemp("llama-base"), tok, init=0.2)


# A paraphrase run whose dev accuracy peaks inside the run: SFT@2->DPO over 3 epochs, DPO at a learning
# rate that undoes SFT (dev accuracy 0.56, 0.89, 0.44 on the CPU tried, the last epoch answering "yes"
# throughout: the best epoch is neither the first, the last nor the lowest, and best and last predict
# differently). A change to the loop that moves this trajectory fails the tests' checks of it, loudly.
PEAKED = dict(task="paraphrase", regime="sft-dpo", epochs=3, handoff_epoch=2, lr=5e-3, dpo_lr=0.03, batch_size=8,
              eval_batch_size=8, device="cpu", precision="fp32", eval_init=False, log_every=100)


@pytest.fixture(scope="session")
def peaked_run(gpt2_base, shared_cache, tmp_path_factory) -> dict:
    """{"run": the run directory, "files": its data, "epochs": {epoch: a copy of that epoch's weights}}
    of the PEAKED run, trained once per session (the copies taken when each epoch's checkpoint is on disk)."""
    import shutil

    from sftdpo.config import RunConfig, cache_dir_at
    from sftdpo.train.loop import train

    root = tmp_path_factory.mktemp("peaked")
    files = qqp_files(root)
    out = root / "run"

    def keep(epoch: int) -> None:
        shutil.copyfile(out / "checkpoints" / "last" / "weights.safetensors", root / f"epoch{epoch}.safetensors")

    with cache_dir_at(shared_cache):
        train(RunConfig(model=str(gpt2_base), **files, **PEAKED), out, on_checkpoint=keep)
    return {"run": out, "files": files, "epochs": {e: root / f"epoch{e}.safetensors" for e in range(1, PEAKED["epochs"] + 1)}}


# -- checks of a finished run against the plain evaluator -------------------------------------------

def starter_preprocess(s: str) -> str:
    """The CS224N starter's datasets.py::preprocess_string."""
    return " ".join(s.lower().replace(".", " .").replace("?", " ?").replace(",", " ,").replace("'", " '").split())


def paraphrase_dev(files: dict[str, str]) -> dict[str, dict]:
    """id -> row of every dev pair whose question pair the train file does not hold."""
    train = {pair_key(r["q1"], r["q2"]) for r in read_qqp_tsv(files["train"])}
    return {r["id"]: r for r in read_qqp_tsv(files["dev"]) if pair_key(r["q1"], r["q2"]) not in train}


def paraphrase_prompts(dev: dict[str, dict], preprocess: bool = False) -> dict[str, str]:
    f = starter_preprocess if preprocess else (lambda s: s)
    return {i: CS224N_PROMPT.format(q1=f(r["q1"]), q2=f(r["q2"])) for i, r in dev.items()}


def check_cloze_run(run_dir: Path, model, tok, prompts: dict[str, str], refs: dict[str, str],
                    labels: list[tuple[str, str]], precision: str, argmax: bool = False, min_each: int = 3,
                    summary_prefix: str = "dev/") -> dict[str, str]:
    """A classification run's dev_outputs.jsonl and predictions.csv against the plain evaluator on
    `model` (the run's weights), example by example (by id), and its accuracy and macro-F1 against
    scikit-learn's on them. Returns id -> prediction.

    Every label must be predicted at least `min_each` times (a constant predictor fails), and the two
    sides may disagree only on a tie within rounding (`tie_band`), which must be rare."""
    ours = run_outputs(run_dir)
    rows = {json.loads(x)["id"]: json.loads(x) for x in (Path(run_dir) / "dev_outputs.jsonl").read_text().splitlines()}
    assert set(ours) == set(prompts), (sorted(set(ours) ^ set(prompts))[:5], "the dev examples are not the dev file's")
    assert {i: r["reference"] for i, r in rows.items()} == refs
    oracle = cloze_predictions(model, tok, prompts, labels, precision, argmax=argmax)
    counts = Counter(p for p, _ in oracle.values())
    assert all(counts[v] >= min_each for v, _ in labels), f"the model does not vary its predictions enough: {counts}"
    wrong, ties = disagreements(ours, oracle, precision)
    assert not wrong, f"{len(wrong)} of {len(oracle)} predictions differ from the plain evaluator's: {wrong[:4]}"
    assert ties <= len(oracle) // 4, f"{ties} of {len(oracle)} decisions within rounding of a tie: the check is weak"
    with open(Path(run_dir) / "predictions.csv", newline="") as f:
        assert {r["id"]: (r["prediction"], r["label"]) for r in csv.DictReader(f)} == \
            {i: (ours[i], refs[i]) for i in ours}
    ids = sorted(oracle)
    pred = [ours[i] if oracle[i][1] <= tie_band(precision) else oracle[i][0] for i in ids]
    ref = [refs[i] for i in ids]
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    assert summary[f"{summary_prefix}accuracy"] == pytest.approx(accuracy_score(ref, pred), abs=1e-12)
    assert summary[f"{summary_prefix}macro_f1"] == pytest.approx(f1_score(ref, pred, average="macro", zero_division=0),
                                                                 abs=1e-12)
    return dict(zip(ids, pred))


def corpus_chrf(hyps: list[str], refs: list[str]) -> float:
    return CHRF().corpus_score(hyps, [refs]).score


def corpus_bleu(hyps: list[str], refs: list[str]) -> float:
    return BLEU().corpus_score(hyps, [refs]).score
