"""scripts/gpu-check.sh, the GPU check kept ready for a lent GPU, run end to end on its CPU path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import require_tiny_gpt2

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_runs_end_to_end_on_the_cpu_path(cache, tmp_path):
    require_tiny_gpt2()
    out = tmp_path / "bench-gpu.md"
    cp = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--device", "cpu", "--model", "tiny-gpt2",
                         "--small", "--out", str(out)], env={**os.environ, "PYTHON": sys.executable},
                        capture_output=True, text=True, timeout=900)
    assert cp.returncode == 0, cp.stderr[-3000:]
    text = out.read_text()
    assert "## sftdpo bench" in text and "`compile/sft-paraphrase`" in text and "`sft/paraphrase`" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 2 |")]
    assert len(rows) == 2 and all(r.endswith("| yes |") and "3/3" in r for r in rows), rows
