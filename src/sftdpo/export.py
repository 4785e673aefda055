"""`sftdpo export RUN --out DIR`: a trained run as a Hugging Face model directory.

FFT runs (and BitFit, LN: their trained weights are the model's own) become a directory that
`AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` load; adapter runs
(LoRA and the other PEFT methods) a PEFT adapter directory (`PeftModel.from_pretrained(base, DIR)`), or
with `--merge` the merged full model where the method merges (not prefix/prompt tuning). Each gets a model
card (README.md) with the base model, task, regime, the resolved config and the dev metrics. The
offline backbone (smollm2-135m) exports as a plain Llama model. Only a finished run exports
(predict.load_finished_run). The directory is built beside its final place and put there when complete:
an interrupted or failed export leaves nothing that looks complete, and re-exporting over an earlier
export (a directory holding sftdpo_config.json) keeps the earlier one until the new one is whole.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml
from safetensors import SafetensorError

from .config import SftdpoError, hub_reachable, param_label
from .files import replace_dir
from .models import load_model, weights_origin
from .peft_methods import METHODS, apply_param, export_kind, save_for_export
from .predict import load_finished_run, run_config

log = logging.getLogger("sftdpo")


def export_run(run_dir: str | Path, out: str | Path, checkpoint: str = "best", merge: bool = False,
               push_to_hub: str | None = None) -> Path:
    """Write run `run_dir`'s `checkpoint` weights to `out` (see the module docstring); returns `out`."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "sftdpo_config.json").is_file())):
        raise SftdpoError(f"--out {out} exists and is not empty (nor an earlier sftdpo export): give a new directory")
    if push_to_hub and not hub_reachable():
        raise SftdpoError(f"--push-to-hub {push_to_hub} needs the Hugging Face hub, which does not answer (offline?): "
                          f"export without it, and upload later with `huggingface-cli upload {push_to_hub} DIR`")
    kind = export_kind(run_config(run_dir), merge)  # by --param: full, adapter or merged (peft_methods)
    run = load_finished_run(run_dir, checkpoint, "export")
    cfg = run.cfg
    model = run.model.to("cpu")
    summary = json.loads((run_dir / "summary.json").read_text())  # a finished run's (load_finished_run)

    def build(tmp: Path) -> None:
        save_for_export(model, cfg, kind, tmp, lambda: apply_param(load_model(cfg.model, seed=cfg.seed)[0], cfg))
        run.tok.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(cfg.to_dict(), summary, checkpoint, kind), encoding="utf-8")
        (tmp / "sftdpo_config.json").write_text(json.dumps({"hash": cfg.hash(), "config": cfg.to_dict()}, indent=1))

    try:
        replace_dir(out, build)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(out.with_name(out.name + ".new"), ignore_errors=True)  # replace_dir's unfinished build
        raise SftdpoError(f"could not write the export to {out} ({getattr(e, 'strerror', None) or e}): nothing was "
                          "replaced (an earlier export there is as it was); free space or give another --out") from None
    log.info("exported %s (%s checkpoint, %s weights) to %s", run_dir, checkpoint, kind, out)
    if push_to_hub:
        _push(out, push_to_hub)
    return out


def _push(folder: Path, repo: str) -> None:
    from huggingface_hub import HfApi

    try:
        api = HfApi()
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo)
    except Exception as e:  # network, auth, permissions: the export itself is done and stays
        raise SftdpoError(f"--push-to-hub {repo} failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); the "
                          f"export is complete in {folder}: upload it with `huggingface-cli upload {repo} {folder}`") from None
    log.info("pushed %s to https://huggingface.co/%s", folder, repo)


def _regime(cfg: dict) -> str:
    r = cfg.get("regime")
    return {"sft": "SFT", "dpo": "DPO-only"}.get(r) or f"SFT for {cfg.get('handoff_epoch')} epochs, then DPO (SFT@k→DPO)"


