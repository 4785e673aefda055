"""The parameterizations of `--param`: full fine-tuning, PEFT's methods, and two subsets of the model's
own weights. What each one builds, trains, merges and exports lives here; which config fields each one
reads lives in config.irrelevant_fields.

  fft                    every weight
  lora dora rslora       LoRA (PEFT LoraConfig; --lora-*): plain, weight-decomposed (use_dora), rank-stabilised
  pissa olora            LoRA initialised from the weights' principal singular vectors / a QR decomposition
                         (the base keeps the residual: the untrained model is the pretrained one up to rounding)
  lora-plus              LoRA with lora_B trained at --loraplus-lr-ratio x --lr (PEFT's create_loraplus_optimizer)
  ia3 vera loha lokr     PEFT's IA3, VeRA, LoHa, LoKr adapters
  adalora                AdaLoRA: its rank budget is reallocated during training (update_and_allocate every step)
  oft boft               orthogonal fine-tuning (block-diagonal / butterfly)
  prefix prompt          virtual tokens: trained key/value prefixes in every layer / trained input embeddings
  bitfit ln              no adapter: only the biases / only the normalisation layers' weights train

Defaults are those of PEFT's own method comparison (METHODS: the experiment each comes from, and its
learning rate); `--peft-set KEY=VALUE` sets any other field of the method's PEFT config, typed by it.
PEFT's LoHa, LoKr, OFT, BOFT (and OLoRA's initialisation) take `nn.Linear` layers only: GPT-2's
`Conv1D` layers are converted to `nn.Linear` (the transposed weight: the same function) before such an
adapter is applied, and converted back when the adapter is merged for export.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import types
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from peft import (AdaLoraConfig, BOFTConfig, IA3Config, LoHaConfig, LoKrConfig, LoraConfig, OFTConfig, PeftModel,
                  PrefixTuningConfig, PromptTuningConfig, VeraConfig, get_peft_model)
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import (ADAPTER_PARAMS, LORA_PARAMS, SUBSET_PARAMS, TASK_KIND, VIRTUAL_TOKEN_PARAMS, RunConfig,
                     SftdpoError)

# PEFT 0.21's prefix-tuning forward hands transformers 5 its prefix as `past_key_values`, deprecated for `cache`:
# a FutureWarning at the first forward of every prefix run, not ours to fix
warnings.filterwarnings("ignore", "`past_key_values` is deprecated", FutureWarning)

# PEFT's method comparison: huggingface/peft, method_comparison/MetaMathQA/experiments/<experiment>/
# (adapter_config.json, training_params.json; Llama-3.2-3B, 5000 steps of batch 4, AdamW, cosine schedule,
# weight decay 0.1 unless the experiment's training_params.json replaces the optimizer options)
COMPARISON = "PEFT method_comparison/MetaMathQA (huggingface/peft@5d602fd)"


@dataclass(frozen=True)
class Method:
    """One `--param`: its PEFT config class (None: no adapter) and the options sftdpo sets by default
    (those of `source`, where PEFT's own defaults differ), the learning rate `source` trains with, and
    what the method can do."""

    config: type | None
    defaults: dict[str, Any]
    source: str  # the PEFT method-comparison experiment the defaults and `lr` come from, or what else
    lr: float
    merges: bool = True  # folds into the base weights (export --merge, decoding from merged weights)
    linear_only: bool = False  # PEFT takes nn.Linear layers only (not GPT-2's Conv1D)


_LORA_LR = "no experiment of its own: lora/llama-3.2-3B-rank32's"
METHODS: dict[str, Method] = {
    "fft": Method(None, {}, "full-finetuning/llama-3.2-3B-lr_0.00001", 1e-5),
    "lora": Method(LoraConfig, {}, "lora/llama-3.2-3B-rank32 (r=32, alpha=64; sftdpo's --lora-rank 8 --lora-alpha 16 "
                                   "keeps alpha/r)", 1e-4),
    "dora": Method(LoraConfig, {}, "lora/llama-3.2-3B-rank32-dora", 1e-4),
    "rslora": Method(LoraConfig, {}, "lora/llama-3.2-3B-rank64-rslora", 1e-4),
    "pissa": Method(LoraConfig, {}, f"PEFT init_lora_weights='pissa' (exact SVD); lr: {_LORA_LR}", 1e-4),
    # (PEFT's OLoRA initialisation does not handle GPT-2's transposed Conv1D weights: converted to Linear)
    "olora": Method(LoraConfig, {}, f"PEFT init_lora_weights='olora'; lr: {_LORA_LR}", 1e-4, linear_only=True),
    "lora-plus": Method(LoraConfig, {}, "PEFT create_loraplus_optimizer with the LoRA+ paper's ratio 2^4 = 16; lr: "
                                        f"{_LORA_LR}", 1e-4),
    "ia3": Method(IA3Config, {}, "ia3/llama-3.2-3B-lr_0.001 (the better of its two learning rates)", 1e-3),
    "vera": Method(VeraConfig, {"r": 256, "d_initial": 0.1, "save_projection": True}, "vera/llama-3.2-3B-default", 1e-3),
    "loha": Method(LoHaConfig, {"r": 32, "alpha": 64}, "loha/llama-3.2-3B-rank32", 1e-4, linear_only=True),
    "lokr": Method(LoKrConfig, {"r": 32, "alpha": 64, "decompose_factor": 4}, "lokr/llama-3.2-3B-rank32-factor4-lr0.003",
                   3e-3, linear_only=True),
    # tinit/tfinal: 200 and 500 of the experiment's 5000 steps, as shares of each stage's steps (adalora_schedule)
    "adalora": Method(AdaLoraConfig, {"init_r": 64, "target_r": 32, "lora_alpha": 8, "tinit": 200, "tfinal": 500,
                                      "deltaT": 1, "beta1": 0.85, "beta2": 0.85, "orth_reg_weight": 0.5,
                                      "total_step": 5000}, "adalora/llama-3.2-3B-rank32", 1e-4),
    "oft": Method(OFTConfig, {"r": 32, "oft_block_size": 0, "eps": 6e-5}, "oft/llama-3.2-3B-rank32", 1e-4,
                  linear_only=True),
    "boft": Method(BOFTConfig, {"boft_block_size": 4, "boft_n_butterfly_factor": 1}, "boft/llama-3.2-3B-default", 1e-4,
                   linear_only=True),
    "prefix": Method(PrefixTuningConfig, {}, "prefixtuning/llama-3.2-3B-lr_0.001 (200 virtual tokens)", 1e-3,
                     merges=False),
    "prompt": Method(PromptTuningConfig, {"prompt_tuning_init": "RANDOM"},
                     "prompt_tuning/llama-3.2-3B-lr_0.001 (200 virtual tokens, random init)", 1e-3, merges=False),
    "bitfit": Method(None, {}, "no PEFT experiment: the BitFit paper's largest learning rate (Ben Zaken et al. 2022 "
                               "searched 1e-4 to 1e-3)", 1e-3),
    "ln": Method(None, {}, "ln_tuning/llama-3.2-3B-default (PEFT's LN tuning trains the same weights)", 1e-4),
}

# AdaLoRA's phases as shares of the steps (the experiment's 200 and 500 of 5000)
ADALORA_TINIT_SHARE, ADALORA_TFINAL_SHARE = 200 / 5000, 500 / 5000

# PEFT config fields sftdpo sets itself, and the flag that sets each (--peft-set refuses them)
_ALWAYS = {"task_type": "sftdpo (CAUSAL_LM)", "peft_type": "--param", "inference_mode": "sftdpo",
           "base_model_name_or_path": "--model", "revision": "--model"}
_OWNED = {
    **{p: {"r": "--lora-rank", "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout",
           "target_modules": "--lora-targets", "use_rslora": "--param rslora or --use-rslora",
           "use_dora": "--param dora or --use-dora", "init_lora_weights": "--param (pissa, olora)",
           "fan_in_fan_out": "sftdpo (from the layer type)"} for p in LORA_PARAMS},
    **{p: {"num_virtual_tokens": "--num-virtual-tokens", "token_dim": "the model", "num_layers": "the model",
           "num_attention_heads": "the model", "num_transformer_submodules": "the model"} for p in VIRTUAL_TOKEN_PARAMS},
    "adalora": {"total_step": "the run (its optimizer steps)"},
}


# -- --peft-set ----------------------------------------------------------------------------------

def config_class(param: str) -> type:
    cls = METHODS[param].config
    if cls is None:
        raise SftdpoError(f"--peft-set applies to PEFT adapter methods ({', '.join(ADAPTER_PARAMS)}); --param {param} "
                          "has no PEFT config")
    return cls


def peft_options(param: str, entries: tuple[str, ...]) -> dict[str, Any]:
    """`--peft-set KEY=VALUE` entries as typed options of the method's PEFT config class, or one line
    naming the class and the key it has not (or that sftdpo sets itself)."""
    if not entries:
        return {}
    cls = config_class(param)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    owned = {**_ALWAYS, **_OWNED.get(param, {})}
    out: dict[str, Any] = {}
    for entry in entries:
        key, value = entry.split("=", 1)
        if key not in fields:
            raise SftdpoError(f"--peft-set {key}: {cls.__name__} (--param {param}) has no field {key!r}; its fields: "
                              f"{', '.join(sorted(fields - set(owned)))}")
        if key in owned:
            raise SftdpoError(f"--peft-set {key}: set by {owned[key]} for --param {param}, not by --peft-set")
        out[key] = _typed(hints[key], value, f"--peft-set {key} ({cls.__name__})")
    return out


def _typed(hint: Any, value: str, where: str) -> Any:
    """`value` as the annotated type: the first of None, bool, int, float, a Literal, a list (comma-separated;
    a str-or-list field takes a regex or `all-linear` as the string), a dict (JSON) or str that reads it."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    v = value.strip()
    literals = [a for a in args if typing.get_origin(a) is typing.Literal]
    lists = [a for a in args if typing.get_origin(a) in (list, tuple)]
    if type(None) in args and v.lower() in ("none", "null"):
        return None
    if bool in args and v.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
        return v.lower() in ("true", "yes", "1", "on")
    if int in args:
        try:
            return int(v)
        except ValueError:
            pass
    if float in args:
        try:
            return float(v)
        except ValueError:
            pass
    for lit in literals:
        if v in typing.get_args(lit):
            return v
    if str in args and lists and (v == "all-linear" or re.search(r"[*\\$^()|\[\]+?]", v)):
        return v  # target_modules as a regular expression (PEFT matches a string in full)
    if lists:
        inner = (typing.get_args(lists[0]) or (str,))[0]
        try:
            return [inner(x.strip()) if inner in (int, float) else x.strip() for x in v.split(",") if x.strip()]
        except (TypeError, ValueError):
            pass
    if dict in args or any(typing.get_origin(a) is dict for a in args):
        try:
            return json.loads(v)
        except json.JSONDecodeError:
            pass
    if str in args or hint is Any:
        return v
    raise SftdpoError(f"{where} must be {hint}, got {value!r}")


# -- GPT-2's Conv1D ------------------------------------------------------------------------------

# set on a model whose Conv1D layers were converted: their names, to convert them back
CONVERTED_ATTR = "sftdpo_linear_from_conv1d"


def conv1d_to_linear(model: nn.Module) -> list[str]:
    """Replace every transformers `Conv1D` (y = x W + b, W: in x out) by the `nn.Linear` with weight W^T:
    the same function, in the layer type LoHa, LoKr, OFT and BOFT accept. Returns (and records on the
    model) the converted modules' names."""
    names = []
    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):
            lin = nn.Linear(m.nx, m.nf, bias=m.bias is not None, device=m.weight.device, dtype=m.weight.dtype)
            with torch.no_grad():
                lin.weight.copy_(m.weight.t())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            model.set_submodule(name, lin)
            names.append(name)
    if names:
        setattr(model, CONVERTED_ATTR, tuple(names))
    return names


