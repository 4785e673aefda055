"""Every preference objective against TRL (1.16) on the same batch: DPO's 15 loss types, its multi-loss,
f-divergences, LD-DPO and WPO (DPOTrainer._compute_loss), CPO and SimPO (CPOTrainer), ORPO
(ORPOTrainer), KTO (KTOTrainer, and its KL completions from TRL's own data preparation); then that the
reference-free objectives never compute a reference, that each objective trains end to end in both
preference regimes, and that KTO resumes exactly. Tiny models (tiny-gpt2) and data written for the tests.

Bounds: fp32 throughout; sftdpo and TRL compute the same log-prob sums in another order (sftdpo's LM head
on the response positions, TRL's chunked fused head), which agree to 1e-5 relative (README,
Development). A loss or reward moves with its log-prob inputs at most ~beta times as much, so each value
is held within 1e-5 x (|value| + beta x the largest |log-prob|); log-probs within 1e-5 x their magnitude;
reward accuracies exactly (no margin is within rounding of 0 here)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import warnings
from pathlib import Path

import pytest
import torch

from sftdpo.config import LOSS_TYPES, OBJECTIVE_FIELDS, RunConfig, SftdpoError
from sftdpo.models import load_model
from sftdpo.objectives import StageContext
from sftdpo.objectives import dpo as dpo_stage
from sftdpo.objectives.cpo import CPOObjective
from sftdpo.objectives.dpo import DPOObjective
from sftdpo.objectives.dpo import reference as dpo_reference
from sftdpo.objectives.dpo.pairs import PairSet, label_pair_set
from sftdpo.objectives.dpo.reference import compute_reference_logps
from sftdpo.objectives.kto import KTOExamples, KTOObjective, examples_from_rows, kl_partners
from sftdpo.objectives.orpo import ORPOObjective
from sftdpo.objectives.preference import build_preference_objective
from sftdpo.train.loop import Run

from conftest import make_tiny_task, require_tiny_gpt2

# TRL's configs pass transformers' `gradient_checkpointing`, renamed in transformers 5 (a FutureWarning)
pytestmark = pytest.mark.filterwarnings("ignore:.*checkpointing.*:FutureWarning")
CPU = torch.device("cpu")
FIX = Path(__file__).parent / "fixtures" / "data"
SONNETS = dict(train=str(FIX / "sonnets" / "sonnets.txt"), dev=str(FIX / "sonnets" / "TRUE_sonnets_held_out_dev.txt"))
BETA = 0.5
SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}  # the loss types that read it


@pytest.fixture(scope="module")
def trl():
    pytest.importorskip("trl", minversion="1.16")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("trl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="trl")
    import trl
    return trl


@pytest.fixture(scope="module")
def model_tok(tmp_path_factory):
    """tiny-gpt2 with its weights moved (seeded) so its next-token distributions are far from uniform:
    chosen and rejected log-probs then differ, and a swapped or mis-weighted term shows."""
    require_tiny_gpt2()
    model, tok = load_model("tiny-gpt2", seed=1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import write_synthetic_qqp

    d = tmp_path_factory.mktemp("objectives-data")
    return {"paraphrase": dict(train=str(write_synthetic_qqp(d / "train.csv", 16, seed=1)),
                               dev=str(write_synthetic_qqp(d / "dev.csv", 8, seed=2))),
            "sonnet": SONNETS}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTDPO_CACHE_DIR", str(tmp_path / "cache"))


def within(got: float, want: float, scale: float = 0.0) -> bool:
    return abs(float(got) - float(want)) <= 1e-5 * (abs(float(want)) + scale)


def sequence_pairs(n: int = 6, seed: int = 0) -> PairSet:
    """Synthetic prompt/chosen/rejected token ids with chosen and rejected of different lengths."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda k: torch.randint(100, 5000, (k,), generator=g).tolist()  # noqa: E731
    return PairSet([ids(3 + i) for i in range(n)], [ids(2 + (i * 3) % 5) for i in range(n)],
                   [ids(1 + (i * 2) % 6) for i in range(n)])


@pytest.fixture(scope="module")
def cases(model_tok, data, tmp_path_factory):
    """Per path ('sequence': generation pairs, 'one-token': the paraphrase cloze): the config, task, pair
    set and reference log-probs (the policy's own, moved by offsets of both signs and sizes)."""
    model, tok = model_tok
    out = {}
    for path, task_name in (("sequence", "sonnet"), ("one-token", "paraphrase")):
        cfg, task = make_tiny_task(data, task_name, "tiny-gpt2", tok, regime="dpo", beta=BETA)
        ps = sequence_pairs() if path == "sequence" else label_pair_set(task)  # paraphrase: one pair per prompt
        n = len(ps)
        obj = DPOObjective(cfg, task, ps, torch.zeros(n), torch.zeros(n, 1), {})
        with torch.no_grad():
            lp = obj.policy_logps(model, obj.batch(list(range(n))))
        # offsets of both signs, neither set symmetric about 0: over offsets ±x the batch mean cancels any
        # odd term in one log-ratio (sppo_hard's or nca_pair's chosen sign flipped, apo's σ(β·r_w) written
        # σ(β/r_w): each left the mean loss of linspace(-2, 2) as it was)
        ref_c = lp.chosen + torch.linspace(-2, 2.6, n)
        ref_r = lp.rejected + torch.linspace(1.5, -1.0, n)
        out[path] = (cfg, task, ps, ref_c, ref_r if path == "sequence" else ref_r[:, None])
    return out


# -- DPO: every loss type, its knobs, and several at once, against DPOTrainer ------------------------

