"""Tests of spice_fast.spice.corpus: sources, segmentation, skipping, shuffling, resume, errors.

All inputs are files written to tmp_path; nothing is downloaded. Parquet and datasets run for real
only when pyarrow / datasets are installed; their code paths also run against small stand-in modules.
"""

import json
import logging
import re
import sys
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spice_fast.spice.corpus import Corpus, CorpusConfig, Document, count_words, segment_text

LOGGER = "spice_fast.spice.corpus"


def make_corpus(source, **kwargs) -> Corpus:
    tokenizer = kwargs.pop("tokenizer", None)
    count_tokens = kwargs.pop("count_tokens", None)
    return Corpus(CorpusConfig(source=str(source), **kwargs), tokenizer=tokenizer, count_tokens=count_tokens)


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}w{i}" for i in range(n))


# --------------------------------------------------------------------------------------------------
# Sources


def test_folder_recursive_txt_md(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "sub" / "b.md").write_text("# beta\n\nmarkdown body")
    (tmp_path / "sub" / "deeper" / "c.TXT").write_text("gamma")
    (tmp_path / ".hidden.txt").write_text("never read")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.txt").write_text("never read either")
    corpus = make_corpus(tmp_path)
    got = {d.source: d.text for d in corpus.documents}
    assert got == {
        str(tmp_path / "a.txt"): "alpha text",
        str(tmp_path / "sub" / "b.md"): "# beta\n\nmarkdown body",
        str(tmp_path / "sub" / "deeper" / "c.TXT"): "gamma",
    }
    assert all(d.segment == 0 for d in corpus.documents)
    stats = corpus.stats.as_dict()
    assert (stats["files_read"], stats["files_skipped"]) == (3, 0)
    assert (stats["documents"], stats["segments"]) == (3, 3)


def test_single_text_file(tmp_path):
    path = tmp_path / "one.md"
    path.write_text("\ufeffonly document\r\nsecond line\n")
    corpus = make_corpus(path)
    assert corpus.documents == (Document(text="only document\nsecond line", source=str(path), segment=0),)


def test_jsonl_default_and_custom_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "first", "id": 1}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    corpus = make_corpus(path)
    assert [(d.text, d.source) for d in corpus.documents] == [("first", f"{path}:1"), ("second", f"{path}:3")]
    other = tmp_path / "body.jsonl"
    other.write_text(json.dumps({"body": "in body", "text": "not this"}) + "\n")
    assert [d.text for d in make_corpus(other, text_field="body").documents] == ["in body"]