def linear_to_conv1d(model: nn.Module) -> None:
    """Undo conv1d_to_linear on a plain (or merged) model, so it saves as the model type it was loaded as."""
    for name in getattr(model, CONVERTED_ATTR, ()):
        lin = model.get_submodule(name)
        conv = Conv1D(lin.out_features, lin.in_features)
        with torch.no_grad():
            conv.weight = nn.Parameter(lin.weight.detach().t().contiguous())
            if lin.bias is not None:
                conv.bias = nn.Parameter(lin.bias.detach().clone())
        model.set_submodule(name, conv)
    if hasattr(model, CONVERTED_ATTR):
        delattr(model, CONVERTED_ATTR)


# -- building the model --------------------------------------------------------------------------

LORA_TARGET_PRESETS = {
    # GPT-2 uses fused Conv1D projections, Llama separate Linear ones
    "gpt2": {"attention": ["c_attn", "c_proj"], "all-linear": ["c_attn", "c_proj", "c_fc"]},
    "llama": {"attention": ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear": "all-linear"},
}


def lora_target_modules(model, targets: str):
    family = "gpt2" if model.config.model_type == "gpt2" else "llama"
    if targets in ("attention", "all-linear"):
        if model.config.model_type not in ("gpt2", "llama"):
            return "all-linear" if targets == "all-linear" else ["q_proj", "k_proj", "v_proj", "o_proj"]
        return LORA_TARGET_PRESETS[family][targets]
    return [t.strip() for t in targets.split(",") if t.strip()]


def _lora_config(model, cfg: RunConfig) -> LoraConfig:
    targets = lora_target_modules(model, cfg.lora_targets)
    # GPT-2 attention 'c_proj' also names the MLP output projection; with "attention" keep only attn.*
    if model.config.model_type == "gpt2" and cfg.lora_targets == "attention":
        targets = r".*\.attn\.(c_attn|c_proj)$"
    init = {"pissa": {"init_lora_weights": "pissa"}, "olora": {"init_lora_weights": "olora"}}.get(cfg.param, {})
    return LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        use_rslora=cfg.use_rslora or cfg.param == "rslora", use_dora=cfg.use_dora or cfg.param == "dora", bias="none",
        task_type="CAUSAL_LM", fan_in_fan_out=model.config.model_type == "gpt2" and not hasattr(model, CONVERTED_ATTR),
        **init, **peft_options(cfg.param, cfg.peft_set),
    )


