"""Task contracts that mutmut's survivors showed untested (`make mutate`, docs/mutation.md).

Oracles: the tokenizer's own token counts and the rows as written, never the task's helpers; for the
subsets, data/subsets.subsample at seed 0, the convention every task shares.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sftdpo.config import RunConfig, SftdpoError
from sftdpo.models import load_model
from sftdpo.tasks import make_task

from conftest import make_tiny_task, write_jsonl

TINY = dict(model="tiny-llama", device="cpu", precision="fp32", eval_batch_size=8)


def test_classify_max_length_must_hold_the_template_and_two_tokens(cache, tmp_path):
    """--max-length is refused exactly when it cannot hold the template's own tokens (its fields empty,
    counted here with the tokenizer) plus two: the boundary moves if the fixed text is taken as empty
    (nothing is ever refused) or the fields are filled with anything but nothing."""
    template = "Topic of: {text}\nAnswer:"
    rows = [{"text": f"a dog {i}", "label": i % 2} for i in range(8)]
    train = str(write_jsonl(tmp_path / "train.jsonl", rows))
    dev = str(write_jsonl(tmp_path / "dev.jsonl", [{"text": f"a cat {i}", "label": i % 2} for i in range(4)]))
    _, tok = load_model("tiny-llama")
    fixed = len(tok("Topic of: \nAnswer:", add_special_tokens=False).input_ids)
    base = dict(task="classify", template=template, labels="0=animal,1=money", train=train, dev=dev, **TINY)
    make_task(RunConfig(**base, max_length=fixed + 2), tok)  # room for the fixed text and two tokens: accepted
    with pytest.raises(SftdpoError, match=f"too short for the classify prompt: its fixed text alone is {fixed} tokens"):
        make_task(RunConfig(**base, max_length=fixed + 1), tok)


def test_language_modelling_pairs_split_each_text_at_its_prompt_lines(cache, tmp_path):
    """A text row's DPO pair example (generate task, language-modelling data) is its first
    --prompt-lines lines as the prompt and every later line, in order and joined by newlines, as the
    gold completion: prompt + completion is the row again. Catches the rest joined another way, lines
    dropped or repeated at the split."""
    texts = [f"one {i}\ntwo {i}\nthree {i}\nfour {i}\nfive {i}" for i in range(6)]
    train = str(write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in texts]))
    dev = str(write_jsonl(tmp_path / "d.jsonl", [{"text": "d1\nd2\nd3\nd4"}]))
    _, tok = load_model("tiny-llama")
    task = make_task(RunConfig(task="generate", train=train, dev=dev, prompt_lines=2, **TINY), tok)
    pairs = {e.prompt + e.completion: e for e in task.pair_examples}
    assert sorted(pairs) == sorted(texts)
    for text, e in pairs.items():
        lines = text.split("\n")
        assert e.prompt == lines[0] + "\n" + lines[1] + "\n"
        assert e.completion == f"{lines[2]}\n{lines[3]}\n{lines[4]}"


def _sonnet_task(tiny_data, **kw):
    model, tok = load_model("tiny-llama", seed=2)
    model.eval()
    cfg, task = make_tiny_task(tiny_data, "sonnet", "tiny-llama", tok, **{"max_new_tokens": 6, "temperature": 1.0,
                                                                          "top_p": 1.0, **kw})
    return model, tok, cfg, task


def test_sonnet_generation_runs_in_the_precision_it_is_given(cache, tiny_data):
    """Evaluation in bf16 decodes under bf16 autocast (every forward of the generation sees it), in
    fp32 without it. Catches the evaluation's precision dropped on the way to the decoder (the dev
    metrics of a bf16 run would then be fp32 numbers)."""
    model, _, _, task = _sonnet_task(tiny_data)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda *_: seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")))
    try:
        task.evaluate(model, torch.device("cpu"), "bf16")
        bf16, seen[:] = list(seen), []
        task.evaluate(model, torch.device("cpu"), "fp32")
    finally:
        hook.remove()
    assert len(bf16) >= 6 and set(bf16) == {torch.bfloat16}
    assert len(seen) == len(bf16) and set(seen) == {False}


def test_sonnet_generation_samples_with_the_run_seed(cache, tiny_data):
    """Sampled dev generations follow --seed: the evaluation of a seed-3 run equals the sampler called
    with seed 3 directly, and differs from seed 0's. Catches the seed dropped between the evaluation
    and the sampler (every run would then sample with the default seed)."""
    from sftdpo.ops.generation import generate_ids

    model, tok, cfg, task = _sonnet_task(tiny_data, seed=3)
    ev = task.evaluate(model, torch.device("cpu"), "fp32")
    prompts = [task.tokens(task.prompt_text(s)) for s in task.dev]

    def sampled(seed):
        ids = generate_ids(model, prompts, torch.device("cpu"), "fp32", pad_id=task.pad_id, eos_id=tok.eos_token_id,
                           temperature=1.0, top_p=1.0, max_new_tokens=6, seed=seed, batch_size=cfg.eval_batch_size)
        return [task.prompt_text(s) + tok.decode(x, skip_special_tokens=True).rstrip() for s, x in zip(task.dev, ids)]

    got = [samples[0] for _, samples in ev.generations]
    assert got == [t.strip() for t in sampled(3)]
    assert got != [t.strip() for t in sampled(0)]


def test_generated_text_leaves_out_special_tokens(cache, tiny_data, monkeypatch):
    """A chat model can sample a special token (SmolLM2's <|im_start|>) before its end of text: the
    generated text, which chrF scores, leaves it out (the tokenizer's own decode without specials).
    Catches special tokens decoded into the text."""
    model, tok, _, task = _sonnet_task(tiny_data)
    ids = tok("hello", add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_start|>")]
    ids += tok(" world", add_special_tokens=False).input_ids
    monkeypatch.setattr(task, "generate_ids", lambda *a, **k: [ids])
    assert task.generate(model, ["x"], torch.device("cpu"), "fp32", temperature=1.0, top_p=1.0,
                         max_new_tokens=3) == [["hello world"]]


@pytest.mark.parametrize("batch_size,grad_accum,world_size", [(3, 1, 2), (2, 3, 1), (2, 2, 3)])
def test_the_step_count_is_the_steps_an_epoch_yields(batch_size, grad_accum, world_size):
    """n_train_steps (the schedule's length, the progress bar's total) is the number of optimizer steps
    train_steps yields, on every rank, for row counts around the global batch's multiples; and the
    ranks' rows of each step are disjoint and make up the epoch, their loss shares summing to 1.
    Catches the global batch counted without the ranks or the accumulation (a schedule that ends
    before or after the epoch does), and a rank that trains on other ranks' rows."""
    from types import SimpleNamespace

    from sftdpo.tasks import Task

    cfg = RunConfig(batch_size=batch_size, grad_accum=grad_accum, seed=1)
    per_step = batch_size * grad_accum * world_size
    for n in (1, per_step - 1, per_step, per_step + 1, 5 * per_step + 2):
        ranks = [Task(cfg, SimpleNamespace(pad_token_id=0), rank=r, world_size=world_size) for r in range(world_size)]
        steps = [t.train_steps([4] * n, epoch=1) for t in ranks]
        for task, mine in zip(ranks, steps):
            assert len(mine) == task.n_train_steps(n) == -(-n // per_step)
        # a rank left without rows holds a stand-in row that trains on nothing (share 0)
        rows = [[i for mine in steps for micro, share in mine[k] if share for i in micro] for k in range(len(steps[0]))]
        assert sorted(i for step in rows for i in step) == list(range(n))  # every row once, on one rank
        for k in range(len(rows)):
            assert sum(share for mine in steps for _, share in mine[k]) == pytest.approx(1.0)


def test_sonnet_task_takes_the_seed_0_subsets_every_task_takes(cache, tiny_data):
    """--max-train-examples, --data-fraction and --max-dev-examples cut the sonnets as every task cuts its
    data (data/subsets.py: one seed-0 permutation whatever --seed, so a seed study's runs share their
    sonnets and a data-scale study's smaller sets sit inside its larger ones). 9 train sonnets (the tiny
    data's 12 less its 3 dev ones) and 3 dev: a cap of 5 gives 5, a fraction of 0.25 gives 2 (inside the
    5), a dev cap of 2 gives 2. Catches a cut ignored, the fraction dropped, a permutation seeded otherwise
    (or not at all), so that seeds or fractions would train on unrelated sonnets, and the data's source
    not recorded."""
    from sftdpo.data import load_task_data
    from sftdpo.data.subsets import subsample

    _, tok = load_model("tiny-llama")
    capped = make_tiny_task(tiny_data, "sonnet", "tiny-llama", tok, max_train_examples=5, max_dev_examples=2)[1]
    cfg, part = make_tiny_task(tiny_data, "sonnet", "tiny-llama", tok, max_train_examples=None, data_fraction=0.25, seed=4)
    data = load_task_data(cfg)
    numbers = lambda sonnets: [s.number for s in sonnets]  # noqa: E731
    assert len(data.train) == 9 and len(data.dev) == 3
    assert numbers(capped.train) == numbers(subsample(data.train, 5, 1.0, seed=0)) and len(capped.train) == 5
    assert numbers(part.train) == numbers(subsample(data.train, None, 0.25, seed=0)) and len(part.train) == 2
    assert set(numbers(part.train)) < set(numbers(capped.train))
    assert numbers(capped.dev) == numbers(subsample(data.dev, 2, 1.0, seed=0)) and len(capped.dev) == 2
    assert [e.id for e in capped.pair_examples] == [str(n) for n in numbers(capped.train)]
    assert capped.source == data.source and "sonnets.txt" in data.source  # summary.json's data_source


@pytest.mark.parametrize("task_name", ["sonnet", "paraphrase"])
def test_each_task_trains_on_its_ranks_share_of_a_batch(cache, tiny_data, task_name):
    """Under data parallelism a task built for rank r of 2 trains on its half of each global batch: in
    every step the two ranks' rows (those with a loss share) are disjoint and together the single
    process's step (batch 2 x 4). Catches the rank and world size dropped on the way to the task (every
    rank would then train on every row: the effective batch and the learning signal silently doubled)."""
    _, tok = load_model("tiny-llama")
    cfg, whole = make_tiny_task(tiny_data, task_name, "tiny-llama", tok, batch_size=8)
    cfg = dataclasses.replace(cfg, batch_size=4)
    ranks = [make_task(cfg, tok, rank=r, world_size=2) for r in (0, 1)]
    assert [(t.rank, t.world_size) for t in ranks] == [(0, 2), (1, 2)]

    def step_rows(task):
        return [sorted(int(i) for b in step if b.share > 0 for i in b.index) for step in task.sft_steps(1)]

    per_rank, single = [step_rows(t) for t in ranks], step_rows(whole)
    assert len(per_rank[0]) == len(per_rank[1]) == len(single) >= 1
    for r0, r1, one in zip(*per_rank, single):
        assert not set(r0) & set(r1) and sorted(r0 + r1) == one
    assert max(len(r) for r in per_rank[1]) > 0


@pytest.mark.parametrize("prompt_newline", [True, False])
def test_sonnet_evaluation_scores_and_writes_each_sample_against_its_own_sonnet(cache, tiny_data, tmp_path,
                                                                                prompt_newline):
    """SonnetTask.evaluate and write_outputs with the decoder replaced by a fixed one (two samples, a
    different continuation per sonnet and sample), checked against sacrebleu's chrF and the course's file
    format read by the test's own parser: the full sonnet is the three prompt lines, their newline (or
    none with --prompt-newline false) and the continuation, stripped; dev/chrf is the mean over samples of
    the corpus chrF of full sonnets against the true ones, dev/chrf_continuation of the continuations
    against the true sonnets less their first three lines. Catches the decoding settings (temperature,
    top-p, length, samples, seed) not passed on, samples scored against the wrong sonnet or summed instead
    of averaged, the continuation scored with the prompt, outputs of the second sample reported as the
    first, and samples written to the wrong file."""
    import oracle

    model, tok, cfg, task = _sonnet_task(tiny_data, num_samples=2, temperature=0.7, top_p=0.9, seed=5,
                                         prompt_newline=prompt_newline)
    true = oracle.read_sonnets(tiny_data["sonnet"]["dev"])
    assert sorted(true) == [s.number for s in task.dev] == [1, 2, 3]
    prompts = {n: "\n".join(t.split("\n")[:3]) for n, t in true.items()}
    calls = []

    def generate(m, texts, device, precision, **kw):
        calls.append((texts, precision, kw))
        return [[f" thy {len(t)} summer{'s' * k} fade \n" for k in range(2)] for t in texts]

    task.generate = generate
    ev = task.evaluate(model, torch.device("cpu"), "fp32")
    nl = "\n" if prompt_newline else ""
    assert calls == [([prompts[n] + nl for n in (1, 2, 3)], "fp32",
                      dict(temperature=0.7, top_p=0.9, max_new_tokens=6, num_samples=2, seed=5))]
    conts = {k: {n: f"thy {len(prompts[n] + nl)} summer{'s' * k} fade" for n in true} for k in range(2)}
    full = {k: {n: prompts[n] + nl + " " + conts[k][n] for n in true} for k in range(2)}
    nums = [1, 2, 3]
    want = sum(oracle.corpus_chrf([full[k][n] for n in nums], [true[n] for n in nums]) for k in range(2)) / 2
    cont_refs = ["\n".join(true[n].split("\n")[3:]) for n in nums]
    want_cont = sum(oracle.corpus_chrf([conts[k][n] for n in nums], cont_refs) for k in range(2)) / 2
    assert ev.metrics == pytest.approx({"chrf": want, "chrf_continuation": want_cont}, abs=1e-9)
    assert oracle.corpus_chrf([full[0][n] for n in nums], [true[n] for n in nums]) != pytest.approx(want)
    assert ev.outputs == [(str(n), full[0][n], true[n]) for n in nums]
    task.write_outputs(tmp_path, ev)
    assert oracle.read_sonnets(tmp_path / "generations.txt") == {n: full[0][n] for n in nums}
    assert oracle.read_sonnets(tmp_path / "generations_sample1.txt") == {n: full[1][n] for n in nums}


def test_sonnet_training_sequences_are_whole_sonnets_and_empty_dev_data_is_refused(cache, tiny_data):
    """What SFT trains on: each training sonnet's own tokens (the tokenizer's) and end of text, with the loss
    on every token (the CS224N convention), nothing before them; the test prompts kept for `predict
    --split test`; a dev set left empty refused in one line. Catches a prompt or marker put before the
    sonnet, the loss started after some tokens, the test prompts dropped, and an empty dev set accepted
    (the run would train, then fail or score nothing at its first evaluation)."""
    from sftdpo.data import SonnetData, load_task_data
    from sftdpo.tasks.sonnet import SonnetTask

    _, tok, cfg, task = _sonnet_task(tiny_data)
    for s, ids, start in zip(task.train, task.train_ids, task.loss_start):
        assert ids == (tok(s.text, add_special_tokens=False).input_ids + [tok.eos_token_id])[: cfg.max_length]
        assert start == 0
    data = load_task_data(cfg)
    prompts = data.dev[:2]
    assert SonnetTask(cfg, tok, SonnetData(data.train, data.dev, prompts, "x")).test_prompts == prompts
    for train, dev in ((data.train, []), ([], data.dev)):
        with pytest.raises(SftdpoError, match="sonnet data is empty after subsampling"):
            SonnetTask(cfg, tok, SonnetData(train, dev, [], "x"))
