"""Command line: `sftdpo train | eval | preview | predict | export | demo | study | bench`.

Every `RunConfig` field is a `train` flag (`lora_rank` -> `--lora-rank`), so a config file and
the command line speak the same names.

Each command imports what it needs when it runs (the one place sftdpo imports inside functions):
torch, transformers and PEFT take ~8 s to import on a 2-core CPU, and `sftdpo --help` or
`sftdpo study status` should not wait for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .config import DPO_FIELDS, RECIPES, RunConfig, SftdpoError, peft_set_entries, task_definition
from .files import DamagedFile, is_write_failure, write_failure, writable
from .system import VERBOSE_ENV, Terminated, format_duration, setup_logging, sigterm_as_interrupt

log = logging.getLogger("sftdpo")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


# `train --help`: every RunConfig field as a flag, in groups, each with what it does, its choices and default
# (tests/test_cli.py checks that every field has its line here)
FLAG_GROUPS: dict[str, dict[str, str]] = {
    "task and data": {
        "task": "paraphrase | sonnet (the paper's tasks) | classify | generate (your own data)",
        "task_name": "a custom task's name, used in reports (set by --task-file)",
        "train": "training file (paraphrase: QQP CSV/TSV; sonnet: CS224N sonnets.txt; own tasks: "
                 ".csv .tsv .jsonl .json .parquet); default: the data directory's",
        "dev": "dev file, as --train",
        "dataset": "own tasks: a Hugging Face dataset (hub id or save_to_disk directory) instead of files",
        "train_split": "split of --dataset to train on",
        "dev_split": "split of --dataset to evaluate on",
        "id_column": "column with example ids (rows without one are numbered)",
        "template": "classify: the prompt, {column} filled from each row",
        "label_column": "classify: the label column",
        "labels": "classify: VALUE=WORD,... (e.g. 0=no,1=yes); each word one token",
        "label_words": "paraphrase answer words positive,negative; each must be one token",
        "max_train_examples": "train on at most this many examples (a subset drawn with the seed)",
        "max_dev_examples": "evaluate on at most this many dev examples (one fixed subset, whatever the seed)",
        "data_fraction": "train on this fraction of the training set, in (0, 1]",
        "balance_labels": "classification: equal counts of each label in the training subset",
        "max_length": "tokens per training sequence (sftdpo 512, cs224n 1024); prompts cut from the left",
        "prompt_lines": "generate on plain text rows: lines of each dev text given as the prompt",
    },
    "conventions (docs/cs224n.md)": {
        "conventions": "sftdpo | cs224n: the CS224N starter code's preprocessing, prediction, decoding and precision "
                       "at once",
        "preprocess": "none | cs224n (lower-case, a space before . ? , ')",
        "predict": "label-pair (the better label word) | argmax (over the whole vocabulary, as CS224N)",
        "prompt_newline": "sonnet: the 3-line prompt ends with a newline (CS224N: it does not)",
    },
    "model and parameterization": {
        "model": "smollm2-135m (offline default) | gpt2 | tiny-gpt2 | tiny-llama | a Hugging Face id or local directory",
        "param": "fft (full fine-tuning) | lora dora rslora pissa olora lora-plus (LoRA and its variants: --lora-*) | "
                 "ia3 vera loha lokr adalora oft boft (PEFT adapters) | prefix prompt (virtual tokens) | bitfit (biases "
                 "only) | ln (norm layers only); defaults from PEFT's method comparison",
        "lora_rank": "LoRA r",
        "lora_alpha": "LoRA alpha (scale alpha/r)",
        "lora_dropout": "LoRA dropout",
        "lora_targets": "attention | all-linear | comma-separated module names",
        "use_rslora": "rank-stabilised LoRA scale alpha/sqrt(r) (PEFT use_rslora)",
        "use_dora": "weight-decomposed LoRA (PEFT use_dora)",
        "loraplus_lr_ratio": "lora-plus: lora_B's learning rate over --lr (LoRA+)",
        "num_virtual_tokens": "prefix, prompt: virtual tokens before every sequence",
        "peft_set": "KEY=VALUE: any other field of the method's PEFT config (e.g. r=16 for loha), typed by it; "
                    "repeatable",
    },
    "training": {
        "regime": "sft | dpo (DPO from the pretrained model) | sft-dpo (SFT, then DPO from --handoff-epoch)",
        "epochs": "the whole run's epoch budget (SFT and DPO epochs together)",
        "budget_steps": "instead of --epochs, train exactly this many optimizer steps (sft or dpo runs): passes over "
                        "the data, a fresh order each, the last cut short; the schedule spans the budget",
        "handoff_epoch": "sft-dpo: SFT epochs before DPO takes over (1 .. epochs-1)",
        "lr": "SFT learning rate (AdamW)",
        "batch_size": "examples (or pairs) per micro-batch; an optimizer step trains on batch_size x grad_accum",
        "grad_accum": "micro-batches per optimizer step",
        "weight_decay": "AdamW weight decay",
        "warmup_ratio": "share of all optimizer steps spent warming up, in [0, 1]",
        "schedule": "linear | cosine | constant after a linear warm-up from 0 (transformers' schedules); spans the "
                    "whole epoch budget",
        "max_grad_norm": "gradient clipping norm (0: none)",
        "seed": "seed for data order, initialisation and sampling",
        "device": "auto | cpu | cuda | cuda:N",
        "precision": "auto (bf16 where the hardware has it; sftdpo) | fp32 (cs224n: the starter's) | bf16",
        "compile": "torch.compile the decoder for training and evaluation (dynamic shapes: one graph for every "
                   "length; the first steps compile, about a minute on a CPU); generation stays eager",
    },
    "DPO and the other preference objectives (TRL's names)": {
        "objective": "the preference stage's objective: dpo | simpo | cpo | orpo (reference-free) | kto (unpaired "
                     "examples)",
        "dpo_lr": "preference-stage learning rate (every objective's)",
        "beta": "DPO beta (the paper: 0.2); CPO/SimPO beta; ORPO lambda; KTO beta",
        "loss_type": "dpo: sigmoid | hinge | ipo | exo_pair | nca_pair | robust | bco_pair | sppo_hard | aot | "
                     "aot_unpaired | apo_zero | apo_down | discopop | sft | sigmoid_norm, or several comma-separated "
                     "(e.g. MPO: sigmoid,bco_pair,sft); cpo: sigmoid | hinge | ipo",
        "loss_weights": "dpo: one weight per --loss-type, comma-separated; unset: 1 each",
        "label_smoothing": "robust's label noise in [0, 0.5); exo_pair's epsilon (> 0, EXO: 1e-3); aot's; cpo/simpo's",
        "logp_reduction": "auto (TRL's: dpo ipo/sigmoid_norm and cpo ipo/simpo per token, the others summed) | sum | "
                          "mean (dpo, cpo, simpo)",
        "ld_alpha": "dpo, generation tasks: LD-DPO, tokens past the shorter response's length weighted by this, in [0, 1]",
        "f_divergence_type": "dpo: f-DPO's reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence",
        "f_alpha_divergence_coef": "alpha of --f-divergence-type alpha_divergence",
        "use_weighting": "dpo: WPO, each pair weighted by the policy's length-normalised probabilities",
        "discopop_tau": "--loss-type discopop's temperature",
        "cpo_alpha": "cpo/simpo: the NLL term's weight; unset: 1 for cpo, 0 for simpo (> 0 with simpo: CPO-SimPO)",
        "simpo_gamma": "simpo: the target reward margin gamma",
        "desirable_weight": "kto: weight of the desirable examples' losses",
        "undesirable_weight": "kto: weight of the undesirable examples' losses",
        "kto_examples": "kto: desirable (the gold answers alone) | unpaired (the pairs split: chosen desirable, rejected "
                        "undesirable) | auto (desirable for classification, unpaired for generation)",
        "pairs": "preference pairs: v1 | v2 | v3 (sonnet constructions) | hardest (classification) | file:PATH "
                 "(TRL preference format; kto: also its unpaired prompt/completion/label rows)",
        "pairs_n": "v2/v3: rejections generated per prompt",
        "pairs_top_k": "v3: pairs kept (default: one per training example)",
        "pairs_temperatures": "v3: sampling temperatures of the rejections, comma-separated",
    },
    "decoding and generation metrics": {
        "temperature": "sampling temperature (0: greedy; sftdpo 1.0, cs224n 1.2)",
        "top_p": "nucleus sampling p (0.9)",
        "max_new_tokens": "tokens generated per prompt (sftdpo 160, cs224n 128)",
        "num_samples": "samples per dev prompt",
        "metric": "generate: chrf | bleu (sacrebleu, corpus level)",
        "completion_only_loss": "generate: SFT loss on the completion only (TRL's default)",
    },
    "output and logging": {
        "log_every": "optimizer steps between training log lines",
        "eval_batch_size": "dev examples per forward pass",
        "eval_init": "evaluate before training (epoch 0, the untrained baseline)",
        "report_to": "experiment trackers, comma-separated: none | tensorboard | mlflow | wandb (Hugging Face's "
                     "report_to; each an optional extra: pip install 'sftdpo[tensorboard]')",
        "keep_checkpoints": "what a finished run keeps: all (best and last) | best | last | none (metrics and dev "
                            "outputs only)",
    },
}
_CHOICES = {"task": "TASKS", "param": "PARAMS", "regime": "REGIMES", "objective": "OBJECTIVES",
            "f_divergence_type": "F_DIVERGENCES", "kto_examples": "KTO_EXAMPLES"}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, grouped as in FLAG_GROUPS; defaults stay None so only given flags override."""
    from . import config

    hints = typing.get_type_hints(RunConfig)
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    for title, helps in FLAG_GROUPS.items():
        g = p.add_argument_group(title)
        for name, text in helps.items():
            f = fields[name]
            t = hints[name]
            args = typing.get_args(t)
            base = next((a for a in args if a is not type(None)), t) if args else t
            kw: dict[str, Any] = {"default": None, "dest": name}
            if name == "peft_set":
                kw.update(action="append", metavar="KEY=VALUE")
            elif base is bool:
                kw.update(type=_parse_bool, nargs="?", const=True, metavar="true|false")
            elif typing.get_origin(t) is tuple or typing.get_origin(base) is tuple:
                kw.update(type=lambda s: tuple(float(x) for x in s.split(",")), metavar="T,T,...")
            elif base in (int, float, str):
                kw["type"] = base
            if name in _CHOICES:
                kw["choices"] = getattr(config, _CHOICES[name])
                kw.pop("metavar", None)
            default = f.default if f.default is not dataclasses.MISSING else None
            if isinstance(default, tuple):
                default = ",".join(f"{x:g}" for x in default) or "none"
            if default is None:
                default = "the conventions' value" if name in config.CONVENTIONS["sftdpo"] else "unset"
            g.add_argument(_flag(name), help=f"{text} (default: {default})", **kw)


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """--recipe, then --config, then --task-file, then the flags, each over the one before."""
    base: dict[str, Any] = dict(RECIPES[ns.recipe]) if getattr(ns, "recipe", None) else {}
    if getattr(ns, "config", None):
        base.update(load_config_file(ns.config))
    if getattr(ns, "task_file", None):
        base.update(task_definition(load_config_file(ns.task_file), f"--task-file {ns.task_file}",
                                    Path(ns.task_file).stem))
    names = {f.name for f in dataclasses.fields(RunConfig)}
    given = {k for k, v in vars(ns).items() if k in names and v is not None}
    for k in given:
        v = getattr(ns, k)
        if k == "peft_set" and base.get(k):  # the file's entries, then the flags' (later wins)
            v = [*peft_set_entries(base[k]), *v]
        base[k] = v
    cfg = RunConfig.from_dict(base).validate()
    # a DPO setting given on the command line for a run without DPO is a mistake, as --handoff-epoch is
    # (a --config file's or a study spec's DPO fields are defaults: an SFT run resets them, config.irrelevant_fields)
    dpo_only = sorted(given & set(DPO_FIELDS)) if cfg.regime == "sft" else []
    if dpo_only:
        raise SftdpoError(f"invalid config: {', '.join(map(_flag, dpo_only))} only appl{'ies' if len(dpo_only) == 1 else 'y'}"
                          " to DPO, --regime dpo or sft-dpo (got regime sft)")
    return cfg


