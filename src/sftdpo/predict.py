"""`sftdpo predict RUN`: the CS224N GPT-2 project's submission files from a trained run, in the starter
code's exact formats (docs/cs224n.md):

  paraphrase  para-dev-output.csv, para-test-output.csv: a header `id \\t Predicted_Is_Paraphrase `,
              then `<id>, <prediction> ` per pair (paraphrase_detection.py::test); the prediction is
              1 or 0 (a token that is no label word, under --predict argmax, is written as its id)
  sonnets     generated_sonnets_dev.txt, generated_sonnets.txt: `--Generated Sonnets-- `, then per
              sonnet its position (0, 1, ...) and the prompt with its continuation
              (sonnet_generation.py::generate_submission_sonnets)

Dev predictions come from the run's own dev examples (dev prompts: sonnets_held_out_dev.txt, which
holds the first 3 lines of the TRUE dev sonnets), so they reproduce its dev metrics; test inputs are
quora-test-student.csv and sonnets_held_out.txt. A LoRA run predicts with its adapter applied (decoding
merges it into a copy), never merging it into the saved weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .config import RunConfig, SftdpoError, find_in_data_dirs
from .data import ParaphraseExample, read_cs224n_sonnets, read_qqp
from .files import atomic_path
from .train.loop import Run, load_run

log = logging.getLogger("sftdpo")

# the starter's test loader builds another prompt than train/dev (datasets.py::ParaphraseDetectionTestDataset)
CS224N_TEST_PROMPT = 'Is "{q1}" a paraphrase of "{q2}"? Answer "yes" or "no": '


def write_para_output(path: Path, rows: list[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("id \t Predicted_Is_Paraphrase \n")
        for rid, pred in rows:
            f.write(f"{rid}, {pred} \n")


def write_sonnet_output(path: Path, sonnets: list[str]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("--Generated Sonnets-- \n\n")
        for i, text in enumerate(sonnets):
            f.write(f"\n{i}\n")
            f.write(f"{text}\n\n")


def _value(pred: str) -> str:
    return pred.removeprefix("token:")


def predict_run(run_dir: str | Path, *, checkpoint: str = "best", split: str = "dev", out: str | Path | None = None,
                test: str | None = None, test_prompt: str = "train") -> Path:
    """Write the run's submission file for `split`; returns its path."""
    run_dir = Path(run_dir)
    conf = run_dir / "config.json"
    if not conf.exists():
        raise SftdpoError(f"{run_dir} is not a run directory (no config.json)")
    cfg = RunConfig.from_dict(json.loads(conf.read_text())["config"])
    if cfg.task not in ("paraphrase", "sonnet"):
        raise SftdpoError(f"sftdpo predict writes the CS224N course files of the paraphrase and sonnet tasks; {run_dir} "
                          f"is a {cfg.task} run (its dev outputs are in dev_outputs.jsonl)")
    if split not in ("dev", "test"):
        raise SftdpoError(f"--split must be dev or test (got {split!r})")
    run = load_run(run_dir, checkpoint)
    out_dir = Path(out) if out else run_dir / "predictions"
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.task == "paraphrase":
        return _paraphrase(run, split, out_dir, test, test_prompt)
    return _sonnets(run, split, out_dir, test)


def _paraphrase(run: Run, split: str, out_dir: Path, test: str | None, test_prompt: str) -> Path:
    task = run.task
    if split == "dev":
        ev = task.evaluate(run.model, run.device, run.precision)
        path = out_dir / "para-dev-output.csv"
        write_para_output(path, [(i, _value(p)) for i, p, _ in ev.outputs])
        return path
    src = Path(test) if test else find_in_data_dirs("qqp/quora-test-student.csv")
    if src is None:
        raise SftdpoError("no QQP test file: put the CS224N quora-test-student.csv in $SFTDPO_DATA_DIR/qqp/ or pass --test")
    examples, _ = read_qqp(src)
    task.dev = [ParaphraseExample(e.id, e.q1, e.q2, 0) for e in examples]  # labels unknown: predictions only
    if test_prompt == "cs224n":  # the starter's test prompt, another template than train/dev (docs/cs224n.md)
        task.dev_ids = [task.encode_prompt(CS224N_TEST_PROMPT.format(q1=task.text(e.q1), q2=task.text(e.q2)))
                        for e in task.dev]
    else:
        task.dev_ids = [task.encode(e) for e in task.dev]
    with torch.no_grad():
        preds = task.predict(run.model, run.device, run.precision)
    path = out_dir / "para-test-output.csv"
    write_para_output(path, [(e.id, _value(p)) for e, p in zip(task.dev, preds)])
    log.info("%d test predictions from %s", len(preds), src)
    return path


def _sonnets(run: Run, split: str, out_dir: Path, test: str | None) -> Path:
    task = run.task
    if split == "dev":
        ev = task.evaluate(run.model, run.device, run.precision)  # the run's own dev generation: the same samples
        path = out_dir / "generated_sonnets_dev.txt"
        write_sonnet_output(path, [samples[0] for _, samples in ev.generations])
        return path
    prompts = read_cs224n_sonnets(test) if test else task.test_prompts
    if not prompts:
        raise SftdpoError("no sonnet test prompts: put the CS224N sonnets_held_out.txt in $SFTDPO_DATA_DIR/sonnets/ "
                          "or pass --test")
    cfg = run.cfg
    gens = task.generate(run.model, [task.prompt_text(s) for s in prompts], run.device, run.precision,
                         temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    path = out_dir / "generated_sonnets.txt"
    write_sonnet_output(path, [(task.prompt_text(s) + g[0]).strip() for s, g in zip(prompts, gens)])
    return path
