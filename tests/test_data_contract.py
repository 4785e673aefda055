"""Data-reader contracts that mutmut's survivors showed untested (`make mutate`, docs/mutation.md).

Oracles are TRL's own data utilities, the csv/pyarrow/datasets libraries and hand-written files whose
rows are known; the hub is replaced by a stand-in that records what it was asked for (no network).
"""

import builtins
import contextlib
import dataclasses

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from trl.data_utils import extract_prompt as trl_extract_prompt
from trl.data_utils import unpair_preference_dataset

from conftest import write_jsonl
from sftdpo.config import RunConfig, SftdpoError
from sftdpo.data import qqp, records, sonnets
from sftdpo.data.classify import load_classify_data, parse_labels
from sftdpo.data.generate import check_messages, load_generate_data
from sftdpo.data.preferences import Preference, load_preferences, load_unpaired
from sftdpo.data.qqp import load_glue_qqp, load_paraphrase_data, read_qqp
from sftdpo.data.records import read_rows
from sftdpo.data.sonnets import _roman, parse_gutenberg_sonnets

USER = {"role": "user", "content": "What colour is the sky?"}
USER_ASSISTANT = [USER, {"role": "assistant", "content": "Blue."}]


def save_splits(path, **splits) -> str:
    """A save_to_disk DatasetDict with these splits (lists of rows); its path as the readers take it."""
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return str(path)


# -- preference pairs with an implicit prompt ----------------------------------------------------------

IMPLICIT = [
    {"chosen": "Q: is it blue? A: yes it is", "rejected": "Q: is it blue? A: no"},  # a space before the split
    {"chosen": "Rhymes:abc", "rejected": "Rhymes:xyz"},  # no space before the split
    {"chosen": [USER, {"role": "assistant", "content": "Blue."}],
     "rejected": [USER, {"role": "assistant", "content": "Green."}]},
]


def test_an_implicit_prompt_is_trls_extract_prompt(tmp_path):
    """Pairs without `prompt` are split at their longest common beginning exactly as TRL's extract_prompt
    splits them (text: a space before the difference stays with the responses; conversations: whole
    messages). Catches the prompt cut one character late or early, the space kept in the prompt, and
    a prompt taken from one response only."""
    prefs = load_preferences(str(write_jsonl(tmp_path / "p.jsonl", IMPLICIT)))
    for got, row in zip(prefs, IMPLICIT):
        want = trl_extract_prompt(dict(row))
        assert (got.prompt, got.chosen, got.rejected) == (want["prompt"], want["chosen"], want["rejected"])


def test_implicit_prompt_edges_where_trl_wraps_around(tmp_path):
    """Where TRL's extract_prompt misbehaves we do not follow it: responses that differ at their first
    character have an empty prompt (TRL looks at chosen[-1] and, when that is a space, cuts at -1), and a
    response that is all prefix of the other is an empty response, refused (TRL cuts one character early).
    Catches the `idx and` guard dropped and the for-else (no difference found) lost."""
    [p] = load_preferences(str(write_jsonl(tmp_path / "a.jsonl", [{"chosen": "yes ", "rejected": "no"}])))
    assert (p.prompt, p.chosen, p.rejected) == ("", "yes ", "no")
    with pytest.raises(SftdpoError, match="chosen response is empty"):
        load_preferences(str(write_jsonl(tmp_path / "b.jsonl", [{"chosen": "Q: a", "rejected": "Q: ab"}])))


# -- KTO's unpaired rows --------------------------------------------------------------------------------

def test_unpaired_rows_as_trl_writes_them(tmp_path):
    """TRL's unpaired format: label true/false (or 1/0, as a datasets ClassLabel writes it) becomes a bool;
    a missing prompt is the empty text; conversational rows keep their messages (prompt optional). Catches
    an int label kept as an int or misread, a prompt defaulting to something else, and messages not
    checked (or checked under another name)."""
    rows = [{"prompt": "Q1", "completion": " good", "label": True},
            {"prompt": "Q2", "completion": " bad", "label": 0},
            {"prompt": "Q3", "completion": " fine", "label": 1},
            {"completion": "no prompt", "label": False}]
    got = load_unpaired(str(write_jsonl(tmp_path / "u.jsonl", rows)))
    assert [(u.prompt, u.completion) for u in got] == [("Q1", " good"), ("Q2", " bad"), ("Q3", " fine"), ("", "no prompt")]
    assert [type(u.label) for u in got] == [bool] * 4 and [u.label for u in got] == [True, False, True, False]
    conv = [{"prompt": [USER], "completion": [{"role": "assistant", "content": "Blue."}], "label": True},
            {"completion": [{"role": "assistant", "content": "Green.", "extra": 1}], "label": False}]
    got = load_unpaired(str(write_jsonl(tmp_path / "c.jsonl", conv)))
    assert got[0].prompt == [USER] and got[0].completion == [{"role": "assistant", "content": "Blue."}]
    assert got[1].prompt == [] and got[1].completion == [{"role": "assistant", "content": "Green."}]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "Q", "completion": "A", "label": 2}, "true/false `label`"),
    ({"prompt": "Q", "completion": "A", "label": "1"}, "true/false `label`"),
    ({"prompt": "Q", "completion": "A"}, "true/false `label`"),
    ([{"prompt": "Q", "completion": "A", "label": True}, {"prompt": "Q", "label": True}], "needs `completion`"),
    ({"prompt": [USER], "completion": "A", "label": True}, "must be text"),
    ({"prompt": "Q", "completion": "   ", "label": True}, "completion is empty"),
    ({"prompt": "Q", "completion": [{"role": "assistant"}], "label": True}, "completion holds"),
    ({"prompt": [{"content": "hi"}], "completion": [{"role": "assistant", "content": "A"}], "label": True},
     "prompt holds"),
])
def test_bad_unpaired_rows_are_one_line(tmp_path, row, message):
    """Each malformed unpaired row is one SftdpoError naming its line and what is wrong (the file's first
    row decides its format: without `completion` it is read as pairs). Catches a label
    check that lets 2 or "1" through, a whitespace-only completion accepted, and messages checked under
    the wrong name (the error would blame the other field)."""
    rows = row if isinstance(row, list) else [row]
    path = write_jsonl(tmp_path / "u.jsonl", rows)
    with pytest.raises(SftdpoError, match=f"{path}:{len(rows)}: .*{message}"):
        load_unpaired(str(path))