@pytest.fixture(scope="module")
def trl_dpo(trl, model_tok, tmp_path_factory):
    from datasets import Dataset

    model, tok = model_tok
    args = trl.DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl-dpo")), report_to="none", use_cpu=True, bf16=False,
                         per_device_train_batch_size=2, precompute_ref_log_probs=True, gradient_checkpointing=False,
                         use_weighting=True)  # the fused head then also returns log Σ p² (WPO); toggled per case
    tr = trl.DPOTrainer(model=copy.deepcopy(model), args=args, processing_class=tok,
                        train_dataset=Dataset.from_dict({"prompt": ["a b"], "chosen": [" c"], "rejected": [" d"]}))
    tr.model.eval()
    return tr


def trl_dpo_loss(tr, cfg: RunConfig, ps: PairSet, ref_c, ref_r) -> tuple[float, dict]:
    """DPOTrainer's loss and logged metrics on the pairs of `ps`, TRL configured as `cfg` (the same names)."""
    types = cfg.loss_types
    for name, value in {"loss_types": types, "loss_weights": list(cfg.loss_weights or [1.0] * len(types)),
                        "beta": cfg.beta, "label_smoothing": cfg.label_smoothing, "ld_alpha": cfg.ld_alpha,
                        "f_divergence_type": cfg.f_divergence_type, "f_alpha_divergence_coef": cfg.f_alpha_divergence_coef,
                        "use_weighting": cfg.use_weighting, "precompute_ref_logps": True}.items():
        setattr(tr, name, value)
    tr.args.discopop_tau = cfg.discopop_tau
    rows = [{"prompt_ids": ps.prompt[i], "chosen_ids": ps.chosen[i], "rejected_ids": ps.rejected[i],
             "ref_chosen_logps": float(ref_c[i]), "ref_rejected_logps": float(ref_r[i].reshape(-1)[0])}
            for i in range(len(ps))]
    tr._metrics["eval"].clear()
    with torch.no_grad():
        loss = tr._compute_loss(tr.model, tr.data_collator(rows), False)
    return loss.item(), {k: v[-1] for k, v in tr._metrics["eval"].items()}


def sftdpo_loss(obj, model, rows=None) -> tuple[float, dict]:
    with torch.no_grad():
        loss, metrics = obj.loss(model, obj.batch(list(range(len(obj.ps))) if rows is None else rows))
    return loss.item(), {k: float(v) for k, v in metrics.items()}


def logp_scale(obj, model) -> float:
    """The largest |summed log-prob| of the pairs' responses: what the bounds scale with."""
    with torch.no_grad():
        lp = obj.policy_logps(model, obj.batch(list(range(len(obj.ps)))))
    return float(torch.cat([lp.chosen, lp.rejected]).abs().max())


def assert_same(got: tuple[float, dict], want: tuple[float, dict], beta: float, logp_scale: float) -> None:
    """sftdpo's loss and every metric it logs equal TRL's under the same name (bounds: module docstring)."""
    (loss, metrics), (trl_loss, trl_metrics) = got, want
    assert within(loss, trl_loss, beta * logp_scale), (loss, trl_loss)
    assert set(metrics) <= set(trl_metrics), set(metrics) - set(trl_metrics)
    for k, v in metrics.items():
        if k.endswith("accuracies"):
            assert v == trl_metrics[k], k
        else:
            assert within(v, trl_metrics[k], logp_scale), (k, v, trl_metrics[k])


def dpo_case(cases, path, **kw):
    cfg, task, ps, ref_c, ref_r = cases[path]
    cfg = dataclasses.replace(cfg, **kw).validate()
    return cfg, DPOObjective(cfg, task, ps, ref_c, ref_r, {}), ps, ref_c, ref_r


