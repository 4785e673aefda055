"""Studies: grid expansion and hashing, skipping finished runs, shared SFT prefixes, failures."""


import json
import re

import pytest
import yaml

from sftdpo.cli import main
from sftdpo.config import SftdpoError
from sftdpo.store import Store
from sftdpo.study import expand, load_spec, run_study
from sftdpo.data import qqp_available

from conftest import qqp_files


def test_grid_expansion_resets_irrelevant_fields_and_hashes_uniquely():
    spec = {"name": "t", "defaults": {"epochs": 4, "model": "tiny-llama"},
            "grid": {"task": ["paraphrase", "sonnet"],
                     "regime": [{"regime": "sft"}, {"regime": "sft-dpo", "handoff_epoch": 1}, {"regime": "sft-dpo", "handoff_epoch": 3}],
                     "param": [{"param": "fft"}, {"param": "lora", "lora_rank": 4}, {"param": "lora", "lora_rank": 8}],
                     "pairs": ["v1", "v3"], "beta": [0.1, 0.2], "seed": [0, 1]},
            "overrides": [{"when": {"param": "lora"}, "set": {"lr": 1e-3}}],
            "exclude": [{"task": "sonnet", "param": "lora"}]}
    runs = expand(spec)
    hashes = [c.hash() for _, c in runs]
    assert len(set(hashes)) == len(hashes)
    sft_para = [c for _, c in runs if c.task == "paraphrase" and c.regime == "sft"]
    assert len(sft_para) == 3 * 2  # pairs and beta do not multiply SFT-only runs
    para_dpo = [c for _, c in runs if c.task == "paraphrase" and c.regime == "sft-dpo"]
    assert len(para_dpo) == 2 * 3 * 2 * 2  # pairs is a sonnet-only axis
    son = [c for _, c in runs if c.task == "sonnet"]
    assert all(c.param == "fft" for c in son) and len(son) == 2 + 2 * 2 * 2 * 2
    assert all(c.lr == 1e-3 for _, c in runs if c.param == "lora")
    assert expand(spec) == runs  # deterministic order
    assert [c.hash() for _, c in expand(spec, {"seed": 5})] != hashes


def test_fields_a_run_never_reads_do_not_split_it():
    spec = {"name": "t", "defaults": {"epochs": 2, "model": "tiny-llama", "balance_labels": True},
            "grid": {"task": ["paraphrase", "sonnet"], "regime": ["sft", "dpo"], "lr": [1e-5, 1e-4]}}
    runs = expand(spec)
    # DPO-only runs have no SFT stage (lr unused); sonnets have no labels to balance
    assert len([c for _, c in runs if c.regime == "dpo"]) == 2 and len(runs) == 2 + 2 * 2
    assert all(c.balance_labels == (c.task == "paraphrase") for _, c in runs)


def test_shipped_specs_expand():
    quick = expand(load_spec("quick"))
    assert {c.task for _, c in quick} == {"paraphrase", "sonnet"}
    assert {c.regime for _, c in quick} == {"sft", "dpo", "sft-dpo"} and {c.param for _, c in quick} == {"fft", "lora"}
    paper = expand(load_spec("paper"))
    assert {c.handoff_epoch for _, c in paper if c.regime == "sft-dpo"} == {3, 9}
    assert {c.lora_rank for _, c in paper if c.param == "lora"} == {4, 8, 16}
    assert {c.data_fraction for _, c in paper} == {0.01, 0.1, 1.0} and {c.seed for _, c in paper} == {0, 1, 2}
    assert all(c.model == "gpt2" and c.epochs == 15 for _, c in paper)
    # the README's small-size check: a 2-epoch budget collapses SFT@3 and SFT@9 into SFT@1
    small = expand(load_spec("paper"), {"model": "tiny-gpt2", "epochs": 2, "handoff_epoch": 1})
    assert {c.handoff_epoch for _, c in small if c.regime == "sft-dpo"} == {1} and len(small) < len(paper)
    with pytest.raises(SftdpoError, match="--set epochs=2 --set handoff_epoch=1"):
        expand(load_spec("paper"), {"epochs": 2})


