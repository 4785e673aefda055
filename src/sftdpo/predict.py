"""`sftdpo predict RUN`: the CS224N GPT-2 project's submission files from a trained run, in the starter
code's exact formats (docs/cs224n.md):

  paraphrase  para-dev-output.csv, para-test-output.csv: a header `id \\t Predicted_Is_Paraphrase `,
              then `<id>, <prediction> ` per pair (paraphrase_detection.py::test). The prediction
              (--label-format): `token-id`, what the starter writes, the argmax token's id (8505 / 3919 for
              GPT-2's "yes" / "no", a stray token's own id); `binary`, 1 / 0, and -1 for a stray token, so
              it never reads as a label. Default: token-id under --conventions cs224n, else binary.
  sonnets     generated_sonnets_dev.txt, generated_sonnets.txt: `--Generated Sonnets-- `, then per
              sonnet its position (0, 1, ...) and the prompt with its continuation, unstripped
              (sonnet_generation.py::generate_submission_sonnets): the starter's bytes for the same tokens

Dev predictions come from the run's own dev examples with its seed (dev prompts: the first 3 lines of
the TRUE dev sonnets, which sonnets_held_out_dev.txt holds), so they reproduce its dev metrics; test
inputs are quora-test-student.csv and sonnets_held_out.txt. The starter's test_sonnet pairs generated and
true sonnets by position, so a sonnet run evaluated on a cut dev set (--max-dev-examples) other than
the dev file's first sonnets is refused. A LoRA run predicts with its adapter applied (decoding merges
it into a copy), never merging it into the saved weights.

Only a finished run is read (predict and export share `load_finished_run`): an interrupted one would
give complete-looking files from weights it never finished. Each file is written beside its place and
renamed into it, so a failed write leaves the previous file as it was; nothing is written into the run
directory when --out is elsewhere.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .config import RunConfig, SftdpoError, find_in_data_dirs
from .data import ParaphraseExample, load_task_data, read_cs224n_sonnets, read_qqp, write_cs224n_generations
from .files import atomic_path, ensure_dir, lock_holder
from .study.index import epoch_records
from .train.checkpoint import WEIGHTS_FILE
from .train.loop import Run, load_run

log = logging.getLogger("sftdpo")

# the starter's test loader builds another prompt than train/dev (datasets.py::ParaphraseDetectionTestDataset)
CS224N_TEST_PROMPT = 'Is "{q1}" a paraphrase of "{q2}"? Answer "yes" or "no": '
LABEL_FORMATS = ("token-id", "binary")
DEFAULT_LABEL_FORMAT = {"cs224n": "token-id", "sftdpo": "binary"}
STRAY = "-1"  # binary: the argmax was no label word (a wrong answer whatever the gold label, as the starter counts it)
# the course's test inputs, by task: (data directory folder, file name)
TEST_FILES = {"paraphrase": ("qqp", "quora-test-student.csv"), "sonnet": ("sonnets", "sonnets_held_out.txt")}
# --recipe cs224n-starter: the weights each course file comes from (paraphrase_detection.py::test loads the epoch
# with the best dev accuracy, sonnet_generation.py::generate_submission_sonnets the last epoch's) and the
# paraphrase test prompt (the starter's test loader's own template)
SUBMISSION = {"paraphrase": {"checkpoint": "best", "test_prompt": "cs224n"},
              "sonnet": {"checkpoint": "last", "test_prompt": "train"}}


def run_config(run_dir: Path) -> RunConfig:
    conf = run_dir / "config.json"
    if not conf.is_file():
        raise SftdpoError(f"{run_dir} is not a run directory (no config.json)")
    return RunConfig.from_dict(json.loads(conf.read_text())["config"])


def load_finished_run(run_dir: str | Path, checkpoint: str, command: str) -> Run:
    """load_run for the commands that hand a run's results out (predict, export): a run that is not
    finished, or lacks the `checkpoint` weights, is refused with one line saying what to do."""
    check_finished(Path(run_dir), checkpoint, command)
    return load_run(run_dir, checkpoint)


def check_finished(run_dir: Path, checkpoint: str, command: str) -> None:
    """Refuse (one line, what to do) a run that is not finished or lacks the `checkpoint` weights."""
    cfg = run_config(run_dir)
    if not (run_dir / "summary.json").exists():
        done = sum(r.get("stage") != "init" for r in epoch_records(run_dir))
        holder = lock_holder(run_dir)
        if holder:
            raise SftdpoError(f"{run_dir} is being trained by {holder} ({done} of {cfg.epochs} epochs done): wait for "
                              f"it to finish, then run sftdpo {command} again")
        raise SftdpoError(f"{run_dir} is not finished ({done} of {cfg.epochs} epochs trained): finish it with "
                          f"`sftdpo train --config {run_dir}/config.json --out {run_dir}` (it resumes), then run "
                          f"sftdpo {command} again (`sftdpo eval {run_dir} --checkpoint last` scores it as it is)")
    if checkpoint not in ("best", "last"):
        raise SftdpoError(f"--checkpoint must be best or last (got {checkpoint!r})")
    if not (run_dir / "checkpoints" / checkpoint / WEIGHTS_FILE).exists():
        other = "last" if checkpoint == "best" else "best"
        kept = (run_dir / "checkpoints" / other / WEIGHTS_FILE).exists()
        why = (f"it kept --keep-checkpoints {cfg.keep_checkpoints}" if cfg.keep_checkpoints != "all"
               else "its checkpoints were deleted")
        # keep_checkpoints is no part of the run's identity: on the same --out, train returns the finished run as is
        raise SftdpoError(f"{run_dir} has no {checkpoint} weights ({why}): "
                          + (f"use --checkpoint {other}, or " if kept else "")
                          + f"train it again into a new directory: `sftdpo train --config {run_dir}/config.json "
                          f"--keep-checkpoints {checkpoint} --out NEW_DIR` (the same --out returns the finished run "
                          "unchanged)")


def course_test_file(cfg: RunConfig, test: str | None) -> Path:
    """The course's test input of `cfg`'s task: --test, else beside the run's --train file (the course's
    data/ folder holds them all), else the data directory's qqp/ or sonnets/ folder."""
    folder, name = TEST_FILES[cfg.task]
    if test:
        if not Path(test).is_file():
            raise SftdpoError(f"--test {test} does not exist: give the CS224N {name}")
        return Path(test)
    beside = Path(cfg.train).parent / name if cfg.train else None
    found = beside if beside and beside.is_file() else find_in_data_dirs(f"{folder}/{name}")
    if found is None:
        raise SftdpoError(f"no {cfg.task} test input: put the CS224N {name} in $SFTDPO_DATA_DIR/{folder}/ or beside "
                          "the --train file, or pass --test")
    return found


