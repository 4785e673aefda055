"""`sftdpo preview`: the first training and dev examples exactly as the model receives them (text, token
ids, which positions carry the loss or form the DPO response, the label tokens), from the tokenizer
alone, so a data or template problem shows before an hour of training."""

from __future__ import annotations

from typing import Iterator

from .config import RunConfig
from .models import load_tokenizer
from .tasks import ClassifyTask, GenerateTask, Task, make_task


def _show(tok, ids: list[int]) -> str:
    return repr(tok.decode(ids))


def preview(cfg: RunConfig, n: int = 3) -> Iterator[str]:
    """Lines describing the first `n` training and dev examples of `cfg`'s task."""
    tok = load_tokenizer(cfg.model)
    task: Task = make_task(cfg, tok)
    yield f"task {cfg.task_name or cfg.task} ({getattr(task, 'kind', cfg.task)}), model {cfg.model}'s tokenizer, " \
          f"conventions {cfg.conventions}; data: {task.source}"
    yield f"{len(task.train_ids)} training examples, {len(task.dev)} dev examples; --max-length {cfg.max_length}"
    if isinstance(task, ClassifyTask):
        yield from _classify(task, cfg, n)
    elif isinstance(task, GenerateTask):
        yield from _generate(task, cfg, n)


def _classify(task: ClassifyTask, cfg: RunConfig, n: int) -> Iterator[str]:
    tok = task.tok
    words = ", ".join(f"{v}={w!r} (token {t})" for (v, w), t in zip(task.labels, task.label_ids))
    yield f"label tokens: {words}; prediction: {cfg.predict}; preprocess: {cfg.preprocess}"
    for split, examples, ids in (("train", task.train, task.train_ids), ("dev", task.dev, task.dev_ids)):
        for i, (e, seq) in enumerate(zip(examples[:n], ids[:n])):
            gold = task.label_id(e)
            yield ""
            yield f"{split} {i + 1} (id {e.id}): label {e.label} -> {tok.decode([gold])!r} (token {gold})"
            yield f"  text ({len(seq)} tokens): {_show(tok, seq)}"
            yield f"  token ids: {seq}"
            if split == "train":
                yield (f"  SFT: the loss is the cross-entropy of token {gold} at the last position ({len(seq) - 1}), "
                       "over the whole vocabulary")
                wrong = task.wrong_label_ids(gold)
                yield (f"  DPO: chosen {tok.decode([gold])!r} ({gold}) vs rejected "
                       + ", ".join(f"{tok.decode([t])!r} ({t})" for t in wrong)
                       + (" (or the strongest of them: --pairs hardest)" if len(wrong) > 1 else ""))


def _generate(task: GenerateTask, cfg: RunConfig, n: int) -> Iterator[str]:
    tok = task.tok
    for i, (seq, start) in enumerate(zip(task.train_ids[:n], task.loss_start[:n])):
        first = max(1, start)
        yield ""
        yield f"train {i + 1}: {len(seq)} tokens, the loss on positions {first}..{len(seq) - 1} ({len(seq) - first} tokens)"
        yield f"  prompt (no loss): {_show(tok, seq[:first])}"
        yield f"  with loss: {_show(tok, seq[first:])}"
        yield f"  token ids: {seq}"
    for i, e in enumerate(task.pair_examples[:n]):
        prompt = task.tokens(e.prompt)
        chosen = task.response_tokens(e.completion)
        yield ""
        yield f"DPO pair {i + 1} (--pairs {cfg.pairs}): prompt {len(prompt)} tokens {e.prompt!r}"
        yield f"  response = chosen, {len(chosen)} tokens: {_show(tok, chosen)}"
        yield "  rejected: " + ("from the pair file" if cfg.pairs.startswith("file:") else
                                "sampled from the model at the hand-off (needs the weights)")
    prompts = [task.prompt_text(s) for s in task.dev[:n]] if hasattr(task, "prompt_text") else [e.prompt for e in task.dev[:n]]
    for i, p in enumerate(prompts):
        ids = task.tokens(p)
        yield ""
        yield f"dev {i + 1}: generation prompt ({len(ids)} tokens): {p!r}"
        yield f"  token ids: {ids}"
    yield ""
    yield (f"decoding: temperature {cfg.temperature}{' (greedy)' if cfg.temperature == 0 else ''}, top-p {cfg.top_p}, "
           f"at most {cfg.max_new_tokens} new tokens, stop at {tok.eos_token!r}; metric {task.primary_metric}")