def test_pairs_for_kto_split_as_trls_unpair_preference_dataset(tmp_path):
    """Paired rows given to KTO become each chosen response desirable, then each rejected one undesirable
    (TRL's unpair_preference_dataset), labels real bools; a save_to_disk DatasetDict is read from its
    `train` split by default. Catches a rejected label that is not False, the format told from a row other
    than the first (a one-row file), and the split not passed on."""
    pairs = [{"prompt": "P1", "chosen": " a", "rejected": " b"}, {"prompt": "P2", "chosen": " c", "rejected": " d"}]
    got = load_unpaired(str(write_jsonl(tmp_path / "p.jsonl", pairs[:1])))
    assert [(u.prompt, u.completion, u.label) for u in got] == [("P1", " a", True), ("P1", " b", False)]
    assert got[1].label is False
    got = load_unpaired(save_splits(tmp_path / "dd", train=pairs, test=[{"prompt": "T", "chosen": " x", "rejected": " y"}]))
    want = unpair_preference_dataset(datasets.Dataset.from_list(pairs))
    assert [(u.prompt, u.completion, u.label) for u in got] == [(r["prompt"], r["completion"], r["label"]) for r in want]


def test_messages_must_be_a_non_empty_list_of_role_content_dicts():
    """check_messages: a string, an empty list, or a message without role or content is one clear error
    (not a KeyError later, not an empty conversation). Catches `or` turned into `and` in either check."""
    for bad, message in (("hello", "non-empty list"), ([], "non-empty list"), ([{"role": "user"}], "not a message"),
                         ([{"content": "x"}], "not a message"), (["hi"], "not a message")):
        with pytest.raises(SftdpoError, match=message):
            check_messages(bad, "f.jsonl:1", "prompt")
    assert check_messages([{"role": "user", "content": "x", "name": "n"}], "w", "prompt") == [{"role": "user", "content": "x"}]


# -- the hub, stood in for -------------------------------------------------------------------------------