def test_bad_jsonl_lines_skipped_counted_one_warning(tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"text": "good one"}),
        "{not json",
        json.dumps({"other": "no text field"}),
        json.dumps({"text": 42}),
        json.dumps({"text": None}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "   "}),
        "[" * 100_000,
        json.dumps({"text": "good two"}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        corpus = make_corpus(path)
    assert [d.text for d in corpus.documents] == ["good one", "good two"]
    stats = corpus.stats.as_dict()
    assert stats["lines_skipped"] == 7
    assert stats["lines_skipped_invalid_json"] == 2
    assert stats["lines_skipped_missing_text"] == 3
    assert stats["lines_skipped_non_string_text"] == 1
    assert stats["lines_skipped_empty_text"] == 1
    assert stats["files_read"] == 1 and stats["files_skipped"] == 0
    records = warnings_of(caplog)
    assert len(records) == 1
    assert f"{path}:2 (invalid_json)" in records[0].getMessage()
    assert f"{path}:4 (non_string_text)" in records[0].getMessage()


def test_bad_files_skipped_counted_one_warning(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("the only good document")
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "blank.md").write_text(" \n\n\t\n")
    (tmp_path / "nul.txt").write_bytes(b"looks like text\x00but is not")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    (tmp_path / "nul.jsonl").write_bytes(b'{"text": "a"}\x00\n')
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        corpus = make_corpus(tmp_path)
    assert [d.text for d in corpus.documents] == ["the only good document"]
    stats = corpus.stats.as_dict()
    assert stats["files_read"] == 1
    assert stats["files_skipped"] == 6
    assert (stats["files_skipped_empty"], stats["files_skipped_binary"]) == (2, 2)
    assert (stats["files_skipped_undecodable"], stats["files_skipped_unsupported"]) == (1, 1)
    records = warnings_of(caplog)
    assert len(records) == 1
    message = records[0].getMessage()
    for name, reason in [
        ("empty.txt", "empty"),
        ("blank.md", "empty"),
        ("nul.txt", "binary"),
        ("nul.jsonl", "binary"),
        ("latin1.txt", "undecodable"),
        ("image.png", "unsupported"),
    ]:
        assert f"{tmp_path / name} ({reason})" in message
    assert "good.txt" not in message


def test_warning_names_ten_then_counts(tmp_path, caplog):
    (tmp_path / "good.txt").write_text("fine")
    for i in range(13):
        (tmp_path / f"empty{i:02d}.txt").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        corpus = make_corpus(tmp_path)
    assert corpus.stats.as_dict()["files_skipped_empty"] == 13
    (record,) = warnings_of(caplog)
    message = record.getMessage()
    assert message.count("(empty)") == 10
    assert "and 3 more" in message


def test_clean_corpus_does_not_warn(tmp_path, caplog):
    (tmp_path / "a.txt").write_text("fine")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        make_corpus(tmp_path)
    assert warnings_of(caplog) == []


class FakeParquetFile:
    """Stand-in for pyarrow.parquet.ParquetFile over a JSON file {column: [values]}."""

    def __init__(self, path):
        with open(path) as f:
            self.columns = json.load(f)
        self.schema_arrow = types.SimpleNamespace(names=list(self.columns))

    def read(self, columns):
        table = {name: self.columns[name] for name in columns}
        return types.SimpleNamespace(column=lambda name: types.SimpleNamespace(to_pylist=lambda: table[name]))


def test_parquet_rows_with_stand_in_pyarrow(tmp_path, monkeypatch):
    pq = types.ModuleType("pyarrow.parquet")
    pq.ParquetFile = FakeParquetFile
    pa = types.ModuleType("pyarrow")
    pa.parquet = pq
    monkeypatch.setitem(sys.modules, "pyarrow", pa)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", pq)
    (tmp_path / "rows.parquet").write_text(
        json.dumps({"text": ["row zero", None, 7, "row three"], "n": [0] * 4})
    )
    (tmp_path / "no_column.parquet").write_text(json.dumps({"body": ["x"]}))
    (tmp_path / "zero.parquet").write_bytes(b"")
    (tmp_path / "broken.parquet").write_text("{not json")  # json's ValueError plays ArrowInvalid
    corpus = make_corpus(tmp_path)
    rows = tmp_path / "rows.parquet"
    assert [(d.text, d.source) for d in corpus.documents] == [
        ("row zero", f"{rows}[0]"),
        ("row three", f"{rows}[3]"),
    ]
    stats = corpus.stats.as_dict()
    assert stats["files_read"] == 1
    assert stats["files_skipped_no_text_column"] == 1
    assert stats["files_skipped_empty"] == 1
    assert stats["files_skipped_unreadable"] == 1
    assert (stats["lines_skipped_missing_text"], stats["lines_skipped_non_string_text"]) == (1, 1)


def test_parquet_with_pyarrow(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "real.parquet"
    pq.write_table(pa.table({"text": ["first row", None, "third row"], "n": [1, 2, 3]}), path)
    corpus = make_corpus(path)
    assert [(d.text, d.source) for d in corpus.documents] == [
        ("first row", f"{path}[0]"),
        ("third row", f"{path}[2]"),
    ]
    (tmp_path / "garbage.parquet").write_bytes(b"this is not parquet at all")
    assert make_corpus(tmp_path).stats.as_dict()["files_skipped_unreadable"] == 1


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r"data\.parquet.*pip install pyarrow"):
        make_corpus(path)


class FakeDataset:
    def __init__(self, columns):
        self.columns = columns
        self.column_names = list(columns)

    def __getitem__(self, name):
        return self.columns[name]


def fake_datasets_module(calls):
    module = types.ModuleType("datasets")

    class DatasetDict(dict):
        pass

    def load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        if name == "owner/missing":
            raise FileNotFoundError(f"Dataset '{name}' doesn't exist on the Hub")
        return FakeDataset({"text": ["hub doc zero", 3, "hub doc two"]})

    def load_from_disk(path):
        calls.append(("disk", path))
        return DatasetDict(train=FakeDataset({"body": ["disk doc"]}), test=FakeDataset({"body": ["t"]}))

    module.DatasetDict = DatasetDict
    module.load_dataset = load_dataset
    module.load_from_disk = load_from_disk
    return module


def test_datasets_with_stand_in_module(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets_module(calls))
    corpus = Corpus(CorpusConfig(source="owner/name", dataset_config="cfg", split="validation"))
    assert calls == [("owner/name", "cfg", "validation")]
    assert [(d.text, d.source) for d in corpus.documents] == [
        ("hub doc zero", "owner/name[0]"),
        ("hub doc two", "owner/name[2]"),
    ]
    assert corpus.stats.as_dict()["lines_skipped_non_string_text"] == 1
    assert [d.source for d in make_corpus("hf:owner/name").documents][0] == "owner/name[0]"
    with pytest.raises(ValueError, match="owner/missing"):
        make_corpus("owner/missing")
    with pytest.raises(ValueError, match="'nope' is not a column"):
        make_corpus("owner/name", text_field="nope")

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text("{}")
    assert [d.text for d in make_corpus(saved, text_field="body").documents] == ["disk doc"]
    assert [d.text for d in make_corpus(saved, text_field="body", split="test").documents] == ["t"]
    with pytest.raises(ValueError, match="split: 'dev'"):
        make_corpus(saved, text_field="body", split="dev")


def test_datasets_directory_for_real(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["saved zero", "saved one"]}).save_to_disk(str(tmp_path / "ds"))
    corpus = make_corpus(tmp_path / "ds")
    assert [d.text for d in corpus.documents] == ["saved zero", "saved one"]