def load_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SftdpoError(f"config file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8-sig")
        d = yaml.safe_load(text) if p.suffix in (".yaml", ".yml") else json.loads(text)
    except UnicodeDecodeError:
        raise SftdpoError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise SftdpoError(f"config file {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    except json.JSONDecodeError as e:
        raise SftdpoError(f"config file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    if isinstance(d, dict) and "config" in d and "hash" in d:  # a run's config.json
        d = d["config"]
    if not isinstance(d, dict):
        raise SftdpoError(f"config file {path} must hold a mapping of config fields")
    d.pop("data_fingerprint", None)  # taken from the data found now (data.resolve_data)
    return d


def cmd_train(ns: argparse.Namespace) -> int:
    from .data import resolve_data
    from .train.loop import train

    cfg = config_from_args(ns)
    if ns.test and not ns.recipe:
        raise SftdpoError("--test is the course's test input for --recipe cs224n-starter's files; after a plain "
                          "train, give it to `sftdpo predict RUN --split test --test FILE`")
    if ns.recipe:
        from .predict import course_test_file

        if cfg.task not in ("paraphrase", "sonnet"):
            raise SftdpoError(f"--recipe {ns.recipe} trains the course's tasks: --task paraphrase or sonnet "
                              f"(got {cfg.task})")
        course_test_file(cfg, ns.test)  # found now, not after hours of training
    cfg = resolve_data(cfg)
    out = Path(ns.out or f"runs/{cfg.task}-{cfg.regime}-{cfg.param}-{cfg.hash()}")
    dist = _dist_kwargs()
    summary = train(cfg, out, **dist)
    if dist.get("rank", 0) != 0:
        return 0
    _print_summary(out, summary)
    if ns.recipe:
        from .predict import write_submission

        for path in write_submission(out, ns.test):
            print(f"  course file                  {path}")
    return 0


def _dist_kwargs() -> dict:
    """Rank and world size when launched by torchrun/accelerate (see distributed.py)."""
    try:
        from .distributed import init_from_env
    except ImportError:
        return {}
    return init_from_env()


def _print_summary(out: Path, s: dict) -> None:
    keys = [k for k in s if k.startswith("dev/") or k.startswith("init/dev/")]
    print(f"run {s.get('run_hash')} -> {out}")
    for k in keys:
        print(f"  {k:28s} {s[k]:.4f}")
    print(f"  wall_clock_per_epoch_s       {s['wall_clock_per_epoch_s']:.1f}")
    print(f"  train_tokens_per_s           {s['train_tokens_per_s']:.0f}")
    print(f"  peak_memory_mb               {s['peak_memory_mb']:.0f}")
    print(f"  trainable/total params       {s['trainable_params']:,} / {s['total_params']:,}")


def run_arg(ns: argparse.Namespace) -> str:
    """The run directory, given as RUN or --run RUN (every command that takes one accepts both)."""
    if ns.run and ns.run_flag and ns.run != ns.run_flag:
        raise SftdpoError(f"two run directories given ({ns.run} and --run {ns.run_flag}): give one")
    run = ns.run or ns.run_flag
    if not run:
        raise SftdpoError(f"give the run directory: sftdpo {ns.cmd} RUN (or --run RUN)")
    return run


def add_run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", nargs="?", metavar="RUN", help="run directory (or --run RUN)")
    p.add_argument("--run", dest="run_flag", metavar="RUN", help="run directory, as a flag")


def cmd_eval(ns: argparse.Namespace) -> int:
    from .train.loop import evaluate_run

    res = evaluate_run(run_arg(ns), ns.checkpoint)
    for k, v in res.items():
        if k.startswith("dev/"):
            print(f"{k:24s} {v:.4f}")
    return 0


def cmd_preview(ns: argparse.Namespace) -> int:
    from .preview import preview

    if ns.n < 1:
        raise SftdpoError(f"--n must be >= 1 (got {ns.n})")
    for line in preview(config_from_args(ns), ns.n):
        print(line)
    return 0


def cmd_predict(ns: argparse.Namespace) -> int:
    from .predict import predict_run

    print(predict_run(run_arg(ns), checkpoint=ns.checkpoint, split=ns.split, out=ns.out, test=ns.test,
                      test_prompt=ns.test_prompt, label_format=ns.label_format))
    return 0


def cmd_demo(ns: argparse.Namespace) -> int:
    """The README's main job: the `quick` study on the offline default. Without QQP data it says so
    and runs the sonnet part; it fails only if nothing could run."""
    from .data import qqp_available
    from .study.runner import run_study, study_counts

    only: list[str] = []
    why = qqp_available()
    if why:
        print(f"sftdpo: paraphrase skipped: {why}", file=sys.stderr)
        only = ["task=sonnet"]
    path = run_study("quick", Path(ns.out), only=only)
    counts = study_counts(path)
    print(f"results: {path}/runs/ (index {path}/study.db), report: {path}/report/report.md")
    return 0 if counts.get("done") else 1


def cmd_study_run(ns: argparse.Namespace) -> int:
    from .study.runner import run_study, study_counts
    from .study.spec import parse_set

    overrides = parse_set(ns.set or [])
    if ns.model:
        overrides["model"] = ns.model
    if ns.executor == "ray":
        if ns.jobs is not None:
            raise SftdpoError("--jobs is for the local executor; with --executor ray, --cpus-per-run and "
                              "--gpus-per-run decide how many runs share a node")
        opts = {"address": ns.address, "gpus_per_run": ns.gpus_per_run, "cpus_per_run": ns.cpus_per_run}
    else:
        opts = {"jobs": ns.jobs, "gpus_per_run": ns.gpus_per_run}
    if ns.probe and (ns.no_probe or not ns.dry_run):
        raise SftdpoError("--probe measures this machine's rates for --dry-run: give it with --dry-run, without "
                          "--no-probe")
    out = run_study(ns.spec, ns.out, only=ns.only, overrides=overrides, dry_run=ns.dry_run, probe=ns.probe,
                    executor=ns.executor, report=not ns.no_report, **opts)
    if ns.dry_run:
        return 0
    counts = study_counts(out)
    return 0 if counts.get("done", 0) and not counts.get("failed", 0) else (1 if not counts.get("done") else 3)


def cmd_study_status(ns: argparse.Namespace) -> int:
    from .study.index import epoch_records, study_index, study_runs
    from .study.local import metrics_line
    from .study.schedule import calibrated_eta

    study_dir = Path(ns.dir)
    if not (study_dir / "runs").is_dir():
        raise SftdpoError(f"{ns.dir} is not a study directory (no runs/)")
    with study_index(study_dir) as store:
        runs = store.runs()
    entries = study_runs(study_dir)
    counts: dict[str, int] = {}
    timing: list[tuple[str, float | None, float | None]] = []  # (status, estimated s, actual s)
    lines = []
    for r in runs:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        est = entries.get(r["name"], {}).get("estimated_s")
        extra, took = "", None
        if r["status"] == "done" and r.get("summary"):
            s = r["summary"]
            # its own time: epochs taken from a shared prefix were trained (and estimated) elsewhere
            took = s["wall_clock_s"] - s.get("prefix_reused_s", 0.0) if "wall_clock_s" in s else None
            extra = metrics_line(s) + (f" [{format_duration(took)}" + (f", estimated {format_duration(est)}]" if est else "]")
                                       if took is not None else "")
        elif r["status"] == "failed":
            extra = r.get("error") or ""
        elif r["status"] in ("running", "pending"):
            try:
                epochs = epoch_records(Path(r["run_dir"]))
            except DamagedFile:
                epochs = []
            extra = f"epoch {epochs[-1]['epoch']} done" if epochs else (r.get("error") or "")
        timing.append((r["status"], est, took))
        lines.append(f"  {r['status']:8s} {r['name']:60s} {extra}")
    eta = calibrated_eta(timing)
    print(f"{ns.dir}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
          + (f"; ETA {format_duration(eta[0])} one run at a time ({eta[1]})" if eta else ""))
    print("\n".join(lines))
    return 0


def cmd_study_report(ns: argparse.Namespace) -> int:
    from .report import write_report
    from .study.index import study_index

    study_dir = Path(ns.dir)
    if not (study_dir / "runs").is_dir():
        raise SftdpoError(f"{ns.dir} is not a study directory (no runs/)")
    out = Path(ns.out) if ns.out else study_dir / "report"
    if not writable(out):
        raise SftdpoError(f"{out} is not writable: write the report elsewhere with --out DIR")
    with study_index(study_dir) as store:
        print(write_report(study_dir, store, out))
    return 0


def cmd_study_best(ns: argparse.Namespace) -> int:
    from .report.best import write_best
    from .report.results import StudyResults
    from .study.index import study_index

    study_dir = Path(ns.dir)
    if not (study_dir / "runs").is_dir():
        raise SftdpoError(f"{ns.dir} is not a study directory (no runs/)")
    with study_index(study_dir) as store:
        study = StudyResults(store)
        written = write_best(study, Path(ns.out) if ns.out else study_dir / "best", ns.metric)
    for task in sorted(set(study.tasks()) - {b.task for b, _ in written}):
        print(f"# {task}: no finished run reports {ns.metric}", file=sys.stderr)
    for b, path in written:
        print(f"# -> {path}")
        print(b.yaml())
    return 0


def cmd_export(ns: argparse.Namespace) -> int:
    from .export import export_run

    print(export_run(run_arg(ns), ns.out, ns.checkpoint, ns.merge, ns.push_to_hub))
    return 0


def cmd_bench(ns: argparse.Namespace) -> int:
    from .bench import cli_bench

    return cli_bench(ns)


class Parser(argparse.ArgumentParser):
    """argparse with sftdpo's error style: one line naming what is wrong, exit status 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _recipe_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", choices=sorted(RECIPES),
                   help="cs224n-starter: the CS224N starter code's training set-up (gpt2, full fine-tuning, lr 1e-5 "
                        "constant, no clipping, batch 8, 10 epochs, seed 11711, fp32, its conventions), and after "
                        "training its dev and test submission files (docs/cs224n.md); flags given win")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sftdpo", description=__doc__.split("\n")[0])
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also the libraries' chatter (weight loading bars, GGUF conversion, hub requests)")
    p.add_argument("--version", action="version", version=f"sftdpo {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("train", help="train one run (SFT, DPO or SFT->DPO; FFT or LoRA)")
    t.add_argument("--config", help="a JSON/YAML file of config fields (flags override it)")
    t.add_argument("--task-file", help="your own task written once (YAML: kind, name, train/dev or dataset, template, "
                                       "labels, metric, ...); flags override it")
    t.add_argument("--out", help="run directory (default: runs/<task>-<regime>-<param>-<hash>)")
    _recipe_flag(t)
    t.add_argument("--test", help="with --recipe: the course's test input (quora-test-student.csv / sonnets_held_out.txt; "
                                  "default: beside --train, else the data directory's)")
    add_config_flags(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="re-evaluate a run's checkpoint on dev")
    add_run_arg(e)
    e.add_argument("--checkpoint", default="best", choices=["best", "last"])
    e.set_defaults(func=cmd_eval)

    pv = sub.add_parser("preview", help="the first training and dev examples as the model receives them (tokenizer only)")
    pv.add_argument("--config", help="a JSON/YAML file of config fields (flags override it)")
    pv.add_argument("--task-file", help="your own task written once (YAML); flags override it")
    pv.add_argument("--n", type=int, default=3, help="examples of each split to show (default: 3)")
    _recipe_flag(pv)
    add_config_flags(pv)
    pv.set_defaults(func=cmd_preview)

    pr = sub.add_parser("predict", help="the CS224N course's submission files from a trained run")
    add_run_arg(pr)
    pr.add_argument("--checkpoint", default="best", choices=["best", "last"])
    pr.add_argument("--split", default="dev", choices=["dev", "test"])
    pr.add_argument("--out", help="where the files go (default: RUN/predictions/)")
    pr.add_argument("--test", help="test input: quora-test-student.csv / sonnets_held_out.txt (default: beside the run's "
                                   "--train file, else the data directory's)")
    pr.add_argument("--test-prompt", default="train", choices=["train", "cs224n"],
                    help="paraphrase test prompt: the train/dev template (default) or the starter's test template")
    pr.add_argument("--label-format", choices=["token-id", "binary"],
                    help="paraphrase predictions as the starter writes them, the argmax token's id (token-id: 8505/3919 "
                         "for GPT-2's yes/no), or 1/0 (binary; -1 where the argmax is no label word); default: "
                         "token-id for a --conventions cs224n run, else binary")
    pr.set_defaults(func=cmd_predict)

    x = sub.add_parser("export", help="a trained run as a Hugging Face model directory (from_pretrained), with a "
                                      "model card")
    add_run_arg(x)
    x.add_argument("--out", required=True, help="new directory for the model")
    x.add_argument("--checkpoint", default="best", choices=["best", "last"], help="which weights (default: best)")
    x.add_argument("--merge", action="store_true", help="LoRA: merge the adapter into the base (a full model) "
                                                        "instead of writing a PEFT adapter directory")
    x.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hugging Face repo (needs network and a "
                                                         "token)")
    x.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="the README's main job: the `quick` study on the offline default")
    d.add_argument("--out", default="studies/quick")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("study", help="run, inspect and report whole studies")
    ss = s.add_subparsers(dest="study_cmd", required=True)
    sr = ss.add_parser("run", help="run a study spec (YAML; or a shipped name: quick, paper, own-tasks, dpo-sweep, "
                                   "dpo-sweep-quick)")
    sr.add_argument("spec")
    sr.add_argument("--out", help="study directory (default: studies/<spec name>)")
    sr.add_argument("--dry-run", action="store_true",
                    help="list the runs with their estimated time (from rates measured earlier on this machine, else "
                         "a FLOP count: each line says which), GPU hours and disk, in seconds; train nothing")
    sr.add_argument("--probe", action="store_true",
                    help="with --dry-run: first measure the kinds of run without cached rates on this machine, with a "
                         "short probe of each (its estimated time shown first; minutes per kind on a CPU)")
    sr.add_argument("--no-probe", action="store_true", help="with --dry-run: measure nothing (the default)")
    sr.add_argument("--jobs", type=int, default=None, metavar="N",
                    help="local executor: N runs at once, each in its own process with 1/N of the CPU threads "
                         "(default 1; with --gpus-per-run F on a GPU machine: 1/F runs per GPU)")
    sr.add_argument("--only", action="append", default=[], help="run only runs matching FIELD=VALUE (repeatable)")
    sr.add_argument("--model", help="override the spec's model for every run (e.g. tiny-gpt2)")
    sr.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a config field for every run (repeatable), e.g. --set epochs=2 --set max_train_examples=16")
    sr.add_argument("--executor", default="local", choices=["local", "ray"])
    sr.add_argument("--address", help="Ray cluster address (with --executor ray)")
    sr.add_argument("--gpus-per-run", type=float, default=0.0,
                    help="GPUs per run, a fraction to share a GPU between runs (Ray; local: e.g. 0.25 = 4 runs per GPU)")
    sr.add_argument("--cpus-per-run", type=float, default=1.0, help="CPUs per run (Ray)")
    sr.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    sr.set_defaults(func=cmd_study_run)
    st = ss.add_parser("status", help="runs done/running/pending/failed")
    st.add_argument("dir")
    st.set_defaults(func=cmd_study_status)
    rp = ss.add_parser("report", help="write report.md, tables and figures")
    rp.add_argument("dir")
    rp.add_argument("--out", help="where the report goes (default: DIR/report/); a read-only study directory is "
                                  "read, not changed")
    rp.set_defaults(func=cmd_study_report)
    bs = ss.add_parser("best", help="the best configuration per task x backbone x parameterization, as run config "
                                    "files for `sftdpo train --config`")
    bs.add_argument("dir")
    bs.add_argument("--metric", help="dev metric to select on (default: the task's primary one: accuracy for "
                                     "classification, chrf for generation), e.g. macro_f1, chrf_continuation")
    bs.add_argument("--out", help="where the config files go (default: DIR/best/)")
    bs.set_defaults(func=cmd_study_best)


    b = sub.add_parser("bench", help="speed benchmark against TRL and a CS224N-style loop")
    b.add_argument("--model", action="append", help="smollm2-135m (default), tiny-gpt2, gpt2, ... (repeatable)")
    b.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    b.add_argument("--out", default="bench.json")
    b.add_argument("--only", action="append", default=[], help="run only lines whose name contains this")
    b.add_argument("--device", default="auto")
    b.add_argument("--compile", action="store_true", help="also measure the --compile step against the eager one "
                   "(compile/* lines; compiling takes minutes on a CPU)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.verbose:
        os.environ[VERBOSE_ENV] = "1"  # the run processes of a study too
    setup_logging(logging.WARNING if ns.quiet else logging.INFO, verbose=ns.verbose)
    try:
        with sigterm_as_interrupt():  # kill, timeout, Slurm and Kubernetes stop a command as Ctrl-C does
            return ns.func(ns)
    except SftdpoError as e:
        print(f"sftdpo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write that no command caught itself: still one line
        if not is_write_failure(e):
            raise
        print(f"sftdpo: error: {write_failure(e, 'a file')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"sftdpo: {how} (completed epochs are checkpointed; run the same command again to resume)", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130


if __name__ == "__main__":
    sys.exit(main())