def peft_config(model, cfg: RunConfig):
    """The PEFT config of `cfg`'s method for `model`: the method's defaults, then --peft-set."""
    if cfg.param in LORA_PARAMS:
        return _lora_config(model, cfg)
    method = METHODS[cfg.param]
    options = {**method.defaults, **peft_options(cfg.param, cfg.peft_set)}
    if cfg.param in VIRTUAL_TOKEN_PARAMS:
        options["num_virtual_tokens"] = cfg.num_virtual_tokens
    try:
        return method.config(task_type="CAUSAL_LM", **options)
    except (TypeError, ValueError) as e:
        raise SftdpoError(f"--param {cfg.param}: {method.config.__name__} refuses these options "
                          f"({str(e).splitlines()[0][:200]}); check --peft-set") from None


def apply_lora(model, cfg: RunConfig):
    """Wrap with a PEFT LoRA adapter (LoRA and its variants); its initialisation is governed by the run seed."""
    lcfg = _lora_config(model, cfg)
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(cfg.seed)
        # PEFT 0.21 asks transformers 5 for a deprecated attribute: a FutureWarning in every LoRA run, not ours to fix
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        try:
            return get_peft_model(model, lcfg)
        except ValueError as e:
            raise SftdpoError(f"--lora-targets {cfg.lora_targets!r} matches no module of this model: {str(e)[:200]}") from None


