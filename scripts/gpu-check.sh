#!/usr/bin/env bash
# The GPU check, ready for the day a GPU is lent (issue 15): in one go, on one GPU, in about ten
# minutes (not yet timed on a GPU),
#   1. `sftdpo bench` on GPT-2 small (random init when the hub is out of reach), with the
#      `--compile` step against the eager one (compile/* lines);
#   2. a slice of the paper grid (paraphrase, seed 0, all of train cut to 1,000 train/dev pairs,
#      2 epochs with the hand-off at 1: 12 runs) with --jobs 1, 2 and 4 (on a GPU --gpus-per-run 1/J),
#      results compared with --jobs 1;
#   3. the report of both in OUT (default docs/bench-gpu.md), with the machine it ran on.
# On the CPU path (`--device cpu --model tiny-gpt2 --small`) it runs end to end in a couple of
# minutes: tests/test_gpu_check.py does that.
#
# usage: scripts/gpu-check.sh [--device cuda] [--model gpt2] [--out docs/bench-gpu.md] [--small]
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda MODEL=gpt2 OUT=docs/bench-gpu.md SMALL=0
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --small) SMALL=1; shift ;;
    *) echo "gpu-check: unknown argument $1 (use --device, --model, --out, --small)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-.venv/bin/python}
SFTDPO=("$PY" -m sftdpo.cli)
if [ "$DEVICE" != cpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu-check: no CUDA GPU here; run it with --device cpu for the CPU path" >&2
  exit 2
fi
WORK=$(mktemp -d -t sftdpo-gpu-check-XXXXXX)
trap 'rm -rf "$WORK"' EXIT

if [ "$SMALL" = 1 ]; then
  BENCH=(--steps 1 --only sft/paraphrase --only compile/sft-paraphrase)
  JOBS=(1 2)
  CUT=(--set max_train_examples=16 --set max_dev_examples=16 --only param=fft)
else
  BENCH=(--steps 12)
  JOBS=(1 2 4)
  CUT=(--set max_train_examples=1000 --set max_dev_examples=1000)
fi

start=$(date +%s)
echo "== bench ($MODEL on $DEVICE)"
"${SFTDPO[@]}" bench --model "$MODEL" --device "$DEVICE" --compile "${BENCH[@]}" --out "$WORK/bench.json"

for j in "${JOBS[@]}"; do
  echo "== paper slice, --jobs $j"
  share=()
  if [ "$DEVICE" != cpu ]; then share=(--gpus-per-run "$("$PY" -c "print(1 / $j)")"); fi
  t0=$("$PY" -c "import time; print(time.time())")
  "${SFTDPO[@]}" study run paper --model "$MODEL" --out "$WORK/jobs$j" --no-report --jobs "$j" "${share[@]}" \
    --only task=paraphrase --only seed=0 --only data_fraction=1.0 --set epochs=2 --set handoff_epoch=1 \
    --set device="$DEVICE" "${CUT[@]}"
  "$PY" -c "import time; print(time.time() - $t0)" > "$WORK/jobs$j.wall"
done

"$PY" - "$WORK" "$OUT" "$DEVICE" "$MODEL" "$(( $(date +%s) - start ))" "${JOBS[@]}" <<'EOF'
"""Write the check's report: the bench table and the --jobs table, with the machine."""
import json
import sys
import time
from pathlib import Path

from sftdpo.store import Store

work, out, device, model, total, jobs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:]
bench = json.loads((work / "bench.json").read_text())
machine = ", ".join(f"{k}={v}" for k, v in bench["machine"].items())


def results(d: Path) -> dict:
    with Store(d / "study.db") as st:
        return {r["name"]: {k: v for k, v in (r["summary"] or {}).items() if k.startswith("dev/")} for r in st.runs()}


base = results(work / "jobs1")
rows = []
for j in jobs:
    wall = float((work / f"jobs{j}.wall").read_text())
    res = results(work / f"jobs{j}")
    done = sum(1 for v in res.values() if v)
    if j == "1":
        wall1 = wall
    rows.append(f"| {j} | {done}/{len(res)} | {wall:.0f} | {done * 3600 / wall:.0f} | {wall1 / wall:.2f}x | "
                f"{'yes' if res == base else 'NO'} |")
text = [f"# GPU check: `scripts/gpu-check.sh --device {device} --model {model}`", "",
        f"Run {time.strftime('%Y-%m-%d %H:%M %Z')} in {int(total) // 60} min {int(total) % 60} s. Machine: {machine}.", "",
        "## sftdpo bench", "", (work / "bench.md").read_text().strip(), "",
        "## A slice of the paper grid, several runs at once", "",
        "Paraphrase, seed 0, train and dev cut by the script, 2 epochs (hand-off at 1); `--jobs J`"
        + (" with `--gpus-per-run 1/J`" if device != "cpu" else "") + "; results compared with `--jobs 1` (dev metrics).", "",
        "| jobs | runs done | wall s | runs/hour | vs --jobs 1 | same results |", "| ---: | ---: | ---: | ---: | ---: | --- |",
        *rows, ""]
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(text))
print(f"wrote {out}")
EOF