def test_datasets_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"'owner/name'.*pip install datasets"):
        make_corpus("owner/name")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    (saved / "dataset_info.json").write_text("{}")
    with pytest.raises(ImportError, match=r"saved'.*pip install datasets"):
        make_corpus(saved)


# --------------------------------------------------------------------------------------------------
# Segmentation


def test_paragraphs_packed_greedily_within_budget():
    paragraphs = [words(f"p{i}", 4) for i in range(5)]
    text = "\n\n".join(paragraphs[:2]) + "\n\n\n  \n" + "\n\n".join(paragraphs[2:])
    assert segment_text(text, 10) == [
        paragraphs[0] + "\n\n" + paragraphs[1],
        paragraphs[2] + "\n\n" + paragraphs[3],
        paragraphs[4],
    ]
    assert segment_text(text, 12) == [
        "\n\n".join(paragraphs[:3]),
        "\n\n".join(paragraphs[3:]),
    ]


def test_long_paragraph_cut_at_lines_then_sentences_then_words():
    lines = [words(f"l{i}", 6) for i in range(3)]
    # the pieces of a long paragraph are packed with its neighbours like whole paragraphs
    assert segment_text("short intro\n\n" + "\n".join(lines), 10) == [
        "short intro\n\n" + lines[0],
        lines[1],
        lines[2],
    ]
    sentences = [words(f"s{i}", 3) + "." for i in range(5)]
    assert segment_text(" ".join(sentences), 7) == [
        sentences[0] + " " + sentences[1],
        sentences[2] + " " + sentences[3],
        sentences[4],
    ]
    assert segment_text(words("x", 25), 10) == [
        " ".join(f"xw{i}" for i in range(0, 10)),
        " ".join(f"xw{i}" for i in range(10, 20)),
        " ".join(f"xw{i}" for i in range(20, 25)),
    ]


