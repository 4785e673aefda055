"""The full TRL-equivalence matrix of issue 23 §1: every case of tests/test_trl_runs.py's MATRIX (SFT
FFT/LoRA on the paraphrase cloze and on `generate`, DPO-only FFT/LoRA, SFT@1->DPO FFT/LoRA, gradient
accumulation 1 and 2) trained by sftdpo and by TRL, compared step by step. Prints a Markdown table of
the largest difference per compared quantity and case (loss and grad_norm relative, lr absolute,
logps/rewards for DPO at accumulation 1, final weights relative to the update's norm), the steps on
which clipping acted and each side's seconds; exits 1 when a case exceeds its bounds or fails.

    PYTHONPATH=src python scripts/trl_matrix.py [--only TEXT ...] [--small]

`make test` runs the small set (tests/test_trl_runs.py); this runs all 24 cases (~1 minute each on
a 2-core CPU, most of it TRL's LM head scoring every position over the whole vocabulary).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

COLUMNS = ("steps", "clipped", "loss", "grad_norm", "lr", "logps", "rewards", "weights")


def fmt(v) -> str:
    if v is None:
        return "-"
    return str(v) if isinstance(v, int) else f"{v:.1e}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=[], help="run the cases whose name contains one of these")
    ap.add_argument("--small", action="store_true", help="the small set of `make test` instead of the matrix")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="trl-matrix-") as tmp:
        os.environ.setdefault("SFTDPO_CACHE_DIR", str(Path(tmp) / "cache"))  # before sftdpo is imported
        logging.getLogger("sftdpo").setLevel(logging.WARNING)
        import test_trl_runs as t

        data = t.write_data(Path(tmp) / "data")
        cases = list(t.SMALL.values()) if args.small else t.MATRIX
        cases = [c for c in cases if not args.only or any(o in c.name for o in args.only)]
        print("| case | " + " | ".join(COLUMNS) + " | norms | sftdpo s | TRL s | |")
        print("|" + "---|" * (len(COLUMNS) + 5))
        failed, start = [], time.perf_counter()
        for i, case in enumerate(cases):
            try:
                d = t.run_case(case, data, Path(tmp) / f"case{i}")
                try:
                    t.assert_within_bounds(d)
                    verdict = "ok"
                except AssertionError as e:
                    verdict = f"OUT OF BOUNDS ({str(e).splitlines()[0][:60]})"
                    failed.append(case.name)
                print(f"| {case.name} | " + " | ".join(fmt(d.get(k)) for k in COLUMNS)
                      + f" | {d['norm_min']:.3g}-{d['norm_max']:.3g} (clip {case.clip:g}) | {d['sftdpo_s']:.0f} | "
                        f"{d['trl_s']:.0f} | {verdict} |", flush=True)
            except Exception as e:  # noqa: BLE001 - one failing case is reported, the others still run
                failed.append(case.name)
                print(f"| {case.name} | FAILED: {type(e).__name__}: {str(e)[:200]} |", flush=True)
        total = time.perf_counter() - start
    print(f"\nbounds: loss, grad_norm, logps, rewards <= {t.REL_STEP:g} (relative); lr <= {t.ABS_LR:g}; "
          f"weights <= {t.REL_UPDATE:g} x the update's norm")
    print(f"{len(cases)} cases in {total / 60:.1f} min; {len(failed)} failed" + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
