"""Preference pairs: how they are built for each task kind, stored, and batched.

Classification (paraphrase, classify): prompt = a training example's cloze prompt; chosen = the gold
label word's token; rejected = the other label words' tokens (`--pairs v1`: each of them, one pair
each) or the strongest wrong one (`--pairs hardest`: the highest under the model at the hand-off).
The responses are one token each after the same prompt, so one forward pass of the prompt gives
every pair's log-probs: a DPO step costs one SFT step. For paraphrase (two labels) v1 and hardest
are the same pair.

Generation (sonnet, generate): prompt = a training prompt; chosen = its gold completion; rejected =
a completion sampled from the policy at the hand-off (the pretrained backbone for DPO-only; with LoRA
DPO-only, sampled with the adapter disabled, which is the same function at initialisation). The
paper does not publish its pair-construction variants in full; these are the toolkit's own (`--pairs`):

  v1  one sampled rejection per training prompt, at --temperature (and --top-p, --max-new-tokens).
  v2  --pairs-n rejections per prompt, sample j at temperature --pairs-temperatures[j mod len];
      all pairs kept (n pairs per prompt).
  v3  v2's generations, then the top-K pairs by chrF gap, K = --pairs-top-k (default: the number
      of training prompts). gap = chrF(chosen, true) - chrF(rejected, true) = 100 - sentence chrF
      of the rejected completion against the gold one. Biggest gap first; ties broken by prompt
      order, then sample order (deterministic). A small K can collapse onto few prompts: the number
      of unique prompts kept is reported (the pair file's header, the stage description).
  file:PATH  pairs from a file or dataset in TRL's preference formats (data/preferences.py).

A sampled pair set is a JSONL file under `<cache>/pairs/<key>.jsonl` whose first line is a provenance
header (generating-weights fingerprint, temperature(s), seeds, version, n, top_k, ...) and whose
other lines are pairs (prompt, chosen, rejected, id, temperature, gap, ...). The key covers the
generating weights' fingerprint, the construction parameters and the training prompts, so asking
for the same construction again reuses the file (v3 also reuses v2's generations).

As token ids, prompt and response are tokenized separately and concatenated (the response ends
with end-of-text, as in SFT), so the response boundary is exact. Sequence batches put chosen and
rejected in ONE forward pass (2B right-padded rows, chosen rows first), in length-bucketed batches
over max(len chosen, len rejected).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ... import stats
from ...config import RunConfig, cache_dir
from ...files import DamagedFile, hash_id_lists, stable_hash, write_text_atomic
from ...models import rounding_id
from ...ops.batching import Batch, pad_batch, to_device
from ...data.preferences import Preference
from ...errors import SftdpoError
from ...tasks import ClassifyTask, GenerateTask

log = logging.getLogger("sftdpo")

CACHE_VERSION = 1  # bump when the way pairs or reference log-probs are computed changes
PAIR_SEED_STRIDE = 1000  # sample group g (one temperature) is drawn with seed cfg.seed + 1000 * g


@dataclass
class PairSet:
    """Token ids of the preference pairs: responses follow the prompt directly. For one-token
    responses (classification) each row is a prompt: `chosen[i]` = [gold token] and `rejected[i]` =
    its rejected tokens, one pair each; otherwise each row is one pair of token sequences."""

    prompt: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]

    def __len__(self) -> int:
        return len(self.prompt)

    def data_hash(self) -> str:
        return hash_id_lists(self.prompt, self.chosen, self.rejected)

    def response_lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of each chosen and rejected response (what a mean log-prob divides by)."""
        return (torch.tensor([len(c) for c in self.chosen], dtype=torch.float32),
                torch.tensor([len(r) for r in self.rejected], dtype=torch.float32))

    def lengths(self, one_token_responses: bool) -> list[int]:
        """What a batch of each row costs: the prompt (one-token responses are read from the
        prompt's last position), else prompt + the longer response."""
        if one_token_responses:
            return [len(p) for p in self.prompt]
        return [len(p) + max(len(c), len(r)) for p, c, r in zip(self.prompt, self.chosen, self.rejected)]

    def pairs_per_row(self, one_token_responses: bool) -> list[int] | None:
        """The loss units of each row (its pairs) for one-token responses; None: one pair per row."""
        return [len(r) for r in self.rejected] if one_token_responses else None