class Hub:
    """datasets.load_dataset and the offline switch, recorded; rows or an exception to answer with."""

    def __init__(self, monkeypatch, module, reachable, rows=None, error=None):
        self.calls, self.offline = [], []
        self.rows, self.error = rows, error
        monkeypatch.setattr(module, "hub_reachable", lambda: reachable)
        monkeypatch.setattr(module, "hub_offline", self.switch)
        monkeypatch.setattr(datasets, "load_dataset", self.load)

    @contextlib.contextmanager
    def switch(self, on):
        self.offline.append(on)
        yield

    def load(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error:
            raise self.error
        return self.rows


def test_glue_qqp_rows_become_paraphrase_examples(monkeypatch):
    """GLUE QQP comes from nyu-mll/glue's qqp config, the split asked for, with its idx as id and label -1
    (the unlabelled test split) as None; offline only the cache is tried. Catches another dataset, config
    or split, fields swapped or dropped, label 0 read as missing, and the offline switch inverted."""
    rows = [{"idx": 7, "question1": "a?", "question2": "b?", "label": 1},
            {"idx": 8, "question1": "c?", "question2": "d?", "label": 0},
            {"idx": 9, "question1": "e?", "question2": "f?", "label": -1}]
    hub = Hub(monkeypatch, qqp, reachable=True, rows=rows)
    got = load_glue_qqp("validation")
    assert hub.calls == [(("nyu-mll/glue", "qqp"), {"split": "validation"})] and hub.offline == [False]
    assert [(e.id, e.q1, e.q2, e.label) for e in got] == [("7", "a?", "b?", 1), ("8", "c?", "d?", 0), ("9", "e?", "f?", None)]
    hub = Hub(monkeypatch, qqp, reachable=False, rows=rows)
    load_glue_qqp("train")
    assert hub.offline == [True]


@pytest.mark.parametrize("reachable,why", [(False, "offline and not in the Hugging Face cache"), (True, "download failed")])
def test_glue_qqp_unavailable_says_why(monkeypatch, reachable, why):
    """The one-line error tells offline-and-uncached from a failed download. Catches the two swapped."""
    Hub(monkeypatch, qqp, reachable=reachable, error=ConnectionError("boom"))
    with pytest.raises(SftdpoError, match=f"GLUE QQP 'train' unavailable \\({why}: ConnectionError\\)"):
        load_glue_qqp("train")


def test_hub_rows_name_the_dataset_split_and_index(monkeypatch):
    """A hub dataset's rows are the split asked for, each named dataset[split]:index for errors; offline
    only the cache is tried, and a failure says which. Catches the split or offline switch dropped, and
    rows misnamed."""
    hub = Hub(monkeypatch, records, reachable=True, rows=[{"text": "a"}, {"text": "b"}])
    got = records.hub_rows("me/data", "dev")
    assert hub.calls == [(("me/data",), {"split": "dev"})] and hub.offline == [False]
    assert [(r.where, r.fields) for r in got] == [("me/data[dev]:0", {"text": "a"}), ("me/data[dev]:1", {"text": "b"})]
    hub = Hub(monkeypatch, records, reachable=True, rows=[{"text": "c"}])
    assert [r.where for r in records.dataset_rows("me/data", "test")] == ["me/data[test]:0"]  # not a folder: the hub
    assert hub.calls == [(("me/data",), {"split": "test"})]
    hub = Hub(monkeypatch, records, reachable=False, error=FileNotFoundError("x"))
    with pytest.raises(SftdpoError, match="'me/data' split 'dev': offline and not in the Hugging Face cache"):
        records.hub_rows("me/data", "dev")
    assert hub.offline == [True]
    Hub(monkeypatch, records, reachable=True, error=ValueError("x"))
    with pytest.raises(SftdpoError, match="split 'dev': could not load it \\(ValueError\\)"):
        records.hub_rows("me/data", "dev")


# -- where a row came from, and what a file holds --------------------------------------------------------

def test_rows_name_where_they_came_from(tmp_path):
    """Every reader names each row's place so that an error can point at it: CSV lines (a quoted field over
    two lines counts both), Parquet's 1-based rows, a saved dataset's split (or `dataset`) and index; a
    quoted CSV field keeps its \\r\\n as written (csv needs newline=""). Catches rows named None or off by
    one, the split's name lost, and universal newlines rewriting a field."""
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b'text,label\r\n"two\r\nlines",1\r\nb,0\r\n')
    got = read_rows(csv_path)
    assert [(r.where, r.fields) for r in got] == [(f"{csv_path}:3", {"text": "two\r\nlines", "label": "1"}),
                                                  (f"{csv_path}:4", {"text": "b", "label": "0"})]
    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), pq_path)
    assert [r.where for r in read_rows(pq_path)] == [f"{pq_path}:row 1", f"{pq_path}:row 2"]
    datasets.Dataset.from_list([{"text": "a"}, {"text": "b"}]).save_to_disk(str(tmp_path / "ds"))
    assert [r.where for r in read_rows(tmp_path / "ds", "train")] == [f"{tmp_path / 'ds'}[train]:0", f"{tmp_path / 'ds'}[train]:1"]
    assert [r.where for r in read_rows(tmp_path / "ds")] == [f"{tmp_path / 'ds'}[dataset]:0", f"{tmp_path / 'ds'}[dataset]:1"]


def test_short_csv_row_and_broken_parquet_say_what_is_wrong(tmp_path, monkeypatch):
    """A CSV row with fewer fields than the header says how many it has; an unreadable Parquet file quotes
    pyarrow's reason (its type when it has none). Catches the missing fields counted instead of the present
    ones, and the reason lost or replaced by None."""
    p = tmp_path / "d.csv"
    p.write_text("a,b,c\n1,2\n")
    with pytest.raises(SftdpoError, match=f"{p}:2: 2 field\\(s\\) where the header has 3"):
        read_rows(p)
    bad = tmp_path / "d.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(SftdpoError, match="not a readable Parquet file \\(.*(magic|Parquet|size).*\\)"):
        read_rows(bad)

    def silent(*args, **kwargs):
        raise pa.ArrowInvalid("")

    monkeypatch.setattr(pq, "read_table", silent)  # an error without a message: its type says what it was
    with pytest.raises(SftdpoError, match="not a readable Parquet file \\(ArrowInvalid\\)"):
        read_rows(bad)


def test_glue_tsv_lines_keep_their_fields_and_refuse_bad_bytes(tmp_path):
    """GLUE/Quora TSV lines lose only their line ending: an empty last field stays a field and a question's
    trailing characters stay; a file that is not UTF-8 is one clear error. Catches rstrip() of all
    whitespace or of more characters, and an unknown codec error handler (LookupError, not SftdpoError)."""
    p = tmp_path / "test.tsv"
    p.write_bytes(b"id\tquestion1\tquestion2\r\n1\tWhat is X\tIs it X\r\n2\tA \t\r\n")
    got, fmt = read_qqp(p)
    assert fmt == "glue-qqp" and [(e.id, e.q1, e.q2) for e in got] == [("1", "What is X", "Is it X"), ("2", "A ", "")]
    p.write_bytes(b"id\tquestion1\tquestion2\n1\tcaf\xe9\tb\n")
    with pytest.raises(SftdpoError, match="UTF-8"):
        read_qqp(p)