@pytest.mark.parametrize("path", ["sequence", "one-token"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_dpo_loss_type_equals_trl_on_the_same_batch(trl_dpo, model_tok, cases, path, loss_type):
    """Each of TRL's 15 loss types, on generation pairs (chosen and rejected of other lengths) and on the
    cloze's one-token pairs: the loss and rewards/*, logps/* equal DPOTrainer's. Catches a wrong sign, a
    beta applied twice or not at all, a missing length normalisation (ipo, sigmoid_norm), the sft term
    averaged per sequence instead of per token, aot without its sorting, EXO's epsilon on the wrong
    side, a rejected term read from the chosen response."""
    model, _ = model_tok
    cfg, obj, ps, ref_c, ref_r = dpo_case(cases, path, loss_type=loss_type, label_smoothing=SMOOTHING.get(loss_type, 0.0))
    want = trl_dpo_loss(trl_dpo, cfg, ps, ref_c, ref_r)
    got = sftdpo_loss(obj, model)
    assert_same(got, want, BETA, float(max(ref_c.abs().max(), ref_r.abs().max())))


KNOBS = [(name, kw) for name, kw in [
    ("mpo", dict(loss_type="sigmoid,bco_pair,sft", loss_weights=(0.8, 0.2, 1.0))),
    ("ipo+hinge", dict(loss_type="ipo,hinge", loss_weights=(0.3, 2.0))),
    ("ld-sigmoid", dict(loss_type="sigmoid", ld_alpha=0.3)), ("ld0-ipo", dict(loss_type="ipo", ld_alpha=0.0)),
    ("ld-sft", dict(loss_type="sft", ld_alpha=0.5)),
    ("forward_kl-sigmoid", dict(loss_type="sigmoid", f_divergence_type="forward_kl")),
    ("js-ipo", dict(loss_type="ipo", f_divergence_type="js_divergence")),
    ("alpha-sigmoid_norm", dict(loss_type="sigmoid_norm", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)),
    ("js-robust", dict(loss_type="robust", label_smoothing=0.2, f_divergence_type="js_divergence")),
    ("wpo-sigmoid", dict(loss_type="sigmoid", use_weighting=True)), ("wpo-ipo", dict(loss_type="ipo", use_weighting=True)),
    ("wpo-bco+apo", dict(loss_type="bco_pair,apo_zero", use_weighting=True)),
    ("discopop-tau", dict(loss_type="discopop", discopop_tau=0.3)),
]]
# --ld-alpha is refused on one-token answers (chosen and rejected have the same length): sequences only
KNOB_CASES = [pytest.param(kw, path, id=f"{name}-{path}") for name, kw in KNOBS for path in ("sequence", "one-token")
              if not (path == "one-token" and "ld_alpha" in kw)]


@pytest.mark.parametrize("knobs,path", KNOB_CASES)
def test_dpo_knobs_equal_trl(trl_dpo, model_tok, cases, knobs, path):
    """TRL's multi-loss (weighted sum), LD-DPO (--ld-alpha: the shared-length split of each pair's
    responses), f-DPO (--f-divergence-type) and WPO (--use-weighting, the policy's full next-token
    distribution at each response position) equal DPOTrainer's. Catches ignored loss weights,
    LD weights on the wrong tokens (or on the policy but not the reference), a WPO weight from matched
    tokens or with its gradient kept, an f-divergence applied to the rewards instead of the scores."""
    model, _ = model_tok
    cfg, obj, ps, ref_c, ref_r = dpo_case(cases, path, **knobs)
    want = trl_dpo_loss(trl_dpo, cfg, ps, ref_c, ref_r)
    assert_same(sftdpo_loss(obj, model), want, BETA, float(max(ref_c.abs().max(), ref_r.abs().max())))


def test_multi_loss_is_the_weighted_sum_of_the_single_losses(model_tok, cases):
    """--loss-type sigmoid,bco_pair,sft --loss-weights 0.8,0.2,1.0 (MPO) is 0.8 x sigmoid + 0.2 x bco_pair +
    1.0 x sft of the same batch, and logs the same metrics as each. Catches weights ignored, applied to the
    wrong loss type, or the combination averaged instead of summed."""
    model, _ = model_tok
    for path in ("sequence", "one-token"):
        _, multi, *_ = dpo_case(cases, path, loss_type="sigmoid,bco_pair,sft", loss_weights=(0.8, 0.2, 1.0))
        loss, metrics = sftdpo_loss(multi, model)
        singles = [sftdpo_loss(dpo_case(cases, path, loss_type=t)[1], model) for t in ("sigmoid", "bco_pair", "sft")]
        expected = 0.8 * singles[0][0] + 0.2 * singles[1][0] + 1.0 * singles[2][0]
        assert abs(loss - expected) <= 1e-6 * (1 + abs(expected))
        assert metrics == singles[0][1]
        assert len({round(s[0], 4) for s in singles}) == 3  # three different terms: the weights matter


def test_ld_alpha_reference_log_probs_equal_trl(trl_dpo, model_tok, cases):
    """The cached reference log-probs with --ld-alpha are TRL's compute_ref_log_probs: the shared-length
    sum plus ld_alpha x the tail, on each pair's own shared length (not the batch's, not the chosen's).
    Catches a reference summed plainly while the policy is LD-weighted."""
    model, _ = model_tok
    cfg, task, ps, _, _ = cases["sequence"]
    cfg = dataclasses.replace(cfg, ld_alpha=0.25).validate()
    got_c, got_r = compute_reference_logps(model, task, ps, cfg, CPU, "fp32", adapter_disabled=False)
    trl_dpo.ld_alpha = 0.25
    rows = [{"prompt_ids": ps.prompt[i], "chosen_ids": ps.chosen[i], "rejected_ids": ps.rejected[i]} for i in range(len(ps))]
    want_c, want_r = trl_dpo.compute_ref_log_probs(trl_dpo.model, trl_dpo.data_collator(rows))
    plain_c, _ = compute_reference_logps(model, task, ps, dataclasses.replace(cfg, ld_alpha=None), CPU, "fp32",
                                         adapter_disabled=False)
    scale = float(want_c.abs().max())
    assert float((got_c - want_c).abs().max()) <= 1e-5 * scale and float((got_r - want_r).abs().max()) <= 1e-5 * scale
    assert float((plain_c - want_c).abs().max()) > 1.0  # the weighting changes the sums


# -- the reference-free objectives: CPO, SimPO, ORPO ------------------------------------------------

def trl_pair_batch(ps: PairSet, pad_id: int) -> dict:
    """CPOTrainer's / ORPOTrainer's batch of the pairs of `ps` (prompt + response per side, labels on the
    responses)."""
    def pad(seqs, v):
        w = max(map(len, seqs))
        return torch.tensor([s + [v] * (w - len(s)) for s in seqs])

    b = {}
    for side, resp in (("chosen", ps.chosen), ("rejected", ps.rejected)):
        seqs = [p + r for p, r in zip(ps.prompt, resp)]
        b[f"{side}_input_ids"] = pad(seqs, pad_id)
        b[f"{side}_attention_mask"] = pad([[1] * len(s) for s in seqs], 0)
        b[f"{side}_labels"] = pad([[-100] * len(p) + r for p, r in zip(ps.prompt, resp)], -100)
    return b


@pytest.fixture(scope="module")
def trl_cpo(trl, model_tok, tmp_path_factory):
    from datasets import Dataset
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    model, tok = model_tok
    args = CPOConfig(output_dir=str(tmp_path_factory.mktemp("trl-cpo")), report_to="none", use_cpu=True, bf16=False,
                     gradient_checkpointing=False)
    return CPOTrainer(model=copy.deepcopy(model).eval(), args=args, processing_class=tok,
                      train_dataset=Dataset.from_dict({"prompt": ["a b"], "chosen": [" c"], "rejected": [" d"]}))


@pytest.fixture(scope="module")
def trl_orpo(trl, model_tok, tmp_path_factory):
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    model, tok = model_tok
    args = ORPOConfig(output_dir=str(tmp_path_factory.mktemp("trl-orpo")), report_to="none", use_cpu=True, bf16=False,
                      gradient_checkpointing=False)
    return ORPOTrainer(model=copy.deepcopy(model).eval(), args=args, processing_class=tok,
                       train_dataset=Dataset.from_dict({"prompt": ["a b"], "chosen": [" c"], "rejected": [" d"]}))


# (id, --objective, the run's options, CPOTrainer's configuration as TRL's docs give it for that method:
# SimPO is loss_type simpo with cpo_alpha 0, CPO-SimPO with cpo_alpha > 0)
CPO_CASES = [pytest.param(objective, kw, trl_kw, id=name) for name, objective, kw, trl_kw in [
    ("cpo-sigmoid", "cpo", dict(loss_type="sigmoid"), dict(loss_type="sigmoid", cpo_alpha=1.0)),
    ("cpo-hinge", "cpo", dict(loss_type="hinge"), dict(loss_type="hinge", cpo_alpha=1.0)),
    ("cpo-ipo", "cpo", dict(loss_type="ipo", beta=0.3), dict(loss_type="ipo", cpo_alpha=1.0)),  # 1/(2β) ≠ 2β
    ("cpo-smoothed", "cpo", dict(loss_type="sigmoid", label_smoothing=0.1, cpo_alpha=0.3),
     dict(loss_type="sigmoid", cpo_alpha=0.3)),
    ("simpo", "simpo", {}, dict(loss_type="simpo", cpo_alpha=0.0)),
    ("simpo-gamma", "simpo", dict(simpo_gamma=1.5, label_smoothing=0.05), dict(loss_type="simpo", cpo_alpha=0.0)),
    ("cpo-simpo", "simpo", dict(cpo_alpha=0.5), dict(loss_type="simpo", cpo_alpha=0.5)),
]]


@pytest.mark.parametrize("path", ["sequence", "one-token"])
@pytest.mark.parametrize("objective,kw,trl_kw", CPO_CASES)
def test_cpo_and_simpo_equal_trl(trl_cpo, model_tok, cases, path, objective, kw, trl_kw):
    """CPO (sigmoid, hinge, ipo; the NLL term weighted by cpo_alpha) and SimPO (length-normalised rewards,
    the margin gamma/beta; cpo_alpha 0 by default, CPO-SimPO with it) equal CPOTrainer's loss and metrics,
    TRL configured from the case, not from the objective's own reading of it. Catches the margin gamma
    added instead of subtracted or not divided by beta, sums where SimPO averages, the NLL term missing,
    averaged per sequence or kept for SimPO, --objective simpo run as cpo's sigmoid, IPO's 1/(2β) as 2β,
    a reference term sneaking in."""
    model, _ = model_tok
    cfg, task, ps, _, _ = cases[path]
    cfg = dataclasses.replace(cfg, objective=objective, **kw).validate()
    obj = CPOObjective(cfg, task, ps, {})
    for name, value in {"beta": cfg.beta, "label_smoothing": cfg.label_smoothing, "simpo_gamma": cfg.simpo_gamma,
                        **trl_kw}.items():
        setattr(trl_cpo, name, value)
    with torch.no_grad():
        trl_loss, trl_metrics = trl_cpo.get_batch_loss_metrics(trl_cpo.model, trl_pair_batch(ps, task.pad_id), "train")
    got = sftdpo_loss(obj, model)
    assert_same(got, (trl_loss.item(), trl_metrics), cfg.beta, logp_scale(obj, model))
    assert "nll_loss" in got[1] and ("rewards/margins" in got[1])


def test_cpo_logp_reduction_override_is_trls_other_unit(trl_cpo, model_tok, cases):
    """--logp-reduction mean on cpo's sigmoid loss is CPOTrainer's simpo at γ = 0 (the same sigmoid on mean
    log-probs), and --logp-reduction sum on simpo at γ = 0 is CPOTrainer's sigmoid (on sums); the NLL
    term weighted alike. Catches the override ignored (the auto unit is shown to differ here) or a unit
    missing from it."""
    model, _ = model_tok
    cfg0, task, ps, _, _ = cases["sequence"]  # responses of 2 to 6 tokens: sums and means part
    for objective, kw, trl_type in (("cpo", dict(loss_type="sigmoid"), "simpo"),
                                    ("simpo", dict(simpo_gamma=0.0, cpo_alpha=1.0), "sigmoid")):
        unit = "mean" if trl_type == "simpo" else "sum"
        for name, value in {"loss_type": trl_type, "beta": cfg0.beta, "cpo_alpha": 1.0, "label_smoothing": 0.0,
                            "simpo_gamma": 0.0}.items():
            setattr(trl_cpo, name, value)
        with torch.no_grad():
            trl_loss, _ = trl_cpo.get_batch_loss_metrics(trl_cpo.model, trl_pair_batch(ps, task.pad_id), "train")
        objs = {reduction: CPOObjective(dataclasses.replace(cfg0, objective=objective, logp_reduction=reduction,
                                                            **kw).validate(), task, ps, {})
                for reduction in (unit, "auto")}
        losses = {reduction: sftdpo_loss(obj, model)[0] for reduction, obj in objs.items()}
        bound = cfg0.beta * logp_scale(objs[unit], model)
        assert within(losses[unit], trl_loss.item(), bound), (objective, losses, trl_loss.item())
        assert not within(losses["auto"], trl_loss.item(), bound), (objective, losses, trl_loss.item())


@pytest.mark.parametrize("path", ["sequence", "one-token"])
def test_orpo_equals_trl(trl_orpo, model_tok, cases, path):
    """ORPO's loss (NLL of the chosen sequence, prompt tokens included as TRL scores them, minus lambda x
    the mean log-sigmoid of the log odds ratio of mean log-probs) and its metrics (log_odds_ratio,
    log_odds_chosen, nll_loss, rewards/*) equal ORPOTrainer's. Catches the NLL on the response only,
    odds from summed log-probs, log(1 - p) computed as log(p), lambda's sign."""
    model, _ = model_tok
    cfg, task, ps, _, _ = cases[path]
    cfg = dataclasses.replace(cfg, objective="orpo", beta=0.3).validate()
    obj = ORPOObjective(cfg, task, ps, {})
    trl_orpo.beta = cfg.beta
    with torch.no_grad():
        trl_loss, trl_metrics = trl_orpo.get_batch_loss_metrics(trl_orpo.model, trl_pair_batch(ps, task.pad_id), "train")
    got = sftdpo_loss(obj, model)
    assert_same(got, (trl_loss.item(), trl_metrics), cfg.beta, logp_scale(obj, model))
    assert {"log_odds_ratio", "log_odds_chosen", "nll_loss"} <= set(got[1])


# -- KTO -----------------------------------------------------------------------------------------------

KTO_B = 4


@pytest.fixture(scope="module")
def trl_kto(trl, model_tok, tmp_path_factory):
    """KTOTrainer on 12 unpaired text rows (unique completions) in micro-batches of 4, its reference
    log-probs precomputed at construction (its data preparation builds the KL completions)."""
    from datasets import Dataset

    model, tok = model_tok
    rows = {"prompt": [f"Question {i}:" for i in range(12)], "completion": [f" answer{i}" for i in range(12)],
            "label": [i % 3 != 0 for i in range(12)]}
    args = trl.KTOConfig(output_dir=str(tmp_path_factory.mktemp("trl-kto")), report_to="none", use_cpu=True, bf16=False,
                         gradient_checkpointing=False, per_device_train_batch_size=KTO_B, precompute_ref_log_probs=True)
    tr = trl.KTOTrainer(model=copy.deepcopy(model), args=args, processing_class=tok, train_dataset=Dataset.from_dict(rows))
    tr.model.eval()
    return tr


def test_kl_completions_are_trls_rotation_within_each_micro_batch(trl_kto):
    """An example's KL completion is the completion TRL's own data preparation gives it: the previous
    example's in its micro-batch, the first the last's (KTOTrainer rotates by +1 within each
    per-device batch). Catches the KL term from matched pairs (each example's own completion), a
    rotation the other way, or pairs across micro-batches."""
    d = trl_kto.train_dataset
    n = len(d)
    groups = [list(range(s, min(s + KTO_B, n))) for s in range(0, n, KTO_B)]
    partner = kl_partners(groups, n)
    assert all(p != i for i, p in enumerate(partner))  # mismatched: never the example's own completion
    assert [d["completion_ids"][p] for p in partner] == d["KL_completion_ids"]


def kto_examples(task, one_token: bool) -> KTOExamples:
    """8 examples in 2 micro-batches, desirable and undesirable mixed in each."""
    labels = [True, False, True, True, False, True, False, True]
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    if one_token:
        rows = [{"prompt_index": i, "completion_id": task.train_labels[i] if lab else task.wrong_label_ids(task.train_labels[i])[0],
                 "label": lab} for i, lab in enumerate(labels)]
        return examples_from_rows(task, rows, groups)
    ps = sequence_pairs(8, seed=5)
    partner = kl_partners(groups, 8)
    return KTOExamples(PairSet(ps.prompt, ps.chosen, [ps.chosen[p] for p in partner]), labels, groups, None)


@pytest.mark.parametrize("path", ["sequence", "one-token"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.3, 0.7)], ids=["equal", "weighted"])
def test_kto_equals_trl(trl_kto, model_tok, cases, path, weights):
    """KTO's loss (desirable 1 - sigma(beta (r - z0)), undesirable 1 - sigma(beta (z0 - r)), z0 the clamped
    mean log-ratio of the micro-batch's KL completions, no gradient through it) and its metrics (kl,
    rewards/*, logps/*) equal KTOTrainer's on the same micro-batch with the same reference log-probs.
    Catches desirable and undesirable swapped, z0 with the wrong sign or unclamped, the weights
    swapped, rewards averaged over the whole batch instead of each label's examples."""
    model, _ = model_tok
    cfg, task, *_ = cases[path]
    cfg = dataclasses.replace(cfg, objective="kto", beta=0.4, desirable_weight=weights[0],
                              undesirable_weight=weights[1]).validate()
    ex = kto_examples(task, path == "one-token")
    n = len(ex)
    with torch.no_grad():
        obj = KTOObjective(cfg, task, ex, torch.zeros(n), torch.zeros(n), {})
        logps, kl_logps = torch.cat([torch.stack(obj.policy_logps(model, obj.batch(g))) for g in ex.groups], dim=1)
    ref = logps + torch.linspace(-1.5, 1.0, n)
    ref_kl = kl_logps + torch.linspace(-3.0, 3.0, n)  # the micro-batches' mean KL log-ratio: one > 0, one clamped
    obj = KTOObjective(cfg, task, ex, ref, ref_kl, {})
    for name, value in {"beta": cfg.beta, "desirable_weight": weights[0], "undesirable_weight": weights[1],
                        "precompute_ref_logps": True}.items():
        setattr(trl_kto, name, value)
    kls = []
    for group in ex.groups:
        rows = [{"prompt_ids": ex.ps.prompt[i], "completion_ids": ex.ps.chosen[i], "KL_completion_ids": ex.ps.rejected[i],
                 "label": ex.label[i], "ref_logps": float(ref[i]), "ref_KL_logps": float(ref_kl[i])} for i in group]
        trl_kto._metrics["eval"].clear()
        with torch.no_grad():
            trl_loss = trl_kto._compute_loss(trl_kto.model, trl_kto.data_collator(rows), False).item()
        want = {k: v[-1] for k, v in trl_kto._metrics["eval"].items()}
        got = sftdpo_loss(obj, model, group)
        assert_same(got, (trl_loss, want), cfg.beta, float(ref.abs().max()))
        assert {"kl", "rewards/chosen", "rewards/rejected", "rewards/margins"} <= set(got[1])
        kls.append(got[1]["kl"])
    assert kls[0] > 0 and kls[1] == 0  # both branches of the clamp


# -- reference-free: no reference at all ---------------------------------------------------------------

def _refuse(*a, **k):
    raise AssertionError("a reference-free objective computed reference log-probs")


@pytest.mark.parametrize("objective", ["simpo", "cpo", "orpo"])
@pytest.mark.parametrize("task", ["paraphrase", "sonnet"])
def test_reference_free_objectives_never_compute_a_reference(objective, task, data, tmp_path, monkeypatch):
    """SimPO, CPO and ORPO build their pairs and nothing else: every function that computes or caches
    reference log-probs raises, and no reference file is written. Catches a reference-free stage that
    still runs (and pays for) the reference pass, or loads one from the cache."""
    require_tiny_gpt2()
    for module, name in ((dpo_reference, "label_logps"), (dpo_reference, "compute_reference_logps"),
                         (dpo_reference, "_cached"), (dpo_stage, "cached_label_logps"),
                         (dpo_stage, "cached_reference_logps")):
        monkeypatch.setattr(module, name, _refuse)
    cfg = RunConfig(task=task, model="tiny-gpt2", regime="dpo", objective=objective, batch_size=2, device="cpu",
                    precision="fp32", max_new_tokens=8, max_train_examples=6, **data[task]).validate()
    run = Run(cfg, tmp_path / "run")
    run.build()
    obj = run.objective("dpo")
    assert obj.ref_chosen is None and obj.ref_rejected is None
    assert obj.describe()["reference"] == f"none ({objective} is reference-free)"
    assert not (tmp_path / "run" / "dpo" / "reference.safetensors").exists()
    assert (tmp_path / "run" / "dpo" / "pairs.jsonl").exists() and (tmp_path / "run" / "dpo" / "state.json").exists()
    run.model.train(obj.train_mode)
    (batch,) = next(iter(obj.steps(1)))
    loss, _ = obj.loss(run.model, batch)
    assert torch.isfinite(loss)


# -- end to end: each objective trains in both preference regimes -----------------------------------

def _stage_epochs(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == "epoch" and r["stage"] == "dpo"]


@pytest.mark.parametrize("objective", ["simpo", "cpo", "orpo", "kto"])
@pytest.mark.parametrize("regime", ["dpo", "sft-dpo"])
def test_each_objective_trains_end_to_end(objective, regime, data, tmp_path):
    """DPO-only (from the pretrained model) and SFT@1 -> preference, on the paraphrase cloze: the stage
    runs under its objective, its training loss falls over its epochs, and the reference exists only
    for KTO. Catches an objective whose gradient does not reach the model (or has the wrong sign), the
    preference stage silently running DPO, a reference-free run writing a reference."""
    require_tiny_gpt2()
    cfg = RunConfig(task="paraphrase", model="tiny-gpt2", regime=regime, epochs=4,
                    handoff_epoch=1 if regime == "sft-dpo" else None, objective=objective, lr=1e-3, dpo_lr=2e-3,
                    beta=0.5 if objective != "simpo" else 2.0, batch_size=4, max_train_examples=12, max_dev_examples=4,
                    device="cpu", precision="fp32", eval_init=False, keep_checkpoints="none", warmup_ratio=0.0,
                    **data["paraphrase"]).validate()
    summary = Run(cfg, tmp_path / "run").train()
    assert summary["stages"]["dpo"]["objective"] == objective
    epochs = _stage_epochs(tmp_path / "run")
    assert len(epochs) == (4 if regime == "dpo" else 3)
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    assert (tmp_path / "run" / "dpo" / "reference.safetensors").exists() == (objective == "kto")
    key = "train/kl" if objective == "kto" else "train/nll_loss"
    assert key in epochs[-1]


@pytest.mark.parametrize("objective", ["kto", "orpo"])
def test_generation_objectives_train_end_to_end(objective, tmp_path):
    """On sonnets (sequence responses: KTO on the sampled pairs split into desirable and undesirable,
    its KL completions in a second no-grad pass; ORPO scoring the whole chosen sequence): the loss falls."""
    require_tiny_gpt2()
    cfg = RunConfig(task="sonnet", model="tiny-gpt2", regime="dpo", epochs=3, objective=objective, dpo_lr=2e-3,
                    beta=0.5, batch_size=2, max_train_examples=6, max_dev_examples=2, max_new_tokens=8, device="cpu",
                    precision="fp32", eval_init=False, keep_checkpoints="none", warmup_ratio=0.0, **SONNETS).validate()
    summary = Run(cfg, tmp_path / "run").train()
    epochs = _stage_epochs(tmp_path / "run")
    assert epochs[-1]["train/loss"] < epochs[0]["train/loss"]
    if objective == "kto":
        stage = summary["stages"]["dpo"]
        assert stage["kto_examples"] == "unpaired" and stage["desirable"] == stage["undesirable"] == stage["pairs_generated"]


# -- KTO's stage: micro-batches fixed, examples, resume ---------------------------------------------

class _Interrupt(Exception):
    pass


def test_kto_stage_examples_micro_batches_and_exact_resume(data, tmp_path):
    """KTO on the cloze (`auto`: each training prompt's gold label, desirable; `unpaired` adds the wrong
    label, undesirable): every example's KL completion is another example's completion in its own fixed
    micro-batch; a run interrupted inside the stage resumes to the same records from its saved examples
    and reference. Catches KL partners drawn from another micro-batch, micro-batches redrawn each epoch
    (the cached KL reference then belongs to other pairs), a resume that rebuilds the examples from the
    current weights."""
    require_tiny_gpt2()
    base = dict(task="paraphrase", model="tiny-gpt2", objective="kto", lr=1e-3, dpo_lr=1e-3, beta=0.5, batch_size=4,
                max_train_examples=10, max_dev_examples=4, device="cpu", precision="fp32", eval_init=False,
                **data["paraphrase"])
    run = Run(RunConfig(regime="dpo", kto_examples="unpaired", **base).validate(), tmp_path / "unpaired")
    run.build()
    obj = run.objective("dpo")
    ex = obj.ex
    assert sum(ex.label) == 10 and len(ex) == 20  # each prompt: its gold label, and the other label
    assert sorted(i for g in ex.groups for i in g) == list(range(20)) and max(map(len, ex.groups)) == 4
    partner = kl_partners(ex.groups, len(ex))
    for g in ex.groups:
        for i in g:
            assert partner[i] in g and ex.ps.rejected[i] == ex.ps.chosen[partner[i]]
    fixed = sorted(tuple(sorted(ex.prompt_index[i] for i in g)) for g in ex.groups)
    epochs = [[tuple(sorted(b.batch.index.tolist())) for step in obj.steps(e) for b in step] for e in (1, 2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == fixed and epochs[0] != epochs[1]  # fixed, in a new order

    cfg = RunConfig(regime="sft-dpo", epochs=3, handoff_epoch=1, **base).validate()
    full = Run(cfg, tmp_path / "full").train()
    assert full["stages"]["dpo"]["kto_examples"] == "desirable" and full["stages"]["dpo"]["undesirable"] == 0

    def die(epoch):
        if epoch == 2:
            raise _Interrupt

    part = tmp_path / "part"
    with pytest.raises(_Interrupt):
        Run(cfg, part, on_checkpoint=die).train()
    resumed = Run(cfg, part).train()
    assert resumed["stages"]["dpo"]["reused_from_run_dir"]
    want = [{k: v for k, v in r.items() if k.startswith(("train/", "dev/"))} for r in _stage_epochs(tmp_path / "full")]
    got = [{k: v for k, v in r.items() if k.startswith(("train/", "dev/"))} for r in _stage_epochs(part)]
    assert got == [{k: pytest.approx(v, abs=1e-6) for k, v in w.items()} for w in want]


# -- configuration ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,needle", [
    (dict(loss_type="sigmoid,nope"), "--loss-type"),
    (dict(loss_type="sigmoid,sft", loss_weights=(1.0,)), "--loss-weights has 1 weights for 2"),
    (dict(loss_type="exo_pair"), "--label-smoothing > 0"),
    (dict(label_smoothing=0.1), "--label-smoothing applies"),
    (dict(f_divergence_type="js_divergence", loss_type="bco_pair"), "--f-divergence-type"),
    (dict(use_weighting=True, loss_type="aot"), "--use-weighting"),
    (dict(ld_alpha=0.5), "--ld-alpha has no effect on a classification task"),
    (dict(task="sonnet", ld_alpha=1.5), "--ld-alpha must be in [0, 1]"),
    (dict(objective="simpo", loss_type="hinge"), "--loss-type applies to --objective dpo and cpo"),
    (dict(objective="orpo", logp_reduction="sum"), "--logp-reduction applies"),
    (dict(objective="dpo", simpo_gamma=1.0), "--simpo-gamma applies to --objective simpo"),
    (dict(objective="cpo", desirable_weight=2.0), "--desirable-weight applies to --objective kto"),
    (dict(objective="kto", batch_size=1), "--batch-size must be >= 2"),
    (dict(objective="kto", loss_type="ipo"), "--loss-type applies"),
    (dict(objective="nope"), "--objective 'nope'"),
])
def test_objective_settings_are_checked_in_one_line(kw, needle):
    """Each setting only where its objective (and loss type) reads it, in one line naming the flag."""
    base = dict(regime="dpo", task="paraphrase")
    if kw.get("task") == "sonnet":
        base.update(SONNETS)
    with pytest.raises(SftdpoError, match=None) as e:
        RunConfig(**{**base, **kw}).validate()
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_new_settings_stay_out_of_existing_runs_identity():
    """A run that leaves the objective settings at their defaults has the identity (hash, study
    de-duplication, prefixes) it had before they existed; a setting its objective never reads does not
    change its hash; a setting it reads does. Catches new fields that re-hash every existing run."""
    cfg = RunConfig(regime="dpo", task="sonnet")
    assert not set(OBJECTIVE_FIELDS) & set(cfg.identity())
    kto = RunConfig(regime="dpo", task="sonnet", objective="kto")
    assert kto.hash() != cfg.hash() and kto.identity()["objective"] == "kto"
    assert RunConfig(regime="dpo", task="sonnet", objective="kto", desirable_weight=2.0).hash() != kto.hash()
    assert RunConfig(regime="sft", objective="kto").hash() == RunConfig(regime="sft").hash()  # SFT never reads it
    assert RunConfig(regime="dpo", loss_type="sigmoid, sft").loss_type == "sigmoid,sft"


def test_preference_stage_builder_dispatches_on_the_objective(data, tmp_path, model_tok):
    """The loop's preference stage is the objective --objective names, and what it records of itself
    (summary.json's `stages`) is what it ran with: its name, the run's beta, for ORPO its mean log-probs,
    for CPO and SimPO the loss type, NLL weight, γ (SimPO only), smoothing and log-prob unit. Catches a
    stage record with a misspelt key, the default beta, or SimPO's γ recorded for CPO or dropped."""
    _, tok = model_tok
    model, _ = load_model("tiny-gpt2", seed=0)
    for objective, cls in (("dpo", DPOObjective), ("simpo", CPOObjective), ("cpo", CPOObjective),
                           ("orpo", ORPOObjective), ("kto", KTOObjective)):
        cfg, task = make_tiny_task(data, "paraphrase", "tiny-gpt2", tok, regime="dpo", objective=objective, beta=0.37)
        obj = build_preference_objective(StageContext(cfg.validate(), task, model, CPU, "fp32", tmp_path / objective))
        info = obj.describe()
        assert type(obj) is cls and info["objective"] == objective and info["beta"] == 0.37
        if objective == "orpo":
            assert info["logp_reduction"] == "mean"
        if objective in ("cpo", "simpo"):  # CPO's settings as the stage ran them (SimPO: no NLL term, its γ)
            simpo = objective == "simpo"
            assert info["loss_type"] == ("simpo" if simpo else cfg.loss_type) and info["cpo_alpha"] == (0.0 if simpo else 1.0)
            assert info["simpo_gamma"] == (cfg.simpo_gamma if simpo else None)
            assert info["label_smoothing"] == cfg.label_smoothing and info["logp_reduction"] == ("mean" if simpo else "sum")


def test_kto_takes_trls_unpaired_rows_from_a_file(data, tmp_path, model_tok):
    """--pairs file:PATH with TRL's unpaired rows (prompt, completion, label): each row one KTO example
    with its label; `desirable` keeps the desirable rows; a file of pairs is split as TRL's
    unpair_preference_dataset (chosen desirable, rejected undesirable). Catches labels dropped or
    inverted, rows lost, a pair file read as if every row were desirable."""
    _, tok = model_tok
    model, _ = load_model("tiny-gpt2", seed=0)
    rows = [{"prompt": f"Line {i} of a poem", "completion": f" and its end {i}", "label": i % 3 != 0} for i in range(7)]
    unpaired = tmp_path / "unpaired.jsonl"
    unpaired.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"prompt": r["prompt"], "chosen": r["completion"], "rejected": " nothing"})
                               for r in rows) + "\n")
    for source, kind, want in ((unpaired, "auto", [r["label"] for r in rows]), (unpaired, "desirable", [True] * 4),
                               (pairs, "unpaired", [True] * 7 + [False] * 7)):
        cfg, task = make_tiny_task(data, "sonnet", "tiny-gpt2", tok, regime="dpo", objective="kto", pairs=f"file:{source}",
                                   kto_examples=kind, batch_size=3)
        obj = build_preference_objective(StageContext(cfg.validate(), task, model, CPU, "fp32", tmp_path / f"{kind}-run"))
        ex = obj.ex
        assert sorted(ex.label) == sorted(want)
        texts = sorted((tok.decode(p), tok.decode(c), lab) for p, c, lab in zip(ex.ps.prompt, ex.ps.chosen, ex.label))
        if source == unpaired:
            expected = [(r["prompt"], r["completion"] + tok.eos_token, r["label"]) for r in rows if kind != "desirable" or r["label"]]
            assert texts == sorted(expected)
        assert obj.describe()["desirable"] == sum(want) and obj.describe()["undesirable"] == len(want) - sum(want)


def test_kto_examples_file_reads_back_whole_or_damaged(tmp_path):
    """<run>/dpo/examples.jsonl (KTO's unpaired examples) reads back through read_pairs: whole, every row;
    cut short at a line's end (a crash, a full disk), DamagedFile naming the count, so the run restarts
    rather than train on fewer examples than its reference log-probs hold. Catches KTO rows refused as
    "not a pair" (every KTO resume would restart) and a cut-short file trusted."""
    from sftdpo.files import DamagedFile
    from sftdpo.objectives.dpo.pairs import read_pairs, write_pairs

    rows = [{"prompt": f"q{i}", "completion": " yes" if i % 2 else " no", "label": bool(i % 2), "group": i // 2}
            for i in range(4)]
    path = tmp_path / "examples.jsonl"
    write_pairs(path, {"task": "paraphrase", "examples": len(rows), "data_hash": "h"}, rows)
    header, back = read_pairs(path, "the run starts again")
    assert back == rows and header["examples"] == 4
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # the last row lost
    with pytest.raises(DamagedFile, match="3 rows where its header counts 4 examples"):
        read_pairs(path, "the run starts again")
