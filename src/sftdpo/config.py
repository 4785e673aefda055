"""Run configuration, its hash, and where sftdpo looks for data and keeps its cache.

Every run is one `RunConfig` (written to `config.json`) plus its results; the hash of the
resolved config identifies the run, as in PEFT's method-comparison harness.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

from .errors import SftdpoError
from .files import stable_hash

__all__ = ["RunConfig", "SftdpoError", "irrelevant_fields"]


# the paper's two tasks (presets with their own readers and conventions) and the two general kinds
TASKS = ("paraphrase", "sonnet", "classify", "generate")
TASK_KIND = {"paraphrase": "classify", "sonnet": "generate", "classify": "classify", "generate": "generate"}
PARAMS = ("fft", "lora")
REGIMES = ("sft", "dpo", "sft-dpo")
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")
# v1/v2/v3: sampled rejections (generation tasks); hardest: the strongest wrong label (classification);
# file:PATH: preference pairs in TRL's formats (generation tasks)
PAIR_VERSIONS = ("v1", "v2", "v3", "hardest")
METRICS = ("chrf", "bleu")

# -- which fields matter -------------------------------------------------------------------------
# The one definition, from which the run hash, the study's de-duplication, the report's columns,
# the SFT-trajectory key (shared prefixes) and the untrained-model evaluation key all derive.

# sonnet preference-pair construction (part of the DPO settings)
PAIR_FIELDS = ("pairs", "pairs_n", "pairs_top_k", "pairs_temperatures")
# settings read only once a DPO stage starts: the SFT prefix of a run does not depend on them
DPO_FIELDS = ("dpo_lr", "beta", "loss_type", "label_smoothing", "logp_reduction", *PAIR_FIELDS)
LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "use_rslora", "use_dora")
# LoRA settings that shape the adapted model's function (dropout is off whenever it is evaluated)
LORA_FUNCTION_FIELDS = tuple(f for f in LORA_FIELDS if f != "lora_dropout")
DECODING_FIELDS = ("temperature", "top_p", "max_new_tokens", "num_samples")
# your own data (classify, generate): where it is and how its rows become examples
OWN_DATA_FIELDS = ("dataset", "train_split", "dev_split", "id_column")
CLASSIFY_FIELDS = ("template", "label_column", "labels")
GENERATE_FIELDS = ("metric", "completion_only_loss", "prompt_lines")
# settings of training only: the untrained model's dev metrics do not depend on them
TRAINING_FIELDS = ("param", "regime", "handoff_epoch", "epochs", "budget_steps", "lr", "batch_size", "grad_accum", "weight_decay",
                   "warmup_ratio", "schedule", "max_train_examples", "data_fraction", "max_grad_norm",
                   *DPO_FIELDS, *LORA_FIELDS)
# bookkeeping that never changes a run's result (`conventions` is recorded; the fields it sets carry its effect)
# (`compile`: kernels fused differently, equal to eager up to float rounding, tests/test_compile.py)
NON_RESULT_FIELDS = ("log_every", "eval_batch_size", "eval_init", "conventions", "report_to", "keep_checkpoints",
                     "compile")
# fields added after runs were first hashed: left out of a run's identity while at their default, so
# the runs (and studies, caches and prefixes) of earlier versions keep their hashes
LATER_FIELDS = ("budget_steps",)
KEEP_CHECKPOINTS = ("all", "best", "last", "none")
TRACKERS = ("none", "tensorboard", "mlflow", "wandb")

# --conventions cs224n: the Stanford CS224N GPT-2 starter code's choices where they can move a number
# (docs/cs224n.md has the table, with the starter's file and function for each)
CONVENTIONS = {
    "sftdpo": {"preprocess": "none", "predict": "label-pair", "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 160,
               "prompt_newline": True, "max_length": 512},
    "cs224n": {"preprocess": "cs224n", "predict": "argmax", "temperature": 1.2, "top_p": 0.9, "max_new_tokens": 128,
               "prompt_newline": False, "max_length": 1024},
}


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def coerce_field(name: str, value: Any) -> Any:
    """`value` as field `name`'s type, or one clear error naming the field."""
    hint = FIELD_TYPES[name]
    optional = " | None" in hint
    base = hint.replace(" | None", "")

    def bad(expected: str) -> SftdpoError:
        return SftdpoError(f"invalid config: {name} must be {expected}{' (or null)' if optional else ''}, "
                           f"got {_show(value)}")

    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
        if optional:
            return None
        raise bad({"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(base, "set"))
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLS:
            return _BOOLS[value.strip().lower()]
        raise bad("true or false")
    if base in ("int", "float"):
        if isinstance(value, bool):
            raise bad("an integer" if base == "int" else "a number")
        number = value
        if isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise bad("an integer" if base == "int" else "a number") from None
        if not isinstance(number, (int, float)) or number != number:  # NaN
            raise bad("an integer" if base == "int" else "a number")
        if base == "int":
            if float(number) != int(number):
                raise bad("an integer")
            return int(number)
        return float(number)
    if base == "str":
        if isinstance(value, str):
            return value
        raise bad("a string")
    if base.startswith("tuple"):  # pairs_temperatures: numbers, as a list or "0.7,1.0"
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise bad("a list of numbers")
        try:
            return tuple(float(x) for x in items)
        except (TypeError, ValueError):
            raise bad("a list of numbers") from None
    return value


_BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def irrelevant_fields(cfg: "RunConfig") -> set[str]:
    """Fields this run never reads, so their values cannot change its result: DPO settings of an
    SFT-only run, the SFT learning rate of a DPO-only run, LoRA options of an FFT run, decoding and
    pair construction of a paraphrase run, the hand-off of an unstaged run, ..."""
    out: set[str] = set()
    if cfg.regime == "sft":
        out.update(DPO_FIELDS)
    if cfg.regime != "sft-dpo":
        out.add("handoff_epoch")
    if cfg.budget_steps is not None:
        out.add("epochs")  # the budget decides how many passes the run makes
    if cfg.regime == "dpo":
        out.add("lr")  # the SFT learning rate; a DPO-only run has no SFT stage
    if cfg.param == "fft":
        out.update(LORA_FIELDS)
    kind = TASK_KIND.get(cfg.task, cfg.task)
    if cfg.task in ("paraphrase", "sonnet"):
        out.update(OWN_DATA_FIELDS)
    if cfg.task != "classify":
        out.update(CLASSIFY_FIELDS)
    if cfg.task != "generate":
        out.update(GENERATE_FIELDS)
    if cfg.task != "paraphrase":
        out.add("label_words")
    if cfg.task != "sonnet":
        out.add("prompt_newline")
    if kind != "classify":
        out.update(("preprocess", "predict"))
    if kind == "classify":
        out.update(DECODING_FIELDS)
        out.update(("pairs_n", "pairs_top_k", "pairs_temperatures"))
        if cfg.task == "paraphrase":
            out.add("pairs")  # one wrong label: every construction is the same pair
    else:
        out.add("balance_labels")
        if cfg.pairs in ("v1", "hardest") or cfg.pairs.startswith("file:"):
            out.update(("pairs_n", "pairs_top_k", "pairs_temperatures"))
        elif cfg.pairs == "v2":
            out.add("pairs_top_k")
    return out


@dataclass
class RunConfig:
    """Everything that determines a run's result. Defaults are the toolkit's choices where the paper is silent."""

    task: str = "paraphrase"  # paraphrase | sonnet (the paper's tasks) | classify | generate (your own data)
    task_name: str | None = None  # a custom task's name (a --task-file, a study spec's tasks:); reports use it
    model: str = "smollm2-135m"
    # parameterization (PEFT LoRA options)
    param: str = "fft"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: str = "attention"  # "attention", "all-linear", or comma-separated module names
    use_rslora: bool = False
    use_dora: bool = False
    # regime: sft, dpo (no warm start) or sft-dpo (handoff_epoch SFT epochs, then epochs-handoff DPO epochs)
    regime: str = "sft"
    epochs: int = 1
    handoff_epoch: int | None = None
    # a budget in optimizer steps instead of epochs (single-stage runs): the run cycles over its data, a
    # fresh order per pass, until it has taken this many steps; `epochs` then counts those passes
    budget_steps: int | None = None
    # optimisation
    lr: float = 5e-5
    dpo_lr: float = 5e-6
    batch_size: int = 8
    grad_accum: int = 1
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    schedule: str = "linear"  # linear | cosine | constant (after warm-up); spans the run's whole epoch budget
    max_grad_norm: float = 1.0
    # data
    train: str | None = None
    dev: str | None = None
    # a fingerprint of the train/dev examples these load (data.resolve_data fills it in; not a flag): with
    # it, a run's identity is the data it read, not where the files were
    data_fingerprint: str | None = None
    max_train_examples: int | None = None
    max_dev_examples: int | None = None
    data_fraction: float = 1.0
    # paraphrase: equal yes/no counts in the training subset; for small-budget runs (the paper trains
    # on the natural split, ~37% duplicates)
    balance_labels: bool = False
    label_words: str = "yes,no"  # paraphrase answer words (positive,negative); each must be one token
    # conventions (docs/cs224n.md): sftdpo's own, or cs224n: the CS224N starter code's (sets the fields below
    # and the starter's decoding; fields given explicitly win)
    conventions: str = "sftdpo"
    # (None here: the conventions' value; CONVENTIONS has both sets)
    preprocess: str | None = None  # none | cs224n: lower-case, a space before . ? , ' (classification text fields)
    predict: str | None = None  # label-pair: the best label word | argmax: over the whole vocabulary (CS224N)
    prompt_newline: bool | None = None  # sonnet: the 3-line prompt ends with a newline (CS224N: it does not)
    # your own data (--task classify | generate): files (--train/--dev: .csv .tsv .jsonl .json .parquet, or a
    # save_to_disk directory) or a Hugging Face dataset (hub id or local directory) and its splits
    dataset: str | None = None
    train_split: str = "train"
    dev_split: str = "validation"
    id_column: str = "id"  # rows without it are numbered
    template: str | None = None  # classify: the prompt, {column} filled from each row
    label_column: str = "label"
    labels: str | None = None  # classify: VALUE=WORD,... (e.g. 0=no,1=yes); each word one token
    metric: str = "chrf"  # generate: chrf | bleu (sacrebleu, corpus level, on the completions)
    completion_only_loss: bool = True  # generate: SFT loss on the completion only (TRL's default)
    prompt_lines: int = 1  # generate on language-modelling rows (`text`): a dev prompt is the text's first lines
    max_length: int | None = None  # tokens per training sequence (sftdpo: 512, cs224n: 1024); prompts are cut from the left
    seed: int = 0
    # execution (recorded, and part of the hash: bf16 changes numbers)
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False  # torch.compile the training and evaluation forwards (equal to eager up to rounding)
    # sonnet decoding
    temperature: float | None = None  # sftdpo: 1.0, cs224n: 1.2 (0: greedy)
    top_p: float | None = None  # 0.9
    max_new_tokens: int | None = None  # sftdpo: 160, cs224n: 128
    num_samples: int = 1
    # DPO
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # for loss_type=robust
    # a response's log-prob in the loss: auto (TRL's choice: the mean over its tokens for ipo, else the sum) | sum | mean
    logp_reduction: str = "auto"
    pairs: str = "v1"
    pairs_n: int = 4  # rejections generated per prompt for v2/v3
    pairs_top_k: int | None = None  # v3: pairs kept (default: one per training sonnet)
    pairs_temperatures: tuple[float, ...] = (0.7, 1.0, 1.3)
    # bookkeeping that does not change results
    log_every: int = 10
    eval_batch_size: int = 32
    eval_init: bool = True  # measure dev metrics before training (epoch 0)
    # experiment trackers (Hugging Face's report_to names, comma-separated): none | tensorboard | mlflow | wandb
    report_to: str = "none"
    # what a finished run keeps: all (best and last) | best | last | none (metrics and dev outputs only);
    # the last checkpoint stays while the run can still resume
    keep_checkpoints: str = "all"

    def validate(self) -> "RunConfig":
        """Reject configs that contradict themselves, with one actionable line."""
        def bad(msg: str) -> None:
            raise SftdpoError(f"invalid config: {msg}")

        if self.task not in TASKS:
            bad(f"--task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.param not in PARAMS:
            bad(f"--param {self.param!r} is not one of {', '.join(PARAMS)}")
        if self.regime not in REGIMES:
            bad(f"--regime {self.regime!r} is not one of {', '.join(REGIMES)}")
        if self.loss_type not in LOSS_TYPES:
            bad(f"--loss-type {self.loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
        kind = TASK_KIND.get(self.task)
        if self.pairs not in PAIR_VERSIONS and not self.pairs.startswith("file:"):
            bad(f"--pairs {self.pairs!r} is not one of {', '.join(PAIR_VERSIONS)} or file:PATH")
        if self.regime != "sft" and kind == "classify" and self.pairs not in ("v1", "hardest"):
            bad(f"--pairs {self.pairs} builds pairs of generated text; a classification task's pairs are v1 (every "
                "wrong label) or hardest (the strongest wrong label)")
        if self.regime != "sft" and kind == "generate" and self.pairs == "hardest":
            bad("--pairs hardest is for classification tasks; a generation task uses v1, v2, v3 or file:PATH")
        if self.task == "classify" and (not self.template or not self.labels):
            bad("--task classify needs --template (the prompt, with {column} fields) and --labels VALUE=WORD,...")
        if self.task in ("classify", "generate") and not self.dataset and not (self.train and self.dev):
            bad(f"--task {self.task} needs its data: --train and --dev files, or --dataset (a Hugging Face dataset)")
        if self.conventions not in CONVENTIONS:
            bad(f"--conventions must be {' or '.join(CONVENTIONS)} (got {self.conventions!r})")
        if self.preprocess not in ("none", "cs224n"):
            bad(f"--preprocess must be none or cs224n (got {self.preprocess!r})")
        if self.predict not in ("label-pair", "argmax"):
            bad(f"--predict must be label-pair or argmax (got {self.predict!r})")
        if self.metric not in METRICS:
            bad(f"--metric must be {' or '.join(METRICS)} (got {self.metric!r})")
        if self.epochs < 1:
            bad(f"--epochs must be >= 1 (got {self.epochs})")
        if self.regime == "sft-dpo":
            if self.handoff_epoch is None:
                bad("--regime sft-dpo needs --handoff-epoch K (SFT epochs before DPO)")
            if not 1 <= self.handoff_epoch < self.epochs:
                bad(f"--handoff-epoch {self.handoff_epoch} must be between 1 and --epochs - 1 = {self.epochs - 1}")
        elif self.handoff_epoch is not None:
            bad(f"--handoff-epoch only applies to --regime sft-dpo (got regime {self.regime})")
        if self.budget_steps is not None:
            if self.budget_steps < 1:
                bad(f"--budget-steps must be >= 1 (got {self.budget_steps})")
            if self.regime == "sft-dpo":
                bad("--budget-steps is for single-stage runs (--regime sft or dpo): a staged run hands off after "
                    "--handoff-epoch epochs of an --epochs budget")
        if self.param == "lora" and self.lora_rank < 1:
            bad(f"--lora-rank must be >= 1 (got {self.lora_rank})")
        if self.lr < 0 or self.dpo_lr < 0:
            bad("learning rates must be >= 0")
        if self.batch_size < 1 or self.grad_accum < 1:
            bad("--batch-size and --grad-accum must be >= 1")
        if not 0 < self.data_fraction <= 1:
            bad(f"--data-fraction must be in (0, 1] (got {self.data_fraction})")
        if self.balance_labels and TASK_KIND.get(self.task) != "classify":
            bad("--balance-labels only applies to classification tasks (paraphrase, classify)")
        if self.logp_reduction not in ("auto", "sum", "mean"):
            bad(f"--logp-reduction must be auto, sum or mean (got {self.logp_reduction!r})")
        if self.schedule not in ("linear", "cosine", "constant"):
            bad(f"--schedule must be linear, cosine or constant (got {self.schedule!r})")
        if self.keep_checkpoints not in KEEP_CHECKPOINTS:
            bad(f"--keep-checkpoints must be {', '.join(KEEP_CHECKPOINTS)} (got {self.keep_checkpoints!r})")
        unknown = [t for t in self.trackers if t not in TRACKERS[1:]]
        if unknown or ("none" in self.report_to.split(",") and self.trackers):
            bad(f"--report-to takes none, or one or more of {', '.join(TRACKERS[1:])} comma-separated "
                f"(got {self.report_to!r})")
        if self.precision not in ("auto", "fp32", "bf16"):
            bad(f"--precision must be auto, fp32 or bf16 (got {self.precision!r})")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            bad(f"--device must be auto, cpu or cuda (got {self.device!r})")
        if not 0 <= self.label_smoothing < 0.5:
            bad(f"--label-smoothing must be in [0, 0.5) (got {self.label_smoothing})")
        if self.loss_type != "robust" and self.label_smoothing:
            bad("--label-smoothing only applies to --loss-type robust")
        if self.num_samples < 1 or self.pairs_n < 1:
            bad("--num-samples and --pairs-n must be >= 1")
        # ranges: each value a user can give, and what it must be
        checks = [
            ("beta", self.beta > 0, "> 0 (the DPO temperature; the paper uses 0.2)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("temperature", self.temperature >= 0, ">= 0 (0 = greedy decoding)"),
            ("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)"),
            ("lora_alpha", self.lora_alpha > 0, "> 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio <= 1, "in [0, 1]"),
            ("max_length", self.max_length >= 2, ">= 2 tokens (a prompt and its answer)"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("prompt_lines", self.prompt_lines >= 1, ">= 1"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0 (0 = no clipping)"),
            ("max_train_examples", self.max_train_examples is None or self.max_train_examples >= 1, ">= 1"),
            ("max_dev_examples", self.max_dev_examples is None or self.max_dev_examples >= 1, ">= 1"),
            ("pairs_top_k", self.pairs_top_k is None or self.pairs_top_k >= 1, ">= 1"),
            ("pairs_temperatures", len(self.pairs_temperatures) > 0 and all(t >= 0 for t in self.pairs_temperatures),
             "one or more temperatures >= 0"),
            ("eval_batch_size", self.eval_batch_size >= 1, ">= 1"),
            ("log_every", self.log_every >= 1, ">= 1"),
        ]
        for name, ok, what in checks:
            if not ok:
                bad(f"--{name.replace('_', '-')} must be {what} (got {_show(getattr(self, name))})")
        return self

    @property
    def trackers(self) -> list[str]:
        """The experiment trackers asked for (--report-to), `none` left out."""
        return [t.strip() for t in self.report_to.split(",") if t.strip() and t.strip() != "none"]

    # -- stages -------------------------------------------------------------------------------
    @property
    def sft_epochs(self) -> int:
        return {"sft": self.epochs, "dpo": 0, "sft-dpo": self.handoff_epoch or 0}[self.regime]

    @property
    def dpo_epochs(self) -> int:
        return self.epochs - self.sft_epochs

    def passes(self, steps_per_pass: int) -> int:
        """Epochs (passes over the training rows) the run trains when a pass is `steps_per_pass`
        optimizer steps: --epochs, or with --budget-steps as many passes as the budget needs, the last
        one cut short at the budget."""
        if self.budget_steps is None:
            return self.epochs
        return -(-self.budget_steps // max(steps_per_pass, 1))

    @property
    def loss_logp_reduction(self) -> str:
        """How the DPO loss reduces a response's token log-probs: TRL's IPO normalises the log-ratios by
        the response length, its other losses use sums; --logp-reduction sum|mean overrides."""
        if self.logp_reduction == "auto":
            return "mean" if self.loss_type == "ipo" else "sum"
        return self.logp_reduction

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pairs_temperatures"] = list(self.pairs_temperatures)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """A config from field values as YAML, JSON or `--set` give them: every value checked against
        its field's type and converted (`lr: 1e-3`, which PyYAML reads as a string, is the number it is)."""
        if not isinstance(d, dict):
            raise SftdpoError(f"invalid config: expected a mapping of config fields, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if not (k == "extra" and not v)}  # an empty field of sftdpo <= 0.1's configs
        unknown = sorted(set(d) - names)
        if unknown:
            raise SftdpoError(f"invalid config: unknown field(s) {', '.join(map(str, unknown))}; "
                              f"known: {', '.join(sorted(names))}")
        return cls(**{k: coerce_field(k, v) for k, v in d.items()})

    def __post_init__(self) -> None:
        """Fields left unset take the value of the run's conventions (explicit values win)."""
        if self.conventions not in CONVENTIONS:
            raise SftdpoError(f"invalid config: conventions must be {' or '.join(CONVENTIONS)} (got {self.conventions!r})")
        for name, value in CONVENTIONS[self.conventions].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def normalised(self) -> "RunConfig":
        """This config with every field the run never reads reset to its default, so equivalent
        configs compare (and hash) equal."""
        default = RunConfig()
        return dataclasses.replace(self, **{f: getattr(default, f) for f in irrelevant_fields(self)})

    def identity(self, drop: tuple[str, ...] = ()) -> dict[str, Any]:
        """The fields that can change this run's result (normalised), less `drop`."""
        d = self.normalised().to_dict()
        if d["data_fingerprint"]:
            drop = (*drop, "train", "dev")
        default = RunConfig()
        drop = (*drop, *(f for f in LATER_FIELDS if d[f] == getattr(default, f)))
        return {k: v for k, v in d.items() if k not in NON_RESULT_FIELDS and k not in drop}

    def hash(self) -> str:
        """The run's id: a short hash of every field that can change its result."""
        return stable_hash(self.identity())

    def trajectory_key(self) -> str | None:
        """Runs with the same key follow the same SFT trajectory, epoch for epoch (the SFT schedule
        spans the whole budget, so `epochs` stays in): the regime, the hand-off and the DPO
        settings aside. None for a run without an SFT stage."""
        if self.sft_epochs == 0:
            return None
        return stable_hash(self.identity(("regime", "handoff_epoch", *DPO_FIELDS)))

    def init_eval_key(self) -> str:
        """Runs with the same key evaluate the same untrained model on the same dev data with the
        same decoding (a fresh LoRA adapter is the identity), whatever they train."""
        return stable_hash(self.identity(TRAINING_FIELDS))


# -- locations ---------------------------------------------------------------------------------

def cache_dir() -> Path:
    """User cache: converted backbones, downloaded sources, reference log-probs."""
    root = os.environ.get("SFTDPO_CACHE_DIR")
    if root:
        p = Path(root)
    else:
        p = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sftdpo"
    p.mkdir(parents=True, exist_ok=True)
    return p


@contextlib.contextmanager
def cache_dir_at(path: str | Path) -> Iterator[Path]:
    """cache_dir() is `path` inside the block (this process and the runs it starts), as before after it."""
    old = os.environ.get("SFTDPO_CACHE_DIR")
    os.environ["SFTDPO_CACHE_DIR"] = str(path)
    try:
        yield Path(path)
    finally:
        if old is None:
            os.environ.pop("SFTDPO_CACHE_DIR", None)
        else:
            os.environ["SFTDPO_CACHE_DIR"] = old


def data_dirs() -> list[Path]:
    """Candidate data directories in priority order: $SFTDPO_DATA_DIR, ./data, the user cache."""
    out: list[Path] = []
    env = os.environ.get("SFTDPO_DATA_DIR")
    if env:
        out.append(Path(env).expanduser())
    out.append(Path.cwd() / "data")
    out.append(cache_dir() / "data")
    return out


def find_in_data_dirs(rel: str) -> Path | None:
    """First existing `rel` (file or folder) under the data directories."""
    for d in data_dirs():
        p = d / rel
        if p.exists():
            return p
    return None


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (or the HTTPS proxy) answers. Checked up front because
    huggingface_hub and datasets retry a dead network for most of a minute; offline we go straight
    to the local cache. The probe runs in a thread so a hanging DNS lookup cannot stall us either."""
    if any(os.environ.get(v, "").strip().lower() in ("1", "on", "yes", "true")
           for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return False
    target = (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("ALL_PROXY")
              or os.environ.get("all_proxy") or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    url = urlparse(target if "://" in target else "http://" + target)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    ok: list[bool] = []

    def probe() -> None:
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1)
    return bool(ok)


def task_definition(d: Any, where: str, name: str | None = None) -> dict[str, Any]:
    """A task written once (a --task-file, an entry of a study spec's `tasks:`) as config fields: `kind`
    (classify or generate; or `task`) and `name` become task / task_name, the rest are config fields
    (files or dataset, template, label_column, labels, metric, ...)."""
    if not isinstance(d, dict):
        raise SftdpoError(f"{where}: a task is a mapping of fields (kind, train, dev, template, labels, ...)")
    d = dict(d)
    kind = d.pop("kind", None) or d.pop("task", None)
    if kind not in ("classify", "generate"):
        raise SftdpoError(f"{where}: `kind` must be classify or generate (got {kind!r})")
    task_name = d.pop("name", None) or name
    unknown = sorted(set(d) - set(FIELD_TYPES))
    if unknown:
        raise SftdpoError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; a task sets config fields "
                          "(train, dev, dataset, template, label_column, labels, metric, ...)")
    return {**d, "task": kind, "task_name": str(task_name) if task_name else None}


# field name -> its annotation as text ("float", "int | None", ...), for from_dict's checks
FIELD_TYPES = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}