def test_a_data_folder_without_both_qqp_files_is_skipped(tmp_path, monkeypatch):
    """$SFTDPO_DATA_DIR/qqp/ holding only a train file is passed over for the next data directory (./data).
    Catches the file search raising when no candidate exists."""
    glue = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n"
    (tmp_path / "first" / "qqp").mkdir(parents=True)
    (tmp_path / "first" / "qqp" / "train.tsv").write_text(glue + "1\t1\t2\tq a\tq b\t1\n")
    (tmp_path / "cwd" / "data" / "qqp").mkdir(parents=True)
    (tmp_path / "cwd" / "data" / "qqp" / "train.tsv").write_text(glue + "1\t1\t2\ttrain one\ttrain two\t1\n")
    (tmp_path / "cwd" / "data" / "qqp" / "dev.tsv").write_text(glue + "5\t3\t4\tdev one\tdev two\t0\n")
    monkeypatch.setenv("SFTDPO_DATA_DIR", str(tmp_path / "first"))
    monkeypatch.chdir(tmp_path / "cwd")
    data = load_paraphrase_data()
    assert [(e.q1, e.label) for e in data.train] == [("train one", 1)] and [(e.q1, e.label) for e in data.dev] == [("dev one", 0)]


def test_roman_numerals_are_read_in_full():
    """Sonnet headings are canonical Roman numerals; a capital word that is not one (MID, IIII) is text.
    The whole numeral system, not just the sonnets' I..CLIV, so that a heading test is not tuned to one
    file. Catches a wrong symbol or value in the canonical table (CD, D, CM, M)."""
    for s, n in (("I", 1), ("IV", 4), ("IX", 9), ("XL", 40), ("XC", 90), ("CLIV", 154), ("CD", 400), ("D", 500),
                 ("DCC", 700), ("CM", 900), ("M", 1000), ("MCMXCIV", 1994), ("MMXXVI", 2026)):
        assert _roman(s) == n, s
    for s in ("IIII", "MID", "VX", "IC", "", "DID", "Mm"):
        assert _roman(s) is None, s


# -- own classification data ------------------------------------------------------------------------------

def test_classify_data_ids_overlap_and_splits(tmp_path):
    """Classify rows: the id column when there is one, else `train-i` / `dev-i`; dev rows equal to a train row
    up to case and spacing are dropped and counted; the source line counts both sides; a save_to_disk
    DatasetDict is read from the splits named in the config. Catches ids made from the wrong split name,
    case-sensitive overlap, the count or source lost, and the configured split ignored."""
    train = [{"text": "Good Film", "y": 1}, {"text": "bad film", "y": 0}, {"text": "fine", "y": 1}]
    dev = [{"text": "good  film", "y": 1}, {"text": "awful", "y": 0}, {"text": "great", "y": 1, "id": "d7"}]
    cfg = dict(task="classify", template="Review: {text}\n", labels="0=no,1=yes", label_column="y")
    data = load_classify_data(RunConfig(**cfg, train=str(write_jsonl(tmp_path / "tr.jsonl", train)),
                                        dev=str(write_jsonl(tmp_path / "dv.jsonl", dev))))
    assert [e.id for e in data.train] == ["train-0", "train-1", "train-2"]
    assert [(e.id, e.label) for e in data.dev] == [("dev-1", "0"), ("d7", "1")] and data.dev_dropped_overlap == 1
    assert data.source.endswith(": 3 train, 2 dev rows") and "tr.jsonl" in data.source
    save_splits(tmp_path / "dd", first=train[:2], second=dev[1:2])
    data = load_classify_data(RunConfig(**cfg, train=str(tmp_path / "dd"), dev=str(tmp_path / "dd"),
                                        train_split="first", dev_split="second"))
    assert [e.fields["text"] for e in data.train] == ["Good Film", "bad film"] and [e.fields["text"] for e in data.dev] == ["awful"]
    data = load_classify_data(RunConfig(**cfg, dataset=str(tmp_path / "dd"), train_split="first", dev_split="second"))
    assert data.source == f"dataset {tmp_path / 'dd'} (splits first, second): 2 train, 1 dev rows"
    no_label = write_jsonl(tmp_path / "nl.jsonl", [{"text": "x"}])
    with pytest.raises(SftdpoError, match=r":1: no column 'y' \(--template and --label-column need it \(dev data\)\)"):
        load_classify_data(RunConfig(**cfg, train=str(tmp_path / "tr.jsonl"), dev=str(no_label)))


@pytest.mark.parametrize("spec", ["0=no", "0=no,1=no", "0=no,0=yes", "0=no,1=", "0=no,1=yes,2"])
def test_bad_label_lists_are_refused(spec):
    """--labels needs two or more VALUE=WORD pairs with different values and different, non-empty words.
    Catches any one of the checks joined by `and` instead of `or`."""
    with pytest.raises(SftdpoError, match="--labels"):
        parse_labels(spec)


def test_a_label_word_may_hold_an_equals_sign():
    """VALUE=WORD splits at the first `=`: the word keeps any later one. Catches rsplit and an unbounded split."""
    assert parse_labels("0=a=b,1=c") == [("0", "a=b"), ("1", "c")]