def model_card(cfg: dict, summary: dict, checkpoint: str, kind: str) -> str:
    """The exported directory's README.md: what the model is, how it was trained, how it scored, how to load it."""
    base = cfg.get("model")
    metrics = {k: v for k, v in summary.items() if k.startswith(("dev/", "best/", "init/")) and isinstance(v, (int, float))}
    load = {
        "full": "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained(DIR)\ntokenizer = AutoTokenizer.from_pretrained(DIR)",
        "merged": "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                  "model = AutoModelForCausalLM.from_pretrained(DIR)\ntokenizer = AutoTokenizer.from_pretrained(DIR)",
        "adapter": "from peft import PeftModel\nfrom transformers import AutoTokenizer\n"
                   f"base = ...  # the base model below ({base}), as sftdpo loads it\n"
                   "model = PeftModel.from_pretrained(base, DIR)\ntokenizer = AutoTokenizer.from_pretrained(DIR)",
    }[kind]
    what = {"full": "full fine-tuning (all weights)", "merged": f"LoRA r={cfg.get('lora_rank')}, merged into the base weights",
            "adapter": f"a LoRA adapter (r={cfg.get('lora_rank')}, alpha={cfg.get('lora_alpha')}, "
                       f"targets {cfg.get('lora_targets')}) for the base model"}[kind]
    if cfg.get("param", "lora") not in ("fft", "lora"):  # the other methods (peft_methods)
        what = {"full": f"{param_label(cfg)}: the whole model, its trained weights in place",
                "merged": f"{param_label(cfg)}, merged into the base weights",
                "adapter": f"a {param_label(cfg)} adapter for the base model"}[kind]
        if kind == "adapter" and METHODS[cfg["param"]].linear_only:
            load = load.replace("model = PeftModel", "from sftdpo.peft_methods import conv1d_to_linear\n"
                                f"conv1d_to_linear(base)  # a GPT-2 base: PEFT's {cfg['param']} takes nn.Linear, not "
                                "Conv1D (no-op for other models)\nmodel = PeftModel")
    tags = ["sftdpo", *(["sft"] if cfg.get("regime") != "dpo" else []), *(["dpo"] if cfg.get("regime") != "sft" else [])]
    lines = [
        "---", "library_name: " + ("peft" if kind == "adapter" else "transformers"), f"tags: [{', '.join(tags)}]",
        "---", "",
        f"# {cfg.get('task_name') or cfg.get('task')}: {_regime(cfg)}, {what}", "",
        f"Trained with sftdpo from `{base}`: {weights_origin(str(base))}.", "",
        f"- Task: {cfg.get('task_name') or cfg.get('task')}; regime: {_regime(cfg)}; {cfg.get('epochs')} epochs; "
        f"checkpoint: {checkpoint} (best = highest dev {'accuracy' if cfg.get('task') != 'sonnet' else 'chrF'} epoch)",
        f"- Weights here: {what}",
        f"- sftdpo run hash: `{summary.get('run_hash', '')}`; data: {summary.get('data_source', 'see the config')}",
        "", "## Dev metrics (sftdpo's evaluation of the run)", "",
    ]
    lines += [f"- `{k}`: {v:.4f}" if isinstance(v, float) else f"- `{k}`: {v}" for k, v in metrics.items()] or ["- (none recorded)"]
    if summary.get("best_epoch") is not None:
        lines.append(f"- best epoch: {summary['best_epoch']}")
    if base == "smollm2-135m":
        lines += ["", "The base is SmolLM2-135M-Instruct as dequantized from its Q4_1 GGUF, not the hub's bf16 "
                      "checkpoint: an adapter belongs to that base (sftdpo caches it as safetensors); `--merge` gives a "
                      "self-contained model."]
    lines += ["", "## Load", "", "```python", load.replace("DIR", '"."'), "```", "",
              "## Config (sftdpo's resolved run config)", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)