@dataclass
class PairBatch:
    """A batch of pairs: the token batch plus the cached reference log-probs (summed over each response's
    tokens; None for a reference-free objective) and the response lengths of its pairs. With one-token
    responses `batch` holds the prompts, `chosen` (B,) and `rejected` (B, R) the answer tokens,
    `ref_rejected` (B, R) and `mask` (B, R) which of the R slots are pairs; else `batch` holds 2B rows
    (prompt + chosen, then prompt + rejected) and its labels mark the responses."""

    batch: Batch
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_len: torch.Tensor
    rejected_len: torch.Tensor
    chosen: torch.Tensor | None = None
    rejected: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def to(self, device: torch.device) -> "PairBatch":
        mv = lambda t: to_device(t, device)  # noqa: E731
        return PairBatch(self.batch.to(device), mv(self.ref_chosen), mv(self.ref_rejected), mv(self.chosen_len),
                         mv(self.rejected_len), mv(self.chosen), mv(self.rejected), mv(self.mask))

    @property
    def n_tokens(self) -> int:
        return self.batch.n_tokens

    @property
    def share(self) -> float:
        return self.batch.share


def one_token_responses(task: Any) -> bool:
    """Whether the task's responses are one-token answers read from the prompt's last position."""
    return getattr(task, "kind", None) == "classify"


# -- classification ------------------------------------------------------------------------------

def label_pair_set(task: ClassifyTask, rejected: list[list[int]] | None = None) -> PairSet:
    """A pair row per training example: its prompt, its gold label token, and `rejected` (default:
    every wrong label's token)."""
    if rejected is None:
        rejected = [task.wrong_label_ids(lab) for lab in task.train_labels]
    return PairSet(list(task.train_ids), [[lab] for lab in task.train_labels], rejected)


def hardest_rejections(task: ClassifyTask, label_logps: torch.Tensor) -> list[list[int]]:
    """Per training example, the wrong label with the highest log-prob under `label_logps` (N labels
    in task.label_ids order, one row per example); ties: the earlier label."""
    out = []
    for lab, row in zip(task.train_labels, label_logps.tolist()):
        wrong = [(lp, -j, t) for j, (t, lp) in enumerate(zip(task.label_ids, row)) if t != lab]
        out.append([max(wrong)[2]])
    return out


def label_pair_rows(task: ClassifyTask, ps: PairSet) -> list[dict]:
    """The pairs as rows of the run's pairs.jsonl (the prompt is the train example's)."""
    dec = task.tok.decode
    return [{"id": e.id, "prompt_index": i, "chosen": dec(c), "rejected": dec([t]), "chosen_id": c[0], "rejected_id": t}
            for i, (e, c, r) in enumerate(zip(task.train, ps.chosen, ps.rejected)) for t in r]


