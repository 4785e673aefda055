"""`study run --dry-run`'s claims lines: each claim's detectable effect from the study's design (its
dev sizes and paired seeds) before anything is trained (report/claims.py has the claims and the
arithmetic; this module only knows where the dev sizes come from)."""

from __future__ import annotations

from ..config import RunConfig
from ..report.claims import parse_claims, plan_lines
from .cost import _DEV_SIZE, data_sizes
from .rates import Rates


def print_claims_plan(spec: dict, configs: list[RunConfig], rates: dict[str, Rates | None]) -> None:
    """Print the detectable effect of each claim the spec declares (nothing when it declares none)."""
    claims = parse_claims(spec.get("claims"), f"study spec {spec.get('name')}")
    if claims is None:
        return
    sizes = data_sizes(configs, rates)  # measured by the probe, counted from the data, or the CS224N split's
    dev = [min(c.max_dev_examples or 10**9, n[1] if n else _DEV_SIZE.get(c.task, 1_000)) for c, n in zip(configs, sizes)]
    for line in plan_lines(claims, configs, dev):
        print(line)