def test_conversational_pairs_blame_the_field_that_is_wrong(tmp_path):
    """A conversational pair whose chosen, rejected or prompt messages are malformed is one error naming that
    field and row; an explicit prompt's messages are kept; a save_to_disk DatasetDict of pairs is read from
    its `train` split by default. Catches the fields' names swapped or lost in the check, the rejected
    messages not checked, the explicit prompt ignored (then taken as the pair's shared beginning), and the
    split dropped."""
    good = [USER, {"role": "assistant", "content": "Blue."}]
    for field in ("chosen", "rejected"):
        row = {"chosen": good, "rejected": [USER, {"role": "assistant", "content": "Green."}]}
        row[field] = [USER, {"role": "assistant"}]
        with pytest.raises(SftdpoError, match=f":1: {field} holds"):
            load_preferences(str(write_jsonl(tmp_path / f"{field}.jsonl", [row])))
    saved = save_splits(tmp_path / "dd", test=[{"prompt": "T", "chosen": " x", "rejected": " y"}],
                        train=[{"prompt": "P", "chosen": " a", "rejected": " b"}])
    assert [(p.prompt, p.chosen, p.rejected) for p in load_preferences(saved)] == [("P", " a", " b")]
    answer = [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "Green."}]
    [p] = load_preferences(str(write_jsonl(tmp_path / "explicit.jsonl", [{"prompt": [USER], "chosen": answer[0],
                                                                          "rejected": answer[1]}])))
    assert (p.prompt, p.chosen, p.rejected) == ([USER], *answer)
    bad = write_jsonl(tmp_path / "bad_prompt.jsonl", [{"prompt": [{"role": "user"}], "chosen": answer[0], "rejected": answer[1]}])
    with pytest.raises(SftdpoError, match=f"^{bad}:1: prompt holds"):
        load_preferences(str(bad))


def test_a_missing_column_names_the_row_and_what_it_has(tmp_path):
    """require_columns: the error names the first row without the column, and the columns it has (or
    `none`). Catches the listing lost or joined differently."""
    p = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "id": 2}, {}])
    with pytest.raises(SftdpoError, match=f"{p}:2: no column 'label' \\(for the test\\); the row has: text, id$"):
        records.require_columns(read_rows(p), ["text", "label"], "for the test")
    with pytest.raises(SftdpoError, match="the row has: none$"):
        records.require_columns(read_rows(p)[2:], ["text"], "x")


def test_gutenberg_sonnets_are_numbered_from_their_first_heading():
    """parse_gutenberg_sonnets on Windows line endings: sonnets numbered on from the first heading's numeral
    (headings only mark boundaries), each sonnet's text from the line after its heading. Catches numbering
    from 1 regardless, the heading's first line dropped, and line endings rewritten."""
    text = "  V\r\n\r\nFirst line,\r\nsecond line.\r\n\r\n  VI\r\nThird line\r\n  end.  \r\n"
    got = parse_gutenberg_sonnets(text)
    assert [(s.number, s.text) for s in got] == [(5, "First line,\nsecond line."), (6, "Third line\n  end.")]


def test_data_key_names_the_data_not_the_working_directory(tmp_path, monkeypatch):
    """data_key (which configs share a load) is the same for relative and absolute paths to the same
    files and local dataset, the same for a hub id from any directory, and different for different
    data. Catches a key of nothing, --dev or a local --dataset left relative (a resumed run from
    another directory would read other data under the same key), and a hub id taken for a path."""

    from sftdpo.data import data_key

    here = tmp_path / "work"
    (here / "local_ds").mkdir(parents=True)
    monkeypatch.chdir(here)
    rel = RunConfig(task="paraphrase", train="train.tsv", dev="dev.tsv", dataset="local_ds")
    absolute = RunConfig(task="paraphrase", train=str(here / "train.tsv"), dev=str(here / "dev.tsv"),
                         dataset=str(here / "local_ds"))
    hub = RunConfig(task="paraphrase", dataset="nyu-mll/glue")
    keys = {data_key(rel), data_key(dataclasses.replace(rel, dev="other.tsv")), data_key(hub),
            data_key(dataclasses.replace(rel, dataset=str(tmp_path)))}
    assert data_key(rel) == data_key(absolute) and len(keys) == 4
    at_work = data_key(hub)
    monkeypatch.chdir(tmp_path)
    assert data_key(hub) == at_work


# -- which examples a config loads, and --pairs sources --------------------------------------------------

def _generate_config(tmp_path, name: str, completion: str, **kw) -> RunConfig:
    """A generate task on two one-row files of its own (`name`), the completion telling them apart."""
    return RunConfig(task="generate", **kw,
                     train=str(write_jsonl(tmp_path / f"{name}-train.jsonl", [{"prompt": "Say it:", "completion": completion}])),
                     dev=str(write_jsonl(tmp_path / f"{name}-dev.jsonl", [{"prompt": "Echo:", "completion": completion}])))