def write_para_output(path: Path, rows: list[tuple[str, str]]) -> None:
    """paraphrase_detection.py::test's file: its header, then `<id>, <prediction> ` per row."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("id \t Predicted_Is_Paraphrase \n")
        for rid, pred in rows:
            f.write(f"{rid}, {pred} \n")


def para_prediction(pred: str, token_of: dict[str, int], label_format: str) -> str:
    """What the file says for a prediction (a label value "0"/"1", or "token:<id>" under --predict argmax)."""
    if label_format == "token-id":
        return pred.removeprefix("token:") if pred.startswith("token:") else str(token_of[pred])
    return STRAY if pred.startswith("token:") else pred


def predict_run(run_dir: str | Path, *, checkpoint: str = "best", split: str = "dev", out: str | Path | None = None,
                test: str | None = None, test_prompt: str = "train", label_format: str | None = None) -> Path:
    """Write the run's submission file for `split`; returns its path."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if cfg.task not in ("paraphrase", "sonnet"):
        raise SftdpoError(f"sftdpo predict writes the CS224N course files of the paraphrase and sonnet tasks; {run_dir} "
                          f"is a {cfg.task} run (its dev outputs are in dev_outputs.jsonl)")
    if split not in ("dev", "test"):
        raise SftdpoError(f"--split must be dev or test (got {split!r})")
    label_format = label_format or DEFAULT_LABEL_FORMAT[cfg.conventions]
    if label_format not in LABEL_FORMATS:
        raise SftdpoError(f"--label-format must be {' or '.join(LABEL_FORMATS)} (got {label_format!r})")
    check_finished(run_dir, checkpoint, "predict")
    src = course_test_file(cfg, test) if split == "test" else None
    out_dir = ensure_dir(Path(out) if out else run_dir / "predictions", "--out")
    run = load_run(run_dir, checkpoint)
    if cfg.task == "paraphrase":
        path = out_dir / f"para-{split}-output.csv"
        rows = _paraphrase(run, src, test_prompt, label_format)
        _write(path, lambda: write_para_output(path, rows))
    else:
        path = out_dir / ("generated_sonnets_dev.txt" if split == "dev" else "generated_sonnets.txt")
        texts = _sonnets(run, src)
        _write(path, lambda: write_cs224n_generations(path, list(enumerate(texts))))
    return path


