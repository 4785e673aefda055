"""Chaos check: a study killed at random moments, resumed each time, must end exactly where an
uninterrupted study ends.

A small study (both tasks, FFT and LoRA, SFT-only and staged SFT@1->DPO runs; tiny-llama, fp32, one
thread: deterministic) runs once uninterrupted (the reference). Then the same study runs again and is
killed, SIGKILL or SIGTERM drawn at random (seeded), at a moment drawn uniformly over the reference's
wall time (start-ups dominate so small a study: the driver's, each run process's, the index and the
report) or, one kill in two, 0-0.3 s after a run of that start began writing training records (its
steps, an epoch's end, a checkpoint, the DPO stage's inputs). After each kill the script checks that no
process of the study is left, and starts `study run` again (a resume). A study that completes starts
over in a fresh directory (a new round), until N kills. Every round's final results are compared with
the reference, run by run: dev metrics and outputs, every per-epoch record (timings aside) and the
final weights. Differences must be 0; processes left behind must be 0.

    python scripts/chaos.py [--kills 20] [--seed 0] [--out chaos-work]      (make chaos)

Not in CI (minutes to an hour on a laptop CPU). It tests this checkout's src/ (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # this checkout's sftdpo, as the study it runs

from sftdpo.system import descendants, still_running  # noqa: E402

FIX = ROOT / "tests" / "fixtures" / "data"


def write_data(folder: Path) -> dict[str, dict[str, str]]:
    """A learnable QQP set (CS224N GPT layout) and twelve sonnets, written for this check."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    topics = ["juggle", "bake bread", "learn Rust", "fix a bike", "grow tomatoes", "paint a wall", "swim faster",
              "write poems", "sleep better", "save money", "train a dog", "play chess"]

    def qqp(name: str, n: int, offset: int) -> str:
        rows = ["id\tsentence1\tsentence2\tis_duplicate"]
        for i in range(offset, offset + n):
            a = rng.choice(topics)
            if i % 2 == 0:
                rows.append(f"{i}\tHow do I {a}?\tWhat is the best way to {a} (#{i})?\t1.0")
            else:
                b = rng.choice([t for t in topics if t != a])
                rows.append(f"{i}\tHow do I {a}?\tWhy do people {b} (#{i})?\t0.0")
        (folder / name).write_text("\n".join(rows) + "\n")
        return str(folder / name)

    lines = [ln.strip() for ln in (FIX / "sonnets" / "sonnets.txt").read_text().splitlines()
             if ln.strip() and not ln.strip().isdigit()][3:]
    chunks = [f"{i + 1}\n\n" + "\n".join(lines[(i + j) % len(lines)] for j in range(5 + (i * 7) % 6)) for i in range(12)]
    (folder / "sonnets.txt").write_text("Header\n\n" + "\n\n".join(chunks[:9]) + "\n")
    (folder / "dev.txt").write_text("Header\n\n" + "\n\n".join(chunks[9:]) + "\n")
    return {"paraphrase": {"train": qqp("train.csv", 24, 0), "dev": qqp("dev.csv", 8, 1000)},
            "sonnet": {"train": str(folder / "sonnets.txt"), "dev": str(folder / "dev.txt")}}