def test_resolve_data_shares_loads_through_its_memo_but_not_fingerprints(tmp_path, monkeypatch):
    """A study resolves all its configs with one memo: configs reading the same data load it once, configs
    reading other data each get their own fingerprint (the one they get alone). Since a run's hash covers
    the fingerprint, not the paths, a shared fingerprint would give two runs of a study on different data one
    identity (the second reusing the first's result). Catches the memo keyed by nothing, and a memo that
    is not the caller's (every config loaded again)."""
    import sftdpo.data as data_pkg

    a, b = _generate_config(tmp_path, "a", " one"), _generate_config(tmp_path, "b", " two")
    alone = {name: data_pkg.resolve_data(c).data_fingerprint for name, c in (("a", a), ("b", b))}
    assert alone["a"] != alone["b"]
    loads = []
    real = data_pkg.load_task_data
    monkeypatch.setattr(data_pkg, "load_task_data", lambda cfg: loads.append(cfg.train) or real(cfg))
    memo: dict = {}
    got = [data_pkg.resolve_data(c, memo).data_fingerprint for c in (a, b, a, dataclasses.replace(b, seed=3))]
    assert got == [alone["a"], alone["b"], alone["a"], alone["b"]]
    assert loads == [a.train, b.train]  # once per data, not once per config


