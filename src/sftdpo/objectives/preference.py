"""The preference stage's objective (`--objective`, the stage the regimes call `dpo`):

  dpo    DPO against the reference (objectives/dpo/: TRL's DPOTrainer, every loss type)
  simpo  SimPO, reference-free (objectives/cpo.py: TRL's CPOTrainer, loss type simpo)
  cpo    CPO, reference-free (objectives/cpo.py)
  orpo   ORPO, reference-free (objectives/orpo.py: TRL's ORPOTrainer)
  kto    KTO on unpaired examples, against the reference (objectives/kto.py: TRL's KTOTrainer)

The pair objectives share the pairs (objectives/dpo/pairs.py) and the run directory's saved inputs; a
reference-free objective never builds or caches a reference.
"""

from __future__ import annotations

from . import Objective, StageContext
from .cpo import CPOObjective
from .dpo import build_dpo_objective, build_pair_stage
from .kto import build_kto_objective
from .orpo import ORPOObjective


def build_preference_objective(ctx: StageContext) -> Objective:
    """The preference stage's objective for the run's --objective, built from the model at the hand-off."""
    cfg, task = ctx.cfg, ctx.task
    if cfg.objective == "dpo":
        return build_dpo_objective(ctx)
    if cfg.objective == "kto":
        return build_kto_objective(ctx)
    make = {"simpo": CPOObjective, "cpo": CPOObjective, "orpo": ORPOObjective}[cfg.objective]
    return build_pair_stage(ctx, lambda ps, rc, rr, info: make(cfg, task, ps, info), reference=False)