def test_word_longer_than_budget_cut_at_characters():
    assert segment_text("abcdefghijklmnopqrst", 8, count_tokens=len) == ["abcdefgh", "ijklmnop", "qrst"]


def test_empty_text_gives_no_segment():
    assert segment_text("", 5) == []
    assert segment_text(" \n\n \t\n", 5) == []


paragraph_st = st.lists(st.sampled_from(["ab", "c.", "de!", "f?", "g\n", "h"]), min_size=1, max_size=12).map(
    " ".join
)
text_st = st.lists(paragraph_st, min_size=0, max_size=8).map("\n\n".join)


@settings(max_examples=80, deadline=None)
@given(text=text_st, budget=st.integers(1, 20))
def test_segments_within_budget_and_keep_every_word(text, budget):
    segments = segment_text(text, budget)
    assert all(0 < count_words(s) <= budget for s in segments)
    assert " ".join(segments).split() == text.split()


@settings(max_examples=80, deadline=None)
@given(
    paragraphs=st.lists(paragraph_st.map(str.strip).filter(bool), min_size=1, max_size=8),
    budget=st.integers(12, 30),
)
def test_paragraphs_that_fit_are_never_cut(paragraphs, budget):
    paragraphs = [p for p in paragraphs if count_words(p) <= budget] or ["x"]
    segments = segment_text("\n\n".join(paragraphs), budget)
    assert "\n\n".join(segments) == "\n\n".join(paragraphs)
    starts = {s.split("\n\n")[0] for s in segments}
    assert all(count_words(s) <= budget for s in segments)
    # greedy: a segment could not have taken the next paragraph too
    for current, following in zip(segments, segments[1:], strict=False):
        assert count_words(current) + count_words(following.split("\n\n")[0]) > budget
    assert starts <= set(paragraphs)


def superadditive(text: str) -> int:
    # a join costs more than its parts plus the joiner, like a tokenizer that merges across joins
    return len(text.split()) + text.count("\n") ** 2


@settings(max_examples=80, deadline=None)
@given(text=text_st, budget=st.integers(1, 20))
def test_non_additive_counts_still_within_budget(text, budget):
    assert all(superadditive(s) <= budget for s in segment_text(text, budget, superadditive))