def test_resolve_data_reads_a_pairs_file_only_for_a_preference_stage(tmp_path):
    """A DPO run's `--pairs file:PATH` is read when the config is resolved, so a bad pair row is one error
    before any run directory is written, from the --train-split of a saved dataset, and each file of a
    study is read (a memo entry per file); an SFT-only run never reads its --pairs, so a path there that
    does not exist is no error. Catches the split not handed on, the pairs file skipped for a second DPO
    config of the study (its memo entry keyed by nothing), and the regime test spelt so that SFT runs
    read pairs too."""
    from sftdpo.data import resolve_data

    good = save_splits(tmp_path / "good", prefs=[{"prompt": "Say it:", "chosen": " one", "rejected": " two"}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Say it:", "chosen": " one"}])
    cfg = _generate_config(tmp_path, "g", " one", regime="dpo", pairs=f"file:{good}", train_split="prefs")
    memo: dict = {}
    resolve_data(cfg, memo)
    with pytest.raises(SftdpoError, match=f"{bad}:1: a preference row needs `chosen` and `rejected`"):
        resolve_data(dataclasses.replace(cfg, pairs=f"file:{bad}"), memo)
    sft = dataclasses.replace(cfg, regime="sft", pairs=f"file:{tmp_path / 'absent.jsonl'}")
    assert resolve_data(sft, memo).data_fingerprint == resolve_data(cfg).data_fingerprint


@pytest.mark.parametrize("row,message", [
    ({"chosen": 5, "rejected": " two"}, "must be text"),  # no prompt: a number is not a response
    ({"prompt": "p", "chosen": " one", "rejected": 3}, "must be text"),
    ({"prompt": "p", "chosen": "   ", "rejected": " two"}, "the chosen response is empty"),
    ({"prompt": "p", "chosen": " one", "rejected": " \n"}, "the rejected response is empty"),
])
def test_bad_pair_rows_are_one_line(tmp_path, row, message):
    """A pair whose chosen or rejected is not text, or is only whitespace, is refused naming its row (not a
    TypeError in extract_prompt, not a pair trained on an empty response). Catches `or` turned into
    `and` in the text check and in either emptiness check."""
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(SftdpoError, match=f"{path}:1: .*{message}"):
        load_preferences(str(path))


@pytest.mark.parametrize("source", ["pairs.jsonl", "sub/pairs.JSONL", "/pairs", "./pairs", "~/pairs", "a/b/c"])
def test_a_pairs_source_that_can_only_be_a_path_is_a_missing_file(tmp_path, monkeypatch, source):
    """`--pairs file:SOURCE` that is not there and has a file extension (in any case), starts with /, . or ~,
    or has two slashes can only be a path: one "no such file" error, the hub never asked. Catches each of
    those tests dropped or its `or` turned into `and`, the extension compared in upper case, and the
    slash count off by one."""
    monkeypatch.chdir(tmp_path)
    hub = Hub(monkeypatch, records, reachable=True, rows=[{"chosen": "a", "rejected": "b"}])
    with pytest.raises(SftdpoError, match=f"--pairs file:{source}: no such file"):
        load_preferences(source)
    assert hub.calls == []


def test_a_pairs_source_with_one_slash_is_a_hub_dataset_split(tmp_path, monkeypatch):
    """`--pairs file:me/prefs` (not a path here) is the hub dataset me/prefs, the split asked for; its rows
    are pairs like a file's. Catches the hub id taken for a missing file (slash count >= 1), the file
    reader used for it, and the id or split not handed on."""
    monkeypatch.chdir(tmp_path)
    hub = Hub(monkeypatch, records, reachable=True, rows=[{"prompt": "p", "chosen": " a", "rejected": " b"}])
    assert load_preferences("me/prefs", "dev") == [Preference("p", " a", " b")]
    assert hub.calls == [(("me/prefs",), {"split": "dev"})]


def test_json_and_json_lines_rows(tmp_path):
    """A .json file holding a list (whitespace before it allowed) gives one row per item, named `item N`
    from 1; JSON Lines skips blank lines and goes on after them, each row named by its line; a .jsonl
    line holding a list is refused at its line, not read as a JSON list. Catches the list test made `or`
    (any file starting with "[") or made on the right-stripped text, items named None or off by one,
    and a blank line ending the file."""
    listed = tmp_path / "d.json"
    listed.write_text('\n  [{"t": "a"},\n   {"t": "b"}]\n')
    assert [(r.where, r.fields) for r in read_rows(listed)] == [(f"{listed}:item 1", {"t": "a"}),
                                                                (f"{listed}:item 2", {"t": "b"})]
    lines = tmp_path / "d.jsonl"
    lines.write_text('{"t": "a"}\n\n{"t": "b"}\n')
    assert [(r.where, r.fields) for r in read_rows(lines)] == [(f"{lines}:1", {"t": "a"}), (f"{lines}:3", {"t": "b"})]
    lines.write_text('[{"t": "a"}]\n')
    with pytest.raises(SftdpoError, match=f"{lines}:1: expected an object of named fields, got list"):
        read_rows(lines)


def test_a_conversational_dev_row_is_train_only_when_its_whole_conversation_is(tmp_path):
    """The dev-equals-train guard compares whole conversations: dev rows that repeat train's answers to
    other questions are new examples; dev rows that repeat train's conversations with a message's content
    parts written in another key order are the same examples (refused). Catches the prompt left out of
    the comparison, and the JSON keys compared in the order the file gives them."""
    def conversation(question, answer, text_first=False):
        content = [{"text": question, "type": "text"} if text_first else {"type": "text", "text": question}]
        return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}

    train = write_jsonl(tmp_path / "train.jsonl", [conversation("Sky?", "Blue."), conversation("Grass?", "Green.")])
    other_questions = write_jsonl(tmp_path / "dev.jsonl", [conversation("Sea?", "Blue."), conversation("Leaf?", "Green.")])
    data = load_generate_data(RunConfig(task="generate", train=str(train), dev=str(other_questions)))
    assert [e.completion for e in data.dev] == [[{"role": "assistant", "content": "Blue."}],
                                                [{"role": "assistant", "content": "Green."}]]
    reordered = write_jsonl(tmp_path / "same.jsonl", [conversation("Sky?", "Blue.", text_first=True)])
    with pytest.raises(SftdpoError, match="every dev example also occurs in train"):
        load_generate_data(RunConfig(task="generate", train=str(train), dev=str(reordered)))


def test_conversational_rows_in_both_of_trls_layouts(tmp_path):
    """TRL's conversational prompt-completion rows (message lists) are conversational data, as are rows with
    `messages` beside a text `prompt` column (UltraChat's layout: prompt, prompt_id, messages): the task
    renders both with the chat template. Catches prompt/completion lists read as text (refused), a row with
    `prompt` but no `completion` taken for prompt-completion (KeyError), the format misnamed (the task
    would not apply the chat template), and such a row's id (split-index) lost."""
    user, answer = USER_ASSISTANT
    other = {"role": "user", "content": "Sea?"}
    pc = [{"prompt": [user], "completion": [answer]}, {"prompt": [other], "completion": [answer]}]
    data = load_generate_data(RunConfig(task="generate", train=str(write_jsonl(tmp_path / "a.jsonl", pc[:1])),
                                        dev=str(write_jsonl(tmp_path / "b.jsonl", pc[1:]))))
    assert data.format == "conversational" and (data.train[0].prompt, data.train[0].completion) == ([user], [answer])
    assert [e.id for e in data.train + data.dev] == ["train-0", "dev-0"]
    ultra = [{"prompt": "Sky?", "prompt_id": "p1", "messages": [user, answer]},
             {"prompt": "Sea?", "prompt_id": "p2", "messages": [other, answer]}]
    data = load_generate_data(RunConfig(task="generate", train=str(write_jsonl(tmp_path / "c.jsonl", ultra[:1])),
                                        dev=str(write_jsonl(tmp_path / "d.jsonl", ultra[1:]))))
    assert data.format == "conversational" and (data.dev[0].prompt, data.dev[0].completion) == ([other], [answer])


@pytest.mark.parametrize("row,message", [
    ({"prompt": 5, "completion": " x"}, "prompt and completion must be text"),
    ({"prompt": "p", "completion": "  \n"}, "the completion not empty"),
    ({"text": " \n "}, "`text` must be non-empty text"),
    ({"messages": "hello"}, "messages must be a non-empty list of messages"),
    ({"messages": [*USER_ASSISTANT, {"role": "user", "content": "And?"}]}, "the last message must be the assistant's"),
    ({"messages": USER_ASSISTANT[1:]}, "the last message must be the assistant's"),
    ({"prompt": [{"role": "user"}], "completion": USER_ASSISTANT[1:]}, "prompt holds {'role': 'user'}, not a message"),
    ({"prompt": USER_ASSISTANT[:1], "completion": [{"role": "bot", "content": "x"}]}, "completion has a message with role 'bot'"),
])
def test_bad_generate_rows_are_one_line(tmp_path, row, message):
    """A generate row that cannot be trained on is refused naming its row: a prompt that is not text, a
    completion or text of whitespace only, `messages` that is not a list, a conversation that does not end
    with the assistant or has no prompt before it, a prompt or completion list holding a bad message (each
    error names the field). Catches each `or` turned into `and`, prompt and completion swapped or not
    checked, and the row or the field's name lost from the message."""
    train = write_jsonl(tmp_path / "t.jsonl", [row])
    with pytest.raises(SftdpoError, match=f"{train}:1: .*{message}"):
        load_generate_data(RunConfig(task="generate", train=str(train), dev=str(train)))


def test_generate_rows_ids_and_language_modelling_splits(tmp_path):
    """Rows without an id column are `train-i` / `dev-i` in every format; a dev text is split after its
    --prompt-lines lines, the continuation keeping its own line breaks, and a dev text of exactly
    --prompt-lines lines (nothing to continue) is refused; a system message before the exchange is part of
    the prompt. Catches ids dropped for text rows, the length test off by one (an empty reference scored),
    the continuation's lines joined otherwise, and the last message looked up at index 1."""
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a\nb\nc"}, {"text": "d\ne\nf"}])
    dev = write_jsonl(tmp_path / "d.jsonl", [{"text": "one\ntwo\nthree\nfour"}])
    data = load_generate_data(RunConfig(task="generate", train=str(train), dev=str(dev), prompt_lines=2))
    assert [e.id for e in data.train] == ["train-0", "train-1"] and data.train[1].completion == "d\ne\nf"
    assert [(e.id, e.prompt, e.completion) for e in data.dev] == [("dev-0", "one\ntwo\n", "three\nfour")]
    short = write_jsonl(tmp_path / "s.jsonl", [{"text": "one\ntwo"}])
    with pytest.raises(SftdpoError, match=f"{short}:1: a dev text needs more than --prompt-lines 2 lines"):
        load_generate_data(RunConfig(task="generate", train=str(train), dev=str(short), prompt_lines=2))
    system = {"role": "system", "content": "Be brief."}
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [system, *USER_ASSISTANT]}])
    other = write_jsonl(tmp_path / "o.jsonl", [{"messages": USER_ASSISTANT}])
    data = load_generate_data(RunConfig(task="generate", train=str(chat), dev=str(other)))
    assert (data.train[0].prompt, data.train[0].completion) == ([system, USER_ASSISTANT[0]], USER_ASSISTANT[1:])