def prompt_batch(task: ClassifyTask, ps: PairSet, rows: Sequence[int]) -> tuple[Batch, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompts, chosen tokens (B,), rejected tokens (B, R), mask (B, R)) of one-token-response pair rows."""
    b = task.collate(list(rows))
    chosen = torch.tensor([ps.chosen[i][0] for i in rows])
    b.labels = chosen
    width = max(len(ps.rejected[i]) for i in rows)
    rejected = torch.tensor([ps.rejected[i] + [ps.chosen[i][0]] * (width - len(ps.rejected[i])) for i in rows])
    mask = torch.tensor([[j < len(ps.rejected[i]) for j in range(width)] for i in rows])
    return b, chosen, rejected, mask


# -- generation ----------------------------------------------------------------------------------

def collate_sequence_pairs(ps: PairSet, rows: Sequence[int], pad_id: int) -> Batch:
    """2B right-padded rows: prompt+chosen for each row, then prompt+rejected; labels mark the
    response tokens (-100 elsewhere)."""
    rows = list(rows)
    resp = [ps.chosen[i] for i in rows] + [ps.rejected[i] for i in rows]
    return collate_responses([ps.prompt[i] for i in rows] * 2, resp, pad_id, rows + rows)


def collate_responses(prompts: Sequence[list[int]], resp: Sequence[list[int]], pad_id: int, index: Sequence[int]) -> Batch:
    """Right-padded prompt + response rows; labels mark the response tokens (-100 elsewhere)."""
    b = pad_batch([p + r for p, r in zip(prompts, resp)], pad_id, index)
    labels = torch.full_like(b.input_ids, -100)
    for j, (p, r) in enumerate(zip(prompts, resp)):
        labels[j, len(p): len(p) + len(r)] = torch.tensor(r, dtype=torch.long)
    b.labels = labels
    return b


def sequence_pair_set(task: GenerateTask, pairs: list[dict]) -> PairSet:
    """Tokenize prompt and response separately (response + end-of-text, as SFT) and keep at most
    --max-length tokens per sequence (the response is cut from the right)."""
    max_len = task.cfg.max_length
    out = PairSet([], [], [])
    for p in pairs:
        prompt = task.tokens(p["prompt"])[-(max_len - 1):]
        room = max_len - len(prompt)
        out.prompt.append(prompt)
        out.chosen.append(task.response_tokens(p["chosen"])[:room])
        out.rejected.append(task.response_tokens(p["rejected"])[:room])
    return out


def file_pairs(task: GenerateTask, prefs: list[Preference]) -> list[dict]:
    """Preference rows as text pairs: conversations rendered with the tokenizer's chat template (the
    responses are what the full conversations add to the prompt with its generation prompt)."""
    out = []
    for i, p in enumerate(prefs):
        if isinstance(p.chosen, list):
            if not getattr(task.tok, "chat_template", None):
                raise SftdpoError(f"conversational preference pairs need a chat template, and the tokenizer of --model "
                                  f"{task.cfg.model} has none")
            prompt = task.render(p.prompt, True) if p.prompt else ""
            chosen, rejected = (task.render((p.prompt or []) + r, False)[len(prompt):] for r in (p.chosen, p.rejected))
        else:
            prompt, chosen, rejected = p.prompt, p.chosen, p.rejected
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "id": str(i), "prompt_index": i})
    return out


# -- pair files ----------------------------------------------------------------------------------

def write_pairs(path: Path, header: dict, pairs: list[dict]) -> None:
    lines = [json.dumps({"header": header}, ensure_ascii=False)] + [json.dumps(p, ensure_ascii=False) for p in pairs]
    write_text_atomic(path, "\n".join(lines) + "\n")


def read_pairs(path: Path, fix: str) -> tuple[dict, list[dict]]:
    """(header, pairs) of a pair file (or of KTO's examples); DamagedFile (with `fix`, what to do) when a
    line is unreadable or the file holds fewer pairs than its header counted (cut short at a line's end)."""
    header: dict = {}
    pairs: list[dict] = []
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DamagedFile(path, "missing", fix) from None
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise DamagedFile(path, f"line {n} is not JSON ({type(e).__name__})", fix) from None
        if not isinstance(rec, dict) or not (("header" in rec and len(rec) == 1) or {"prompt", "chosen", "rejected"} <= set(rec)
                                              or "rejected_id" in rec or {"completion", "label"} <= set(rec)):
            # (a pair; or one of KTO's unpaired examples, <run>/dpo/examples.jsonl)
            raise DamagedFile(path, f"line {n} is neither the header nor a pair", fix)
        if "header" in rec and len(rec) == 1:
            header = rec["header"]
        else:
            pairs.append(rec)
    for counted in ("pairs", "examples"):  # a pair file's count, KTO's examples'
        if header.get(counted) is not None and header[counted] != len(pairs):
            raise DamagedFile(path, f"{len(pairs)} rows where its header counts {header[counted]} {counted}", fix)
    return header, pairs


# -- sonnet pair construction --------------------------------------------------------------------

def select_top_k(pairs: list[dict], k: int) -> list[dict]:
    """v3 selection: the k pairs with the biggest chrF gap, biggest first; ties broken by prompt order
    then sample order (`prompt_index`, `sample_index`; list position where absent). Deterministic."""
    order = sorted(range(len(pairs)), key=lambda i: (-float(pairs[i]["gap"]), pairs[i].get("prompt_index", i),
                                                      pairs[i].get("sample_index", 0), i))
    return [pairs[i] for i in order[: max(0, k)]]


def unique_prompts(pairs: list[dict]) -> int:
    return len({(p.get("id", p.get("number")), p["prompt"]) for p in pairs})


def _pairs_key(version: str, fingerprint: str, cfg: RunConfig, task: GenerateTask, device: torch.device, precision: str,
               top_k: int | None) -> tuple[str, dict]:
    fields: dict[str, Any] = {
        "cache_version": CACHE_VERSION, "version": version, "model": cfg.model, "fingerprint": fingerprint,
        "train": stable_hash([[e.id, e.prompt, e.completion] for e in task.pair_examples], 20), "top_p": cfg.top_p,
        "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "precision": precision, "device": rounding_id(device),
        "generation_batch_size": cfg.eval_batch_size,
    }
    if version == "v1":
        fields["temperature"] = cfg.temperature
    else:
        fields["n"] = cfg.pairs_n
        fields["temperatures"] = list(cfg.pairs_temperatures)
    if version == "v3":
        fields["top_k"] = top_k
    return f"{version}-{stable_hash(fields, 16)}", fields


def _generate_pairs(task: GenerateTask, model, cfg: RunConfig, device: torch.device, precision: str, temps: list[float],
                    n: int) -> tuple[list[dict], list[int]]:
    """n samples per training prompt; sample j at temps[j % len(temps)], one generate call per temperature."""
    prompts = [e.prompt for e in task.pair_examples]
    samples: list[list[tuple[float, str] | None]] = [[None] * n for _ in prompts]
    seeds = []
    for g, t in enumerate(temps):
        js = list(range(g, n, len(temps)))
        if not js:
            continue
        seed = cfg.seed + PAIR_SEED_STRIDE * g
        seeds.append(seed)
        gens = task.generate(model, prompts, device, precision, temperature=t, top_p=cfg.top_p,
                             max_new_tokens=cfg.max_new_tokens, num_samples=len(js), seed=seed,
                             batch_size=cfg.eval_batch_size)
        for i, gs in enumerate(gens):
            for j, text in zip(js, gs):
                samples[i][j] = (t, text)
    pairs = []
    for i, e in enumerate(task.pair_examples):
        chosen = e.completion
        for j in range(n):
            t, rejected = samples[i][j]
            chrf = stats.corpus_chrf([rejected], [chosen]) if chosen else 0.0
            pairs.append({"prompt": prompts[i], "chosen": chosen, "rejected": rejected, "id": e.id,
                          "temperature": t, "prompt_index": i, "sample_index": j, "gap": 100.0 - chrf})
    return pairs, seeds


def build_generation_pairs(task: GenerateTask, model, cfg: RunConfig, device: torch.device, precision: str, *,
                           fingerprint: str, adapter_disabled: bool = False, write: bool = True) -> tuple[list[dict], Path]:
    """The sampled pair set for `cfg.pairs` (v1/v2/v3), generated by `model` (whose weights have `fingerprint`;
    with its adapter disabled if asked), cached as JSONL under <cache>/pairs/<key>.jsonl and reused
    when the same construction is asked again."""
    version = cfg.pairs
    top_k = (cfg.pairs_top_k if cfg.pairs_top_k is not None else len(task.pair_examples)) if version == "v3" else None
    key, fields = _pairs_key(version, fingerprint, cfg, task, device, precision, top_k)
    path = cache_dir() / "pairs" / f"{key}.jsonl"
    if path.exists():
        try:
            header, pairs = read_pairs(path, "generating them again")
            log.info("DPO pairs: reusing %s (%d pairs)", path, len(pairs))
            return pairs, path
        except DamagedFile as e:  # a cache entry: computed again
            log.warning("%s", e)

    if version == "v3":
        gen_cfg = RunConfig.from_dict({**cfg.to_dict(), "pairs": "v2"})
        gen_pairs, gen_path = build_generation_pairs(task, model, gen_cfg, device, precision, fingerprint=fingerprint,
                                                 adapter_disabled=adapter_disabled, write=write)
        gen_header = read_pairs(gen_path, "generating them again")[0] if gen_path.exists() else {}
        pairs = select_top_k(gen_pairs, top_k)
        seeds = gen_header.get("seeds")
        extra = {"generated_from": str(gen_path), "generated_pairs": len(gen_pairs)}
    else:
        temps = [cfg.temperature] if version == "v1" else [float(t) for t in cfg.pairs_temperatures]
        n = 1 if version == "v1" else cfg.pairs_n
        was_training = model.training
        t0 = time.perf_counter()
        with model.disable_adapter() if adapter_disabled else contextlib.nullcontext():
            pairs, seeds = _generate_pairs(task, model, cfg, device, precision, temps, n)
        model.train(was_training)
        log.info("DPO pairs: generated %d rejections in %.1f s", len(pairs), time.perf_counter() - t0)
        extra = {}
    header = {**fields, "key": key, "pairs": len(pairs), "unique_prompts": unique_prompts(pairs),
              "train_prompts": len(task.pair_examples), "seeds": seeds,
              "generator": "adapter-disabled base" if adapter_disabled else "policy at hand-off",
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra}
    if write:
        write_pairs(path, header, pairs)
    return pairs, path