def apply_param(model, cfg: RunConfig, longest: int = 0):
    """`model` as `cfg.param` trains it: itself (fft), with only a subset trainable (bitfit, ln), or
    wrapped in the method's PEFT adapter, initialised under the run seed. `longest`: the run's longest
    sequence in tokens (virtual tokens must still fit the model's positions)."""
    if cfg.param == "fft":
        return model
    if cfg.param in SUBSET_PARAMS:
        return _train_subset(model, cfg.param)
    if METHODS[cfg.param].linear_only:
        conv1d_to_linear(model)
    if cfg.param in LORA_PARAMS:
        return apply_lora(model, cfg)
    if cfg.param in VIRTUAL_TOKEN_PARAMS:
        _check_positions(model, cfg, longest)
    pcfg = peft_config(model, cfg)
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(cfg.seed)
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        warnings.filterwarnings("ignore", "fan_in_fan_out is set to False", UserWarning)  # PEFT sets it for Conv1D
        # BOFT tries to build its CUDA kernel and, without it, runs its PyTorch version (the same function)
        warnings.filterwarnings("ignore", "Failed to load the CUDA extension", UserWarning)
        warnings.filterwarnings("ignore", "Setting boft_n_butterfly_factor to 1", UserWarning)
        try:
            return get_peft_model(model, pcfg)
        except (TypeError, ValueError) as e:
            raise SftdpoError(f"--param {cfg.param}: PEFT cannot apply {type(pcfg).__name__} to {cfg.model} "
                              f"({str(e).splitlines()[0][:200]})") from None