def test_generate_data_from_saved_splits_and_what_it_says_it_read(tmp_path):
    """Generate data is read from the configured splits of a `--dataset` or of save_to_disk directories given
    as --train/--dev, and its source line names where and how much (rows per side, format); an empty
    train or dev side is refused by name. Catches either side read from another split or another
    dataset, the source line lost, and an empty dev side let through to the overlap check."""
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(5)]
    folder = save_splits(tmp_path / "dd", first=rows[:2], second=rows[2:3], third=rows[3:])
    data = load_generate_data(RunConfig(task="generate", dataset=folder, train_split="first", dev_split="third"))
    assert [e.prompt for e in data.train] == ["Q0:", "Q1:"] and [e.prompt for e in data.dev] == ["Q3:", "Q4:"]
    assert data.source == f"dataset {folder} (splits first, third): 2 train, 2 dev rows (prompt-completion)"
    data = load_generate_data(RunConfig(task="generate", train=folder, dev=folder, train_split="second",
                                        dev_split="first"))
    assert [e.prompt for e in data.train] == ["Q2:"] and [e.prompt for e in data.dev] == ["Q0:", "Q1:"]
    assert data.source == f"files: train={folder}, dev={folder}: 1 train, 2 dev rows (prompt-completion)"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    train = write_jsonl(tmp_path / "t.jsonl", rows)
    for side, cfg in (("train", dict(train=str(empty), dev=str(train))), ("dev", dict(train=str(train), dev=str(empty)))):
        with pytest.raises(SftdpoError, match=f"the {side} data has no rows \\(files: train="):
            load_generate_data(RunConfig(task="generate", **cfg))


def _ascii_default_open(file, mode="r", buffering=-1, encoding=None, *args, **kwargs):
    """open() as a C locale without UTF-8 mode makes it: text files default to ASCII."""
    return builtins.open(file, mode, buffering, encoding or "ascii", *args, **kwargs)


@pytest.mark.parametrize("module,write,written", [
    (sonnets, lambda p: sonnets.write_cs224n_generations(p, [(3, "Caf\u00e9 line\nsecond")]),
     "--Generated Sonnets-- \n\n\n3\nCaf\u00e9 line\nsecond\n\n"),
    (qqp, lambda p: qqp.write_paraphrase_predictions(p, [("caf\u00e9", 1, None)]), "id,prediction,label\ncaf\u00e9,1,\n"),
], ids=["generations", "predictions"])
def test_outputs_are_written_as_utf_8_whatever_the_locale(tmp_path, monkeypatch, module, write, written):
    """The course-format generations file and the predictions CSV are UTF-8 with LF line ends even where
    open()'s default encoding is ASCII (a C locale without UTF-8 mode; stood in for in the writer's module,
    so that the check runs in-process where mutmut sees it): a generated "é", or an id holding one, is
    written, not an error. Catches the encoding left to the locale."""
    monkeypatch.setattr(module, "open", _ascii_default_open, raising=False)
    out = tmp_path / "out.txt"
    write(out)
    assert out.read_bytes() == written.encode()
