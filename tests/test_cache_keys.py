"""Cache entries that hold computed numbers (the untrained model's dev metrics, DPO reference log-probs,
sampled DPO pairs) are keyed by what decides their rounding (models.rounding_id): an entry computed at
one torch thread count is never reused at another, so a run's numbers do not depend on what ran
before it on the machine (bf16 sums differ between one and two threads; the quick demo's runs did)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sftdpo.config import RunConfig, cache_dir_at
from sftdpo.objectives.dpo import pairs as pairs_mod
from sftdpo.objectives.dpo import reference
from sftdpo.train import evaluation

CPU = torch.device("cpu")


@pytest.fixture
def threads():
    """Set torch's thread count inside a test; restored after it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_untrained_metrics_are_cached_per_thread_count(tmp_path, monkeypatch, threads):
    """Catches a key without the thread count (device.type alone): the second thread count would read
    the first one's metrics instead of evaluating."""
    calls = []

    def fake_evaluate(task, model, device, precision, is_main=True):
        calls.append(torch.get_num_threads())
        return {"dev/accuracy": 0.5 + len(calls)}, None, 0.0

    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    cfg, task = RunConfig(model="tiny-gpt2"), SimpleNamespace(source="s", dev=[1, 2, 3])
    with cache_dir_at(tmp_path):
        threads(1)
        first = evaluation.untrained_metrics(cfg, task, None, CPU, "fp32")[0]
        assert evaluation.untrained_metrics(cfg, task, None, CPU, "fp32")[0] == first  # same threads: cached
        threads(2)
        second = evaluation.untrained_metrics(cfg, task, None, CPU, "fp32")[0]
    assert calls == [1, 2] and second != first


def test_reference_label_logps_are_cached_per_thread_count(tmp_path, monkeypatch, threads):
    """Catches a reference key without the thread count: DPO-only runs at two threads would train
    against log-probs computed at one (the pretrained model's weights fingerprint is the same)."""
    calls = []

    def fake_label_logps(model, task, device, precision, *, adapter_disabled):
        calls.append(torch.get_num_threads())
        return torch.full((len(task.train_ids), len(task.label_ids)), -float(len(calls)))

    monkeypatch.setattr(reference, "label_logps", fake_label_logps)
    cfg, task = RunConfig(model="tiny-gpt2"), SimpleNamespace(train_ids=[[1, 2], [3]], label_ids=[7, 8])
    kw = dict(fingerprint="w", adapter_disabled=False)
    with cache_dir_at(tmp_path):
        threads(1)
        a, _ = reference.cached_label_logps(None, task, cfg, CPU, "bf16", **kw)
        b, info = reference.cached_label_logps(None, task, cfg, CPU, "bf16", **kw)
        assert info["reference_cache_hit"] and torch.equal(a, b)
        threads(2)
        c, info = reference.cached_label_logps(None, task, cfg, CPU, "bf16", **kw)
    assert calls == [1, 2] and not info["reference_cache_hit"] and not torch.equal(a, c)


def test_sampled_pairs_key_names_the_thread_count(threads):
    """Catches a pairs key without the thread count: sampled continuations change with the rounding."""
    cfg = RunConfig(model="tiny-gpt2", task="sonnet")
    task = SimpleNamespace(pair_examples=[SimpleNamespace(id="1", prompt="p", completion="c")])
    threads(1)
    k1, f1 = pairs_mod._pairs_key("v1", "w", cfg, task, CPU, "bf16", None)
    threads(2)
    k2, f2 = pairs_mod._pairs_key("v1", "w", cfg, task, CPU, "bf16", None)
    assert k1 != k2 and "1 threads" in f1["device"] and "2 threads" in f2["device"]


def test_a_dpo_stage_resumes_at_another_thread_count_but_not_on_another_device(tmp_path, threads):
    """The run directory's saved DPO inputs name the device with its rounding; catches a resume check
    that compares that string with the bare device type (every resumed CPU run refused) or that accepts
    inputs computed on a GPU."""
    from sftdpo.errors import SftdpoError
    from sftdpo.models import rounding_id
    from sftdpo.objectives.dpo import check_saved
    from sftdpo.objectives.dpo.reference import reference_name

    cfg = RunConfig(model="tiny-gpt2", regime="dpo")
    ctx = SimpleNamespace(cfg=cfg, device=CPU, precision="fp32")
    threads(1)
    saved = {"reference": reference_name(cfg), "key_fields": {"precision": "fp32", "device": rounding_id(CPU)}}
    threads(2)
    check_saved(ctx, tmp_path, saved)  # another thread count: resumed
    check_saved(ctx, tmp_path, {**saved, "key_fields": {"precision": "fp32", "device": "cpu"}})  # older run dirs
    for device, precision in (("cuda (NVIDIA H100 80GB HBM3)", "fp32"), ("cuda", "fp32"), (rounding_id(CPU), "bf16")):
        with pytest.raises(SftdpoError, match="resume it where it started"):
            check_saved(ctx, tmp_path, {**saved, "key_fields": {"precision": precision, "device": device}})
