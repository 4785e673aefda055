"""One optimizer step (train/step.py): the optimizer's weight-decay groups and the logged gradient norm."""

import copy
import json

import pytest
import torch

from sftdpo.config import RunConfig
from sftdpo.models import apply_lora
from sftdpo.objectives.sft import SFTObjective
from sftdpo.train.step import make_optimizer, make_scheduler, train_step

from conftest import make_tiny_task


@pytest.mark.parametrize("param", ["fft", "lora"])
def test_weight_decay_groups_are_transformers_trainers(tiny, param):
    """Weight decay on the parameters transformers' Trainer decays (Trainer.get_decay_parameter_names: not
    biases, not LayerNorm/RMSNorm weights), none on the rest, for both backbones, plain and with LoRA.
    Catches decay on every parameter (torch's AdamW default), or on none."""
    from transformers import Trainer

    name, model, _ = tiny
    if param == "lora":
        model = apply_lora(model, RunConfig(model=name, param="lora", lora_targets="all-linear"))
    opt = make_optimizer(model, 1e-3, 0.1)
    ids = {id(p): n for n, p in model.named_parameters()}
    decayed = {ids[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    plain = {ids[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    want = set(Trainer.get_decay_parameter_names(None, model)) & trainable  # the method does not use self
    assert decayed == want and plain == trainable - want and decayed
    assert plain if param == "fft" else not plain  # LoRA trains only adapter matrices, all decayed
    assert all(g["betas"] == (0.9, 0.999) and g["eps"] == 1e-8 for g in opt.param_groups)


def test_grad_norm_is_the_norm_before_clipping(tiny, tiny_data):
    """`grad_norm` (TRL's name) is the norm of the whole step's gradient before clipping, and the
    update is the clipped gradient: with SGD at lr 1 the weights move by exactly -clip/norm x gradient.
    Catches the norm read after clipping (it would equal the clip value), clipping skipped, and a norm
    over one micro-batch only."""
    name, model, tok = tiny
    cfg, task = make_tiny_task(tiny_data, "paraphrase", name, tok, grad_accum=2, batch_size=2, max_train_examples=4)
    obj = SFTObjective(task)
    window = next(iter(obj.steps(1)))
    assert len(window) == 2
    ref = copy.deepcopy(model)
    loss = sum(obj.loss(ref, b.to(torch.device("cpu")))[0] * b.share for b in window)
    grads = torch.autograd.grad(loss, [p for p in ref.parameters()], allow_unused=True)
    norm = torch.cat([g.flatten() for g in grads if g is not None]).norm()
    for clip in (0.0, float(norm) / 10):
        m = copy.deepcopy(model)
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=1.0)
        st = train_step(m, obj, window, opt, make_scheduler(opt, 4, 0.0, "constant"), params, device=torch.device("cpu"),
                        precision="fp32", max_grad_norm=clip)
        assert float(st.grad_norm) == pytest.approx(float(norm), rel=1e-5)
        scale = 1.0 if clip == 0 else clip / float(norm)
        moved = torch.cat([(q.detach() - p.detach()).flatten() for p, q in zip(model.parameters(), m.parameters())])
        want = -scale * torch.cat([(g if g is not None else torch.zeros_like(p)).flatten()
                                   for g, p in zip(grads, model.parameters())])
        assert (moved - want).norm() <= 1e-5 * want.norm()


class _Batch:
    def __init__(self, x: float, share: float, reports: bool):
        self.x, self.share, self.reports = x, share, reports

    def to(self, device):
        return self


class _Objective:
    """Logs `always` from every micro-batch and `sometimes` only from some (as KTO's rewards/rejected
    comes only from micro-batches with undesirable examples)."""

    train_mode = True

    def __init__(self, steps):
        self._steps = steps

    def n_steps(self):
        return len(self._steps)

    def steps(self, epoch):
        return iter(self._steps)

    def loss(self, model, b):
        logs = {"always": torch.tensor(b.x)}
        if b.reports:
            logs["sometimes"] = torch.tensor(10.0 * b.x)
        return (model.w * b.x).sum(), logs

    def n_tokens(self, b):
        return 1


def test_a_metric_some_micro_batches_lack_is_their_mean_not_diluted(tmp_path):
    """The epoch's (and each logged step's) value of a metric is its share-weighted mean over the
    micro-batches that reported it. Catches a metric absent from some micro-batches averaged with zeros
    (KTO's rewards/rejected over micro-batches without undesirable examples: pulled toward 0) and a metric
    every micro-batch reports changed by the weighting."""
    from types import SimpleNamespace

    from sftdpo.train.checkpoint import MetricsLog
    from sftdpo.train.loop import Run

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    steps = [[_Batch(1.0, 0.5, True), _Batch(2.0, 0.5, False)], [_Batch(3.0, 1.0, True)]]
    run = SimpleNamespace(cfg=SimpleNamespace(max_grad_norm=0.0, log_every=1), model=model, device=torch.device("cpu"),
                          precision="fp32", hooks=None, is_main=True, own=lambda v: v)
    mlog = MetricsLog(tmp_path / "metrics.jsonl")
    trained = Run.train_epoch(run, _Objective(steps), "kto", 1, opt, make_scheduler(opt, 2, 0.0, "constant"), mlog)
    assert trained.logs["always"] == pytest.approx((0.5 * 1 + 0.5 * 2 + 3) / 2)
    assert trained.logs["sometimes"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 1.5)  # not (5 + 30) / 2
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["sometimes"] for x in lines] == pytest.approx([10.0, 30.0]) and [x["always"] for x in lines] == [1.5, 3.0]


class _Recorder:
    """An objective whose micro-batch losses are fixed numbers, recording the autocast state of each forward."""

    def __init__(self, values: dict[int, float]) -> None:
        self.values, self.seen = values, []

    def loss(self, model, batch):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        v = self.values[int(batch.index[0])]
        return model.w.sum() * 0 + v, {"m": torch.tensor(2 * v)}

    def n_tokens(self, batch) -> int:
        return batch.n_tokens


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_step_logs_the_share_weighted_loss_and_runs_in_the_run_precision(precision):
    """The step's logged loss and metrics are its micro-batches' values weighted by their shares of the
    step (0.25 and 0.75 here), its tokens their sum, and each forward runs under autocast exactly when
    the run is bf16 (torch's own autocast state, read inside the forward). Catches a loss divided by the
    share, the last micro-batch's loss logged as the step's, and the forward left in fp32 (or cast to
    bf16 in an fp32 run)."""
    from sftdpo.ops.batching import pad_batch

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.ones(1))
    first, second = pad_batch([[1, 2]], 0, [0]), pad_batch([[3, 4, 5]], 0, [1])
    first.share, second.share = 0.25, 0.75
    rec = _Recorder({0: 2.0, 1: 4.0})
    opt = torch.optim.SGD([model.w], lr=0.1)
    st = train_step(model, rec, [first, second], opt, make_scheduler(opt, 2, 0.0, "constant"), [model.w],
                    device=torch.device("cpu"), precision=precision, max_grad_norm=0.0)
    assert float(st.loss) == pytest.approx(0.25 * 2.0 + 0.75 * 4.0)
    assert float(st.logs["m"]) == pytest.approx(0.25 * 4.0 + 0.75 * 8.0) and st.log_shares == {"m": 1.0}
    assert st.tokens == 5
    assert [enabled for enabled, _ in rec.seen] == [precision == "bf16"] * 2
    if precision == "bf16":
        assert all(dtype == torch.bfloat16 for _, dtype in rec.seen)


def test_method_hooks_get_peft_s_step_count_and_the_gradients():
    """What --param's hooks see (peft_methods.MethodHooks): after_update gets the stage's steps before
    this one, 0 at the first, as PEFT's AdaLoRA loop passes update_and_allocate its global_step, while
    the gradients are still there (PEFT reads them); the step's tokens include the virtual tokens
    extra_tokens adds per row. Catches the step count off by one or two (AdaLoRA's budget schedule
    shifts), the gradients cleared first, and the virtual tokens dropped from the count."""
    from sftdpo.ops.batching import pad_batch

    class Hooks:
        def __init__(self) -> None:
            self.steps, self.had_grad, self.rows = [], [], []

        def before_update(self) -> None:
            pass

        def after_update(self, step: int) -> None:
            self.steps.append(step)
            self.had_grad.append(model.w.grad is not None)

        def extra_tokens(self, rows: int) -> int:
            self.rows.append(rows)
            return 10 * rows

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.ones(1))
    hooks, opt = Hooks(), torch.optim.SGD([model.w], lr=0.1)
    sched = make_scheduler(opt, 2, 0.0, "constant")
    for _ in range(2):
        first, second = pad_batch([[1, 2]], 0, [0]), pad_batch([[3, 4, 5], [6]], 0, [1, 2])
        st = train_step(model, _Recorder({0: 1.0, 1: 3.0}), [first, second], opt, sched, [model.w],
                        device=torch.device("cpu"), precision="fp32", max_grad_norm=0.0, hooks=hooks)
        assert st.tokens == 2 + 4 + 10 * 3
    assert hooks.steps == [0, 1] and hooks.had_grad == [True, True] and hooks.rows == [1, 2, 1, 2]
    assert model.w.grad is None  # cleared after the hooks, for the next step