class CharTokenizer:
    """Tokenizer stand-in: one token per character; fails if asked to add special tokens."""

    def encode(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return [ord(c) for c in text]


def test_tokenizer_counts_segments(tmp_path):
    (tmp_path / "a.txt").write_text("0123456789\n\nabcdefghijklmnopqrstuvwxyz")
    corpus = make_corpus(tmp_path, max_doc_tokens=12, tokenizer=CharTokenizer())
    assert [d.text for d in corpus.documents] == ["0123456789", "abcdefghijkl", "mnopqrstuvwx", "yz"]
    assert [d.segment for d in corpus.documents] == [0, 1, 2, 3]


# --------------------------------------------------------------------------------------------------
# Shuffling and resume


@pytest.fixture
def ten_files(tmp_path):
    for i in range(10):
        (tmp_path / f"doc{i}.txt").write_text(f"document number {i}")
    return tmp_path


def test_shuffle_deterministic_per_seed_and_epoch(ten_files):
    first = [d.text for d in make_corpus(ten_files, seed=3).next_batch(20)]
    again = [d.text for d in make_corpus(ten_files, seed=3).next_batch(20)]
    other = [d.text for d in make_corpus(ten_files, seed=4).next_batch(20)]
    assert first == again
    assert first[:10] != other[:10]
    assert sorted(first[:10]) == sorted(first[10:]) == sorted(f"document number {i}" for i in range(10))
    assert first[:10] != first[10:]  # a new permutation each epoch
    assert first[:10] != [f"document number {i}" for i in range(10)]


def test_resume_equals_uninterrupted_across_epochs(ten_files):
    straight = make_corpus(ten_files, seed=11)
    expected = [d for _ in range(4) for d in straight.next_batch(7)]
    assert straight.epoch == 2 and straight.position == 8

    first = make_corpus(ten_files, seed=11)
    got = first.next_batch(7)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["seed"] == 11 and state["epoch"] == 0 and state["position"] == 7
    resumed = make_corpus(ten_files, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    for _ in range(3):
        got += resumed.next_batch(7)
    assert got == expected
    assert resumed.state_dict() == straight.state_dict()


def test_iterator_shares_the_position(ten_files):
    a, b = make_corpus(ten_files), make_corpus(ten_files)
    it = iter(a)
    assert [next(it) for _ in range(13)] == b.next_batch(13)
    assert a.state_dict() == b.state_dict()


def test_state_from_another_corpus_is_refused(ten_files, tmp_path_factory):
    other_dir = tmp_path_factory.mktemp("other")
    (other_dir / "a.txt").write_text("something else")
    state = make_corpus(other_dir).state_dict()
    corpus = make_corpus(ten_files)
    with pytest.raises(ValueError, match="different corpus"):
        corpus.load_state_dict(state)
    good = corpus.state_dict()
    with pytest.raises(ValueError, match="position"):
        corpus.load_state_dict({**good, "position": 11})
    with pytest.raises(ValueError, match=r"state\['epoch'\]"):
        corpus.load_state_dict({**good, "epoch": "1"})


# --------------------------------------------------------------------------------------------------
# The embedded default


def test_default_pydoc_corpus():
    corpus = Corpus.default(max_doc_tokens=200)
    stats = corpus.stats.as_dict()
    assert stats["documents"] > 50
    assert len(corpus) == stats["segments"] > stats["documents"]
    assert all(0 < count_words(d.text) <= 200 for d in corpus.documents)
    assert all(d.source.startswith("pydoc:") for d in corpus.documents)
    assert any(d.segment > 0 for d in corpus.documents)
    from pydoc_data.topics import topics

    assert {d.source for d in corpus.documents} == {
        f"pydoc:{name}" for name in topics if topics[name].strip()
    }
    assert make_corpus("pydoc").config.max_doc_tokens == 6000


# --------------------------------------------------------------------------------------------------
# Errors


def test_bad_arguments(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=re.escape(f"does not exist: '{missing}'")):
        make_corpus(missing)
    with pytest.raises(ValueError, match="does not exist: 'nowhere.txt'"):
        make_corpus("nowhere.txt")
    csv = tmp_path / "table.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError, match=r"unsupported extension '\.csv'.*table\.csv"):
        make_corpus(csv)
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="max_doc_tokens"):
            CorpusConfig(max_doc_tokens=bad)
    with pytest.raises(ValueError, match="max_tokens"):
        segment_text("x", 0)
    with pytest.raises(ValueError, match="text_field"):
        CorpusConfig(text_field="")
    with pytest.raises(ValueError, match="tokenizer, count_tokens"):
        Corpus(CorpusConfig(), tokenizer=CharTokenizer(), count_tokens=len)
    with pytest.raises(ValueError, match="num_docs"):
        Corpus.default().next_batch(-1)


def test_no_usable_document_names_source_and_counts(tmp_path, caplog):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "nul.md").write_bytes(b"\x00\x01")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        with pytest.raises(
            ValueError, match=re.escape(f"'{tmp_path}' has no usable document") + ".*binary: 1, empty: 1"
        ):
            make_corpus(tmp_path)
    assert len(warnings_of(caplog)) == 1