def test_dpo_sweep_specs_cross_beta_lr_and_handoff():
    sweep = [c for _, c in expand(load_spec("dpo-sweep"))]
    dpo = [c for c in sweep if c.regime != "sft"]
    k = lambda c: 0 if c.regime == "dpo" else c.handoff_epoch  # noqa: E731
    assert {k(c) for c in dpo} == {0, 1, 3, 6, 9, 12} and {c.beta for c in dpo} == {0.01, 0.05, 0.1, 0.2, 0.5, 1.0}
    for task, param, paper_lr in (("paraphrase", "fft", 2e-6), ("paraphrase", "lora", 5e-5), ("sonnet", "fft", 1e-6),
                                  ("sonnet", "lora", 3e-5)):
        cell = [c for c in dpo if c.task == task and c.param == param]
        assert sorted({c.dpo_lr for c in cell}) == pytest.approx([paper_lr / 2, paper_lr, paper_lr * 2.5])
        # the full cross: 6 hand-offs x 6 betas x 3 learning rates x 3 seeds, plus 3 SFT-only runs
        assert len(cell) == 6 * 6 * 3 * 3
        assert len([c for c in sweep if c.task == task and c.param == param and c.regime == "sft"]) == 3
    assert {c.lora_rank for c in sweep if c.param == "lora"} == {8} and {c.seed for c in sweep} == {0, 1, 2}
    quick = [c for _, c in expand(load_spec("dpo-sweep-quick"))]
    assert len(quick) == 1 + 2 * 3 * 3 and {c.model for c in quick} == {"smollm2-135m"}


def test_run_names_carry_every_varied_field():
    spec = {"name": "t", "defaults": {"task": "sonnet", "model": "tiny-llama", "epochs": 2},
            "grid": {"top_p": [0.9, 1.0], "lr": [1e-5, 2e-5], "seed": [0, 1]}}
    names = [n for n, _ in expand(spec)]
    readable = ["-".join(n.split("-")[:-1]) for n in names]  # without the hash
    assert len(set(readable)) == len(names) == 8
    assert "sonnet-sft-fft-lr=1e-05-top_p=0.9-s0" in readable and "sonnet-sft-fft-lr=2e-05-top_p=1-s1" in readable
    # the spec's aliases give short forms; a field that does not vary is not in the name
    spec["aliases"] = {"top_p": "p", "temperature": "T"}
    assert "sonnet-sft-fft-lr=1e-05-p=0.9-s0" in ["-".join(n.split("-")[:-1]) for n, _ in expand(spec)]
    # a field varied for some runs only: just the runs it tells apart carry it
    spec2 = {"name": "t", "defaults": {"task": "sonnet", "model": "tiny-llama", "epochs": 2},
             "grid": {"param": [{"param": "fft"}, {"param": "lora", "lora_rank": 8}]},
             "overrides": [{"when": {"param": "lora"}, "set": {"lora_alpha": 32}}]}
    assert sorted(n.rsplit("-", 1)[0] for n, _ in expand(spec2)) == ["sonnet-sft-fft-s0", "sonnet-sft-lora8-s0"]
    spec["aliases"] = {"top_p": "top p"}
    with pytest.raises(SftdpoError, match="aliases"):
        expand(spec)
    spec["aliases"] = {"topp": "p"}
    with pytest.raises(SftdpoError, match="aliases"):
        expand(spec)


def test_bad_spec_is_one_clear_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("defaults: {epochs: 3}\ngrid: {regime: [{regime: sft-dpo}]}\n")
    with pytest.raises(SftdpoError, match="handoff"):
        expand(load_spec(str(p)))
    with pytest.raises(SftdpoError, match="not found"):
        load_spec(str(tmp_path / "missing.yaml"))


@pytest.fixture
def spec(tmp_path):
    train, dev = qqp_files(tmp_path, 16, 8).values()
    return {"name": "mini",
            "defaults": {"task": "paraphrase", "model": "tiny-llama", "epochs": 2, "batch_size": 8, "lr": 3e-3,
                         "dpo_lr": 1e-3, "precision": "fp32", "device": "cpu", "train": str(train), "dev": str(dev)},
            "grid": {"regime": [{"regime": "sft"}, {"regime": "sft-dpo", "handoff_epoch": 1}]}}


def test_study_runs_records_skips_reuses_prefix_and_survives_a_failure(spec, cache, tmp_path):
    spec_file = tmp_path / "mini.yaml"
    bad = dict(spec, grid=dict(spec["grid"], model=["tiny-llama", "no-such-model-dir/"]))
    spec_file.write_text(yaml.safe_dump(bad))
    out = tmp_path / "study"
    run_study(str(spec_file), out, report=False)
    with Store(out / "study.db") as store:
        runs = {(r["config"]["regime"], r["config"]["model"]): r for r in store.runs()}
        assert len(runs) == 4
        failed = [r for r in runs.values() if r["status"] == "failed"]
        assert len(failed) == 2 and all("no-such-model-dir" in r["error"] for r in failed)
        sft, staged = runs[("sft", "tiny-llama")], runs[("sft-dpo", "tiny-llama")]
        assert sft["status"] == staged["status"] == "done"
        assert staged["summary"]["prefix_reused_epochs"] == 1
        sft_epochs = {(e["stage"], e["epoch"]): e for e in store.epochs(sft["run_hash"])}
        staged_epochs = {(e["stage"], e["epoch"]): e for e in store.epochs(staged["run_hash"])}
        # the shared first SFT epoch is the same measurement in both runs
        assert staged_epochs[("sft", 1)]["metrics"] == sft_epochs[("sft", 1)]["metrics"]
        assert ("dpo", 2) in staged_epochs and ("sft", 2) in sft_epochs
        assert len(store.dev_outputs(sft["run_hash"])) == sft["summary"]["dev_examples"] > 0
        env = sft["env"]
        assert "torch" in env["versions"] and env["device"]
    # second invocation: finished runs are skipped (their summaries untouched), failed ones are retried
    mtime = (out / "runs" / sft["name"] / "summary.json").stat().st_mtime_ns
    run_study(str(spec_file), out, report=True)
    assert (out / "runs" / sft["name"] / "summary.json").stat().st_mtime_ns == mtime
    assert (out / "report" / "report.md").exists()