def _write(path: Path, write) -> None:
    try:
        write()
    except OSError as e:
        raise SftdpoError(f"could not write {path} ({e.strerror or e}): nothing was replaced (a {path.name} written "
                          "before is as it was); free space or give another --out") from None


def _paraphrase(run: Run, src: Path | None, test_prompt: str, label_format: str) -> list[tuple[str, str]]:
    task = run.task
    if src is None:  # dev: the run's own evaluation
        ev = task.evaluate(run.model, run.device, run.precision)
        return [(i, para_prediction(p, task.token_of, label_format)) for i, p, _ in ev.outputs]
    examples, _ = read_qqp(src)
    task.dev = [ParaphraseExample(e.id, e.q1, e.q2, 0) for e in examples]  # labels unknown: predictions only
    if test_prompt == "cs224n":  # the starter's test prompt, another template than train/dev (docs/cs224n.md)
        task.dev_ids = [task.encode_prompt(CS224N_TEST_PROMPT.format(q1=task.text(e.q1), q2=task.text(e.q2)))
                        for e in task.dev]
    else:
        task.dev_ids = [task.encode(e) for e in task.dev]
    with torch.no_grad():
        preds = task.predict(run.model, run.device, run.precision)
    log.info("%d test predictions from %s", len(preds), src)
    return [(e.id, para_prediction(p, task.token_of, label_format)) for e, p in zip(task.dev, preds)]


def _sonnets(run: Run, src: Path | None) -> list[str]:
    """Each prompt and its sampled continuation, as generate_submission_sonnets writes them: the prompt and
    the decoded new tokens, unstripped (for GPT-2's byte-level tokens, the decoding of prompt and new
    tokens together). Dev: the run's own dev generation (the same prompts, seed and samples)."""
    task, cfg = run.task, run.cfg
    if src is None:
        full = [s.number for s in load_task_data(cfg).dev]
        mine = [s.number for s in task.dev]
        if mine != full[: len(mine)]:
            raise SftdpoError(
                f"this run was evaluated on {len(mine)} of the {len(full)} dev sonnets (--max-dev-examples "
                f"{cfg.max_dev_examples}: {', '.join(map(str, mine[:6]))}{', ...' if len(mine) > 6 else ''}); the "
                f"starter's test_sonnet pairs the file's i-th sonnet with the i-th true one ({', '.join(map(str, full[:3]))}"
                ", ...), so it would score the wrong poems: predict dev from a run on the whole dev set")
        prompts, samples = [task.prompt_text(s) for s in task.dev], cfg.num_samples
    else:
        prompts, samples = [task.prompt_text(s) for s in read_cs224n_sonnets(src)], 1
    ids = task.generate_ids(run.model, prompts, run.device, run.precision, temperature=cfg.temperature,
                            top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, num_samples=samples, seed=cfg.seed)
    return [p + task.tok.decode(ids[i * samples]) for i, p in enumerate(prompts)]


def write_submission(run_dir: str | Path, test: str | None = None, out: str | Path | None = None) -> list[Path]:
    """--recipe cs224n-starter's last step: the run's dev and test course files, each from the weights and
    with the prompt SUBMISSION gives its task, in the starter's label format."""
    cfg = run_config(Path(run_dir))
    how = SUBMISSION[cfg.task]
    return [predict_run(run_dir, checkpoint=how["checkpoint"], split=split, out=out, test=test,
                        test_prompt=how["test_prompt"], label_format="token-id") for split in ("dev", "test")]