def _norm_module(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith(("LayerNorm", "RMSNorm"))


def _train_subset(model, param: str):
    """bitfit: every bias trains (BitFit); ln: every normalisation layer's weights (and biases) train.
    The rest is frozen; there is no adapter: the model is the pretrained one until it trains."""
    if param == "bitfit":
        chosen = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
        if not chosen:
            raise SftdpoError(f"--param bitfit: this {model.config.model_type} model has no bias terms to train "
                              "(Llama-family layers have none); use --param ln or an adapter method")
    else:
        chosen = [p for m in model.modules() if _norm_module(m) for p in m.parameters(recurse=False)]
        if not chosen:
            raise SftdpoError(f"--param ln: this {model.config.model_type} model has no normalisation layers found")
    model.requires_grad_(False)
    for p in chosen:
        p.requires_grad_(True)
    return model


def _check_positions(model, cfg: RunConfig, longest: int) -> None:
    limit = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    need = longest + cfg.num_virtual_tokens + (cfg.max_new_tokens or 0) * (TASK_KIND.get(cfg.task) == "generate")
    if limit and need > limit:
        raise SftdpoError(f"--param {cfg.param}: {cfg.num_virtual_tokens} virtual tokens before sequences of up to "
                          f"{need - cfg.num_virtual_tokens} tokens need {need} positions, and {cfg.model} has {limit}: "
                          "lower --num-virtual-tokens or --max-length")


# -- what the rest of sftdpo asks of a model -------------------------------------------------------

def virtual_tokens(model) -> int:
    """Positions a prompt-learning adapter puts before every sequence (prefix, prompt); 0 for every
    other model, and while the adapter is disabled (PEFT's flag for disable_adapter())."""
    if not isinstance(model, PeftModel) or getattr(model, "_adapters_disabled", False):
        return 0
    pc = model.active_peft_config
    return pc.num_virtual_tokens if pc.is_prompt_learning else 0


def is_prefix(model) -> bool:
    """Whether the virtual tokens are key/value prefixes (prefix tuning) rather than input embeddings."""
    return virtual_tokens(model) > 0 and type(model.active_peft_config).__name__ == "PrefixTuningConfig"


def merges(model) -> bool:
    """Whether the model holds an adapter whose weights fold into the base (not virtual tokens)."""
    return isinstance(model, PeftModel) and not model.active_peft_config.is_prompt_learning


def trainable_share(trainable: int, total: int) -> float:
    """Trainable parameters in % of all (PEFT's print_trainable_parameters)."""
    return 100.0 * trainable / total if total else 0.0


# -- the training loop's hooks ---------------------------------------------------------------------

class MethodHooks:
    """What a method adds to the training loop (train/loop.py, train/step.py): LoRA+'s learning rate per
    weight, AdaLoRA's orthogonal regulariser and rank allocation, and the virtual tokens each row trains
    through. The other methods need none of it."""

    def __init__(self, model, cfg: RunConfig) -> None:
        self.model, self.cfg = model, cfg
        self.virtual = virtual_tokens(model)
        self.adalora = cfg.param == "adalora"
        self.lr_factor: Callable[[str, torch.Tensor], float] | None = self._loraplus if cfg.param == "lora-plus" else None

    def _loraplus(self, name: str, p: torch.Tensor) -> float:
        """LoRA+ (PEFT create_loraplus_optimizer): lora_B, and 1-d adapter weights, at ratio x lr."""
        return self.cfg.loraplus_lr_ratio if "lora_B" in name or p.ndim == 1 else 1.0

    def start_stage(self, total_steps: int) -> None:
        """A stage's optimizer schedule spans `total_steps`: AdaLoRA's budget schedule spans them too,
        its warm-up and final phases the experiment's shares of them (unless --peft-set gives steps)."""
        if not self.adalora:
            return
        pc = self.model.peft_config["default"]
        given = dict(e.split("=", 1) for e in self.cfg.peft_set)
        pc.total_step = total_steps
        pc.tinit = int(given["tinit"]) if "tinit" in given else int(ADALORA_TINIT_SHARE * total_steps)
        pc.tfinal = int(given["tfinal"]) if "tfinal" in given else int(ADALORA_TFINAL_SHARE * total_steps)
        if pc.tinit >= total_steps - pc.tfinal:
            raise SftdpoError(f"--param adalora: tinit {pc.tinit} and tfinal {pc.tfinal} leave no budgeting phase in "
                              f"{total_steps} steps: lower them (--peft-set tinit=, tfinal=)")

    def before_update(self) -> None:
        """After the step's gradients are summed over ranks, before clipping: AdaLoRA's orthogonal
        regulariser (PEFT adds it to the loss in AdaLoraModel.forward, which our losses bypass),
        whose gradient is added here, once per optimizer step."""
        if not self.adalora:
            return
        weight = self.model.peft_config["default"].orth_reg_weight
        if weight:
            reg = adalora_orth_reg(self.model)
            if reg.requires_grad:
                (weight * reg).backward()

    def after_update(self, step: int) -> None:
        """After the optimizer step, before the gradients are cleared (PEFT: update_and_allocate needs
        them): AdaLoRA's importance scores and rank budget; `step` counts the stage's steps from 0."""
        if self.adalora:
            self.model.base_model.update_and_allocate(step)

    def extra_tokens(self, rows: int) -> int:
        """Virtual tokens the step's `rows` rows ran through (logged token counts include them)."""
        return self.virtual * rows


def adalora_orth_reg(model) -> torch.Tensor:
    """AdaLoRA's regulariser as PEFT's AdaLoraModel.forward computes it: the mean over lora_A and lora_B
    of ||P P^T - I||_F (A) and ||P^T P - I||_F (B)."""
    terms = []
    for n, p in model.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and "default" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            terms.append(torch.norm(cov - torch.eye(*cov.size(), device=cov.device, dtype=cov.dtype), p="fro"))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def method_state(model) -> dict | None:
    """What a method keeps beside the trainable weights, for an exact resume: AdaLoRA's importance
    scores (exponential averages) and its rank pattern."""
    ra = getattr(getattr(model, "base_model", None), "rankallocator", None)
    if ra is None:
        return None
    return {"ipt": ra.ipt, "exp_avg_ipt": ra.exp_avg_ipt, "exp_avg_unc": ra.exp_avg_unc,
            "rank_pattern": model.peft_config["default"].rank_pattern}


def load_method_state(model, state: dict | None) -> None:
    if not state:
        return
    ra = model.base_model.rankallocator
    device = next(model.parameters()).device
    ra.ipt, ra.exp_avg_ipt, ra.exp_avg_unc = ({k: v.to(device) for k, v in state[key].items()}
                                              for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"))
    model.peft_config["default"].rank_pattern = state["rank_pattern"]


# -- export ----------------------------------------------------------------------------------------

def export_kind(cfg: RunConfig, merge: bool) -> str:
    """What `sftdpo export` writes for this run: full (fft, bitfit, ln: the whole model, with or without
    --merge), adapter (a PEFT adapter directory) or merged (the adapter folded into the base)."""
    if cfg.param == "fft":
        if merge:
            raise SftdpoError("--merge applies to LoRA runs and the other PEFT methods that merge (an FFT run exports "
                              "its full weights already)")
        return "full"
    if cfg.param in SUBSET_PARAMS:
        return "full"  # the trained biases / norms live in the model's own weights: the whole model either way
    if merge and not METHODS[cfg.param].merges:
        raise SftdpoError(f"--merge: --param {cfg.param} does not merge (its virtual tokens are no weights to fold into "
                          "the base); export the adapter without --merge")
    return "merged" if merge else "adapter"


def save_for_export(model, cfg: RunConfig, kind: str, out: Path, initial: Callable[[], Any]) -> None:
    """Write the exported weights to `out` (save_pretrained). Merged and full models with converted
    Conv1D layers are converted back (a plain GPT-2). A PiSSA/OLoRA adapter is saved as the equivalent
    plain LoRA for the original base (PEFT's path_initial_model_for_weight_conversion; `initial()` gives
    the untrained model it is taken against)."""
    if kind == "merged":
        model = model.merge_and_unload()
    if kind in ("merged", "full"):
        linear_to_conv1d(model)
        model.save_pretrained(out, safe_serialization=True)
        return
    if cfg.param in ("pissa", "olora"):
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            # PEFT loads the initial adapter beside the trained one to take the difference, and warns about two adapters
            warnings.filterwarnings("ignore", ".* changes the base weights of the model", UserWarning)
            init_dir = Path(tmp) / "initial"  # (PEFT names an adapter after the directory: no dots)
            initial().save_pretrained(init_dir, safe_serialization=True)
            model.save_pretrained(out, safe_serialization=True, path_initial_model_for_weight_conversion=str(init_dir))
        return
    model.save_pretrained(out, safe_serialization=True)