def write_spec(path: Path, data: dict) -> Path:
    import yaml

    spec = {"name": "chaos",
            "defaults": {"model": "tiny-llama", "device": "cpu", "precision": "fp32", "epochs": 2, "batch_size": 4,
                         "eval_batch_size": 8, "lr": 3e-3, "dpo_lr": 1e-3, "lora_rank": 4, "max_new_tokens": 8,
                         "max_dev_examples": 4, "log_every": 1},
            "grid": {"task": [{"task": t, **files} for t, files in data.items()], "param": ["fft", "lora"],
                     "regime": [{"regime": "sft"}, {"regime": "sft-dpo", "handoff_epoch": 1}]}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def environment(cache: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", SFTDPO_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return env


def start(spec: Path, out: Path, env: dict[str, str], log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sftdpo.cli", "-q", "study", "run", str(spec), "--out", str(out)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out.parent)


def results(run_dir: Path) -> dict:
    """What must not depend on interruptions: dev metrics and outputs, per-epoch records without
    timings, the final weights (as bytes of each tensor)."""
    from safetensors.torch import load_file

    summary = json.loads((run_dir / "summary.json").read_text())
    epochs = [{k: v for k, v in r.items() if not k.endswith("_s")}
              for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "epoch"]
    weights = load_file(str(run_dir / "checkpoints" / "last" / "weights.safetensors"))
    return {"metrics": {k: v for k, v in summary.items() if k.startswith(("dev/", "best/", "init/")) or k == "best_epoch"},
            "epochs": epochs, "outputs": (run_dir / "dev_outputs.jsonl").read_text(),
            "weights": {k: t.numpy().tobytes() for k, t in weights.items()}}


def compare(out: Path, ref: Path) -> list[str]:
    """One line per run whose results differ from the reference's (or that did not finish)."""
    diffs = []
    for run in sorted((ref / "runs").iterdir()):
        mine = out / "runs" / run.name
        if not (mine / "summary.json").exists():
            diffs.append(f"{run.name}: not finished")
            continue
        a, b = results(mine), results(run)
        for part in a:
            if a[part] != b[part]:
                diffs.append(f"{run.name}: {part} differ")
    return diffs


# what a run process last logged -> the phase a kill then interrupts
PHASES = (("DPO pairs: generated", "DPO reference log-probs"), ("DPO pairs: reusing", "DPO reference log-probs"),
          ("DPO reference log-probs", "DPO training"), ("reusing the SFT prefix", "resume from a shared prefix"),
          ("resuming", "training after a resume"), ("evaluated", "an epoch's end: records, checkpoint"),
          ("epoch 0 (before training)", "training"), ("epoch ", "checkpoint, next epoch, or the run's end"),
          ("read ", "a run's set-up (data, model)"), ("sonnets from", "a run's set-up (data, model)"))


def phase(out: Path, driver_log: str) -> str:
    """Roughly what the study was doing when it was killed: from the driver's output of this start and
    the last line of the run process's log written last."""
    lines = driver_log.strip().splitlines()
    if "-> " not in driver_log:
        return "the driver's start-up (imports, data, estimates, index)"
    if "study status:" in driver_log:
        return "the end: index and report"
    if not lines[-1].endswith("..."):
        return "between runs (the index, the next run's start)"
    logs = sorted(out.glob("runs/*/train.log"), key=lambda p: p.stat().st_mtime)
    text = logs[-1].read_text(errors="replace").strip().splitlines() if logs else []
    last = text[-1] if text else ""
    if not last or last.startswith(("sftdpo:", "Traceback")) or "done in" in last:
        return "a run process starting (fork, imports, data, model)"
    return next((name for key, name in PHASES if last.startswith(key)), f"other ({last[:40]})")


def training_started(out: Path, since: float) -> bool:
    """Whether a run of this start is training: a metrics.jsonl written since `since` (--log-every 1:
    a line per optimizer step, and per epoch)."""
    return any(p.stat().st_mtime > since for p in out.glob("runs/*/metrics.jsonl"))


def wait_for_training(proc: subprocess.Popen, out: Path, since: float, rng: random.Random) -> float | None:
    """Seconds until a run of this start trains, then a further 0-0.3 s (a kill inside the training steps,
    an epoch's records or a checkpoint write); None when the study ended first."""
    t0 = time.monotonic()
    while proc.poll() is None:
        if training_started(out, since):
            time.sleep(rng.uniform(0, 0.3))
            return time.monotonic() - t0 if proc.poll() is None else None
        time.sleep(0.02)
    return None


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20, help="kills in all (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments and signals")
    p.add_argument("--out", type=Path, default=ROOT / "chaos-work", help="working directory (emptied first)")
    ns = p.parse_args(argv)
    if not sys.platform.startswith("linux"):
        raise SystemExit("chaos: Linux only (/proc, PR_SET_PDEATHSIG)")
    t_start = time.perf_counter()
    rng = random.Random(ns.seed)
    work = ns.out.resolve()
    shutil.rmtree(work, ignore_errors=True)
    spec = write_spec(work / "spec.yaml", write_data(work / "data"))

    print("chaos: the reference study, uninterrupted ...", flush=True)
    with (work / "reference.log").open("w") as log:
        t0 = time.perf_counter()
        ref = subprocess.run([sys.executable, "-m", "sftdpo.cli", "-q", "study", "run", str(spec), "--out",
                              str(work / "reference")], stdout=log, stderr=subprocess.STDOUT,
                             env=environment(work / "cache-reference"), cwd=work)
        ref_wall = time.perf_counter() - t0
    if ref.returncode != 0:
        raise SystemExit(f"chaos: the reference study failed (exit {ref.returncode}); see {work / 'reference.log'}")
    print(f"chaos: reference done in {ref_wall:.0f} s; each kill at a moment drawn uniformly in [0, {ref_wall:.0f}] s "
          "or, one in two, once a run trains (+0-0.3 s)", flush=True)

    kills = {"SIGKILL": 0, "SIGTERM": 0}
    phases: dict[str, int] = {}
    resumes = rounds = 0
    left_behind = 0
    differences: list[str] = []
    while sum(kills.values()) < ns.kills:
        rounds += 1
        out = work / f"round-{rounds}"
        # each round its own cache: tokenizer conversion, pair sampling and reference log-probs are killed too
        env = environment(work / f"cache-round-{rounds}")
        attempt = 0
        log_path = work / f"round-{rounds}.log"
        with log_path.open("w") as log:
            while True:
                attempt += 1
                resumes += attempt > 1
                final = sum(kills.values()) >= ns.kills  # no more kills: run this one to the end
                when = rng.uniform(0, ref_wall)
                sig = rng.choice(["SIGKILL", "SIGTERM"])
                in_training = rng.random() < 0.5  # else a moment drawn over the whole study
                log.flush()
                offset = log_path.stat().st_size
                since = time.time()
                proc = start(spec, out, env, log)
                try:
                    if final:
                        proc.wait()
                    elif in_training:
                        when = wait_for_training(proc, out, since, rng)
                        if when is None:
                            proc.wait()
                        else:
                            raise subprocess.TimeoutExpired(proc.args, when)
                    else:
                        proc.wait(timeout=when)
                except subprocess.TimeoutExpired:
                    tree = descendants(proc.pid)
                    doing = ("a run training (its steps, an epoch's records, a checkpoint)" if in_training
                             else phase(out, log_path.read_text(errors="replace")[offset:]))
                    proc.send_signal(getattr(signal, sig))
                    proc.wait()
                    kills[sig] += 1
                    phases[doing] = phases.get(doing, 0) + 1
                    deadline = time.monotonic() + 30
                    while still_running(tree) and time.monotonic() < deadline:
                        time.sleep(0.2)
                    left = still_running(tree)
                    left_behind += len(left)
                    for pid in left:  # reported above; not left running
                        os.kill(pid, signal.SIGKILL)
                    print(f"  kill {sum(kills.values()):2d}/{ns.kills}: {sig} at {when:5.1f} s (round {rounds}, start "
                          f"{attempt}; exit {proc.returncode}{f'; {len(left)} processes left behind' if left else ''}): "
                          f"{doing}", flush=True)
                    continue
                if proc.returncode not in (0, 3):
                    print(f"  round {rounds}: study run exited {proc.returncode} without a kill", flush=True)
                diffs = compare(out, work / "reference")
                differences += [f"round {rounds}: {d}" for d in diffs]
                print(f"  round {rounds}: complete after {attempt} start(s), {len(diffs)} differences", flush=True)
                break

    wall = time.perf_counter() - t_start
    summary = {"kills": sum(kills.values()), **{f"kills_{k}": v for k, v in kills.items()}, "resumes": resumes,
               "rounds": rounds, "differences": len(differences), "processes_left_behind": left_behind,
               "reference_wall_s": round(ref_wall, 1), "wall_s": round(wall, 1), "cpu": cpu_model(), "seed": ns.seed,
               "phases": phases}
    (work / "chaos.json").write_text(json.dumps({**summary, "difference_list": differences}, indent=2))
    for d in differences:
        print(f"  DIFFERENCE {d}")
    for name, n in sorted(phases.items(), key=lambda kv: -kv[1]):
        print(f"  {n:3d} kill(s) during {name}")
    print(f"chaos: {summary['kills']} kills ({kills['SIGKILL']} SIGKILL, {kills['SIGTERM']} SIGTERM), {resumes} resumes, "
          f"{rounds} rounds, {len(differences)} differences, {left_behind} processes left behind; wall "
          f"{wall / 60:.1f} min (reference study {ref_wall:.0f} s) on {summary['cpu']}", flush=True)
    return 0 if not differences and not left_behind else 1


if __name__ == "__main__":
    sys.exit(main())