def test_a_run_killed_in_the_study_resumes_to_the_uninterrupted_result(spec, cache, tmp_path, monkeypatch):
    """kill -9 of a run's process (the local executor forks it from its fork server, which may be
    older than this test: the run must see the environment of now) is one failed run; the next
    study invocation resumes it from its epoch checkpoint and ends where an uninterrupted run does."""
    one = dict(spec, grid={"regime": ["sft"]})
    run_study(one, tmp_path / "ref", report=False)
    monkeypatch.setenv("SFTDPO_TEST_DIE_AFTER_EPOCH", "1")
    out = tmp_path / "killed"
    run_study(one, out, report=False)
    with Store(out / "study.db") as store:
        (r,) = store.runs()
        assert r["status"] == "failed" and "-9" in r["error"]
    monkeypatch.delenv("SFTDPO_TEST_DIE_AFTER_EPOCH")
    run_study(one, out, report=False)
    with Store(out / "study.db") as store, Store(tmp_path / "ref" / "study.db") as ref:
        (r,), (want,) = store.runs(), ref.runs()
        assert r["status"] == "done" and r["summary"]["dev/accuracy"] == want["summary"]["dev/accuracy"]
        def results(st, h):  # timings (eval_s, train_s) aside
            return [{k: v for k, v in e["metrics"].items() if not k.endswith("_s")} for e in st.epochs(h)]

        assert results(store, r["run_hash"]) == results(ref, want["run_hash"])


def test_dry_run_lists_runs_without_training(spec, tmp_path, capsys):
    run_study(spec, tmp_path / "s", dry_run=True, probe=True)
    text = capsys.readouterr().out
    assert "2 runs" in text and "rates measured" in text and "H100-hours" in text
    assert not (tmp_path / "s" / "study.db").exists()
    assert re.search(r"disk: [\d.]+ GB kept after the study, up to [\d.]+ GB while it runs", text)


def test_a_finished_study_keeps_what_its_runs_keep(spec, cache, tmp_path):
    """keep_checkpoints none: no weights left once every run is done, the shared SFT prefix included;
    the staged run still reused the prefix while it existed."""
    out = tmp_path / "study"
    run_study(dict(spec, defaults=dict(spec["defaults"], keep_checkpoints="none")), out, report=False)
    with Store(out / "study.db") as store:
        runs = store.runs()
    assert [r["status"] for r in runs] == ["done", "done"]
    assert next(r for r in runs if r["config"]["regime"] == "sft-dpo")["summary"]["prefix_reused_epochs"] == 1
    assert not (out / "prefixes").exists()
    assert not list(out.glob("runs/*/checkpoints")) and not list(out.rglob("weights.safetensors"))


def test_demo_without_qqp_data_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTDPO_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("SFTDPO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    why = qqp_available()
    assert why and "\n" not in why and "SFTDPO_DATA_DIR" in why and "--train/--dev" in why


def test_study_best_round_trips_into_train(spec, cache, tmp_path, capsys):
    """`study best` writes the best run's config; `train --config` on it trains that very run again
    (same config hash, same dev metrics)."""
    out = tmp_path / "study"
    run_study(spec, out, report=False)
    assert main(["study", "best", str(out), "--metric", "macro_f1"]) == 0
    (path,) = sorted((out / "best").glob("*.yaml"))
    assert f"# -> {path}" in capsys.readouterr().out
    with Store(out / "study.db") as store:
        runs = store.runs()
    best = max(runs, key=lambda r: (r["summary"]["dev/macro_f1"], r["config"]["regime"] == "sft"))
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["run_hash"] == best["run_hash"]
    assert again["dev/macro_f1"] == best["summary"]["dev/macro_f1"]
    assert again["dev/accuracy"] == best["summary"]["dev/accuracy"]
    assert main(["study", "best", str(out), "--metric", "chrf"]) == 2
    assert "known dev metrics" in capsys.readouterr().err
