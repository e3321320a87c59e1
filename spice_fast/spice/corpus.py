"""Documents for the SPICE challenger: read a corpus, cut it into token-bounded segments, shuffle them.

``Corpus(CorpusConfig(source=...))`` reads ``source`` once, cuts every document into segments of at
most ``max_doc_tokens`` tokens and serves them in a shuffled order that is a pure function of
``(seed, epoch)``: ``next_batch(n)`` returns the next ``n`` segments as ``Document``s and, when the
current permutation is exhausted, starts the next epoch with a new one. ``state_dict()`` /
``load_state_dict()`` carry ``seed, epoch, position`` (JSON), so a resumed corpus yields exactly the
documents an uninterrupted one would. It is the equivalent of a map-style dataset with a seeded
sampler whose position is part of the checkpoint.

Sources (``CorpusConfig.source``):
- ``"pydoc"``: the embedded default, no download: the Python language reference topics that every
  CPython ships (``pydoc_data.topics.topics``), one document per topic.
- a file, or a folder walked recursively (sorted; hidden files and folders are left out), of
  ``.txt`` / ``.md`` (one document per file), ``.jsonl`` (one document per line: its ``text_field``
  string) and ``.parquet`` (one document per row of the ``text_field`` column; needs pyarrow).
- a folder written by ``datasets``' ``save_to_disk``, or a Hugging Face dataset name (``owner/name``
  when no such local path exists, or ``hf:owner/name``); both need ``datasets``, imported only then.

Segmentation: a document is split into paragraphs on blank lines, and consecutive paragraphs are
packed greedily into segments of at most ``max_doc_tokens`` tokens. A paragraph over the budget is cut
at line breaks, then at sentence ends, then between words, then between characters (binary search on
the token count), and its pieces are packed the same way. Every packed segment is counted again as a
whole, because tokenizer counts are not additive across a join. One case cannot be honoured: a single
character that alone counts more than ``max_doc_tokens`` tokens becomes its own segment.
Tokens are counted by ``count_tokens`` when given, else ``len(tokenizer.encode(text,
add_special_tokens=False))`` when a tokenizer is given, else by ``count_words``: the number of
whitespace-separated words, an approximation (BPE tokenizers give about 1.3 tokens per English word
and more for code, so leave headroom when the real limit matters).

Bad input is counted, never fatal: empty, binary (NUL bytes), non-UTF-8 or unreadable files, files of
other extensions inside a folder, JSONL lines with invalid JSON, without the text field, with a
non-string or empty one (and parquet / datasets rows likewise) are skipped; one warning per corpus
names them (up to 10, then a count). ``Corpus.stats.as_dict()`` gives the counts for the metrics.

Tests: ``pytest tests/test_corpus.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "pydoc"
SUPPORTED_EXTENSIONS = (".txt", ".md", ".jsonl", ".parquet")
FILE_SKIP_REASONS = ("empty", "binary", "undecodable", "unreadable", "unsupported", "no_text_column")
LINE_SKIP_REASONS = ("invalid_json", "missing_text", "non_string_text", "empty_text")
_MAX_NAMED = 10
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

CountTokens = Callable[[str], int]
Pieces = list[tuple[str, int]]  # (text, its token count)


@dataclass
class CorpusConfig:
    """Where the documents come from and how they are cut and shuffled."""

    source: str = DEFAULT_SOURCE  # "pydoc", a file, a folder, a datasets folder or a HF dataset name
    max_doc_tokens: int = 6000  # most tokens in one segment (SPICE: documents up to about 6,000)
    seed: int = 0  # shuffling seed: epoch e is permutation (seed, e)
    text_field: str = "text"  # field of .jsonl lines, column of .parquet files and datasets
    split: str = "train"  # split of a Hugging Face dataset or of a saved DatasetDict
    dataset_config: str | None = None  # configuration name of a Hugging Face dataset (load_dataset's 2nd)

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"source: expected a non-empty string, got {self.source!r}")
        if isinstance(self.max_doc_tokens, bool) or not isinstance(self.max_doc_tokens, int):
            raise ValueError(f"max_doc_tokens: expected an int, got {self.max_doc_tokens!r}")
        if self.max_doc_tokens <= 0:
            raise ValueError(f"max_doc_tokens: expected > 0, got {self.max_doc_tokens}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an int, got {self.seed!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"text_field: expected a non-empty string, got {self.text_field!r}")


@dataclass(frozen=True)
class Document:
    """One segment of one source document: what the challenger reads."""

    text: str  # the segment, at most max_doc_tokens tokens
    source: str  # file path (":line" for JSONL, "[row]" for parquet), "name[index]" or "pydoc:topic"
    segment: int  # index of this segment within its source document, from 0


@dataclass
class CorpusStats:
    """What reading the source found; ``as_dict()`` flattens it for the metrics."""

    files_read: int = 0  # files opened and parsed (a JSONL file whose lines all fail still counts)
    files_skipped: Counter = field(default_factory=Counter)  # reason (FILE_SKIP_REASONS) -> files
    lines_skipped: Counter = field(default_factory=Counter)  # reason (LINE_SKIP_REASONS) -> lines/rows
    documents: int = 0  # source documents with text
    segments: int = 0  # segments after cutting, the unit that is shuffled and served
    skipped_names: list[str] = field(default_factory=list)  # first _MAX_NAMED "name (reason)"

    def skip(self, counter: Counter, name: str, reason: str) -> None:
        counter[reason] += 1
        if len(self.skipped_names) < _MAX_NAMED:
            self.skipped_names.append(f"{name} ({reason})")

    def as_dict(self) -> dict[str, int]:
        out = {"files_read": self.files_read, "files_skipped": sum(self.files_skipped.values())}
        out.update({f"files_skipped_{r}": self.files_skipped[r] for r in FILE_SKIP_REASONS})
        out["lines_skipped"] = sum(self.lines_skipped.values())
        out.update({f"lines_skipped_{r}": self.lines_skipped[r] for r in LINE_SKIP_REASONS})
        out.update(documents=self.documents, segments=self.segments)
        return out


def count_words(text: str) -> int:
    """Whitespace-separated words: the default token count when no tokenizer is given."""
    return len(text.split())


# --------------------------------------------------------------------------------------------------
# Segmentation


def _lines(text: str) -> list[str]:
    return text.split("\n")


def _words(text: str) -> list[str]:
    return text.split()


# (split, joiner) from the coarsest boundary to the finest; characters come after the last.
_LEVELS: tuple[tuple[Callable[[str], list[str]], str], ...] = (
    (_PARAGRAPH_BREAK.split, "\n\n"),
    (_lines, "\n"),
    (_SENTENCE_END.split, " "),
    (_words, " "),
)


def segment_text(text: str, max_tokens: int, count_tokens: CountTokens = count_words) -> list[str]:
    """Cut ``text`` into non-empty segments of at most ``max_tokens`` tokens, on the coarsest
    boundaries possible (paragraphs, lines, sentences, words, characters)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"max_tokens: expected an int > 0, got {max_tokens!r}")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.strip():
        return []
    pieces = _split(text, 0, max_tokens, count_tokens)
    return [s for s in (piece.lstrip("\n").rstrip() for piece, _ in pieces) if s]


def _split(text: str, level: int, budget: int, count: CountTokens) -> Pieces:
    if level == len(_LEVELS):
        return _cut_characters(text, budget, count)
    split, joiner = _LEVELS[level]
    parts: Pieces = []
    for part in split(text):
        part = part.rstrip()
        if not part.strip():
            continue
        num_tokens = count(part)
        if num_tokens <= budget:
            parts.append((part, num_tokens))
        else:
            parts.extend(_split(part, level + 1, budget, count))
    return _pack(parts, joiner, budget, count)


def _pack(parts: Pieces, joiner: str, budget: int, count: CountTokens) -> Pieces:
    # Greedy on the summed counts, then the joined text is counted for real and shortened from the
    # end while it is over the budget (tokenizers merge across joins, so sums are only estimates).
    joiner_tokens = count(joiner)
    out: Pieces = []
    i = 0
    while i < len(parts):
        j, total = i + 1, parts[i][1]
        while j < len(parts) and total + joiner_tokens + parts[j][1] <= budget:
            total += joiner_tokens + parts[j][1]
            j += 1
        while j - i > 1:
            text = joiner.join(p for p, _ in parts[i:j])
            total = count(text)
            if total <= budget:
                out.append((text, total))
                break
            j -= 1
        else:
            out.append(parts[i])
        i = j
    return out


def _cut_characters(text: str, budget: int, count: CountTokens) -> Pieces:
    out: Pieces = []
    while text:
        num_tokens = count(text)
        if num_tokens <= budget:
            out.append((text, num_tokens))
            break
        lo, hi = 1, len(text) - 1  # the longest prefix within the budget, at least one character
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(text[:mid]) <= budget:
                lo = mid
            else:
                hi = mid - 1
        out.append((text[:lo], count(text[:lo])))
        text = text[lo:]
    return out


# --------------------------------------------------------------------------------------------------
# Sources: each reader yields (name, text) and counts what it skips in stats


def _read_source(config: CorpusConfig, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    source = config.source
    if source == DEFAULT_SOURCE:
        yield from _read_pydoc()
        return
    if source.startswith("hf:"):
        yield from _read_hub(source[3:], config, stats)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        if _is_datasets_dir(path):
            yield from _read_datasets_dir(path, config, stats)
        else:
            yield from _read_folder(path, config, stats)
    elif path.is_file():
        if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
            raise ValueError(
                f"source: unsupported extension {path.suffix!r} of {str(path)!r} "
                f"(supported: {', '.join(SUPPORTED_EXTENSIONS)})"
            )
        yield from _read_file(path, config, stats)
    elif _HUB_NAME.fullmatch(source) and not source.lower().endswith(SUPPORTED_EXTENSIONS):
        yield from _read_hub(source, config, stats)
    else:
        raise ValueError(f"source: path does not exist: {source!r}")


def _is_datasets_dir(path: Path) -> bool:
    # What save_to_disk writes: dataset_dict.json for a DatasetDict, state.json + dataset_info.json else.
    if (path / "dataset_dict.json").is_file():
        return True
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _read_pydoc() -> Iterator[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError as e:
        raise ImportError(
            "source 'pydoc' needs pydoc_data.topics, which this Python installation lacks "
            "(some distributions split it out); give a corpus folder or file instead"
        ) from e
    for name in sorted(topics):
        yield f"pydoc:{name}", topics[name]


def _read_folder(root: Path, config: CorpusConfig, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    for folder, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            if filename.startswith("."):
                continue
            path = Path(folder) / filename
            if path.suffix.lower() not in SUPPORTED_EXTENSIONS:
                stats.skip(stats.files_skipped, str(path), "unsupported")
                continue
            yield from _read_file(path, config, stats)


def _read_file(path: Path, config: CorpusConfig, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, config, stats)
        return
    text = _read_text(path, stats)
    if text is None:
        return
    stats.files_read += 1
    if suffix == ".jsonl":
        yield from _read_jsonl_text(path, text, config.text_field, stats)
    else:
        yield str(path), text


def _read_text(path: Path, stats: CorpusStats) -> str | None:
    try:
        data = path.read_bytes()
    except OSError:
        stats.skip(stats.files_skipped, str(path), "unreadable")
        return None
    if b"\x00" in data:
        stats.skip(stats.files_skipped, str(path), "binary")
        return None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        stats.skip(stats.files_skipped, str(path), "undecodable")
        return None
    if not text.strip():
        stats.skip(stats.files_skipped, str(path), "empty")
        return None
    return text


def _read_jsonl_text(path: Path, text: str, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    # split("\n") rather than splitlines(): JSON strings may hold a raw U+2028, which is not a line end.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            stats.skip(stats.lines_skipped, f"{path}:{line_no}", "invalid_json")
            continue
        value = record.get(text_field) if isinstance(record, dict) else None
        document = _record_text(value, f"{path}:{line_no}", stats)
        if document is not None:
            yield document


def _record_text(value: Any, name: str, stats: CorpusStats) -> tuple[str, str] | None:
    if value is None:
        stats.skip(stats.lines_skipped, name, "missing_text")
    elif not isinstance(value, str):
        stats.skip(stats.lines_skipped, name, "non_string_text")
    elif not value.strip():
        stats.skip(stats.lines_skipped, name, "empty_text")
    else:
        return name, value
    return None


def _read_parquet(path: Path, config: CorpusConfig, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading {str(path)!r} needs pyarrow: pip install pyarrow") from e
    try:
        if path.stat().st_size == 0:
            stats.skip(stats.files_skipped, str(path), "empty")
            return
        parquet = pq.ParquetFile(path)
        if config.text_field not in parquet.schema_arrow.names:
            stats.skip(stats.files_skipped, str(path), "no_text_column")
            return
        values = parquet.read(columns=[config.text_field]).column(config.text_field).to_pylist()
    except (OSError, ValueError):  # pyarrow: ArrowIOError is OSError, ArrowInvalid a ValueError
        stats.skip(stats.files_skipped, str(path), "unreadable")
        return
    stats.files_read += 1
    for row, value in enumerate(values):
        document = _record_text(value, f"{path}[{row}]", stats)
        if document is not None:
            yield document


def _import_datasets(source: str) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"source {source!r} is a Hugging Face dataset (no such local file or folder, or a "
            "datasets folder), which needs the datasets package: pip install datasets"
        ) from e
    return datasets


def _read_datasets_dir(path: Path, config: CorpusConfig, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    datasets = _import_datasets(str(path))
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if config.split not in dataset:
            raise ValueError(f"split: {config.split!r} is not in {str(path)!r} (splits: {sorted(dataset)})")
        dataset = dataset[config.split]
    yield from _read_dataset(dataset, str(path), config.text_field, stats)


def _read_hub(name: str, config: CorpusConfig, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    datasets = _import_datasets(name)
    try:
        dataset = datasets.load_dataset(name, config.dataset_config, split=config.split)
    except (OSError, ValueError) as e:  # DatasetNotFoundError is a FileNotFoundError; network: OSError
        raise ValueError(
            f"source: {name!r} is no local file or folder, and loading it as a Hugging Face dataset "
            f"(config {config.dataset_config!r}, split {config.split!r}) failed: {e}"
        ) from e
    yield from _read_dataset(dataset, name, config.text_field, stats)


def _read_dataset(dataset: Any, name: str, text_field: str, stats: CorpusStats) -> Iterator[tuple[str, str]]:
    if text_field not in dataset.column_names:
        columns = dataset.column_names
        raise ValueError(f"text_field: {text_field!r} is not a column of {name!r} (columns: {columns})")
    for index, value in enumerate(dataset[text_field]):
        document = _record_text(value, f"{name}[{index}]", stats)
        if document is not None:
            yield document


def _warn_skips(source: str, stats: CorpusStats) -> None:
    num_files, num_lines = sum(stats.files_skipped.values()), sum(stats.lines_skipped.values())
    if num_files + num_lines == 0:
        return
    counts = []
    if num_files:
        counts.append(f"{num_files} files ({_reasons(stats.files_skipped)})")
    if num_lines:
        counts.append(f"{num_lines} lines or rows ({_reasons(stats.lines_skipped)})")
    num_more = num_files + num_lines - len(stats.skipped_names)
    more = f" and {num_more} more" if num_more else ""
    logger.warning(
        "corpus %r: skipped %s: %s%s", source, " and ".join(counts), ", ".join(stats.skipped_names), more
    )


def _reasons(counter: Counter) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counter.items()))


# --------------------------------------------------------------------------------------------------
# The corpus


class Corpus:
    """Segments of a source in a seeded, resumable, epoch-by-epoch shuffled order.

    All segments are held in memory (a 20k-document corpus of 6k-token segments is a few hundred MB).
    """

    def __init__(
        self, config: CorpusConfig, *, tokenizer: Any = None, count_tokens: CountTokens | None = None
    ) -> None:
        if not isinstance(config, CorpusConfig):
            raise TypeError(f"config: expected a CorpusConfig, got {type(config).__name__}")
        if tokenizer is not None and count_tokens is not None:
            raise ValueError("tokenizer, count_tokens: give at most one of them, got both")
        if count_tokens is None:
            if tokenizer is None:
                count_tokens = count_words
            elif not callable(getattr(tokenizer, "encode", None)):
                kind = type(tokenizer).__name__
                raise TypeError(f"tokenizer: expected an object with encode(), got {kind}")
            else:
                count_tokens = lambda text: len(tokenizer.encode(text, add_special_tokens=False))
        elif not callable(count_tokens):
            raise TypeError(f"count_tokens: expected a callable, got {type(count_tokens).__name__}")
        self.config = config
        self.count_tokens = count_tokens
        self.stats = CorpusStats()
        documents: list[Document] = []
        digest = hashlib.sha256()
        for name, text in _read_source(config, self.stats):
            segments = segment_text(text, config.max_doc_tokens, count_tokens)
            if segments:
                self.stats.documents += 1
            for index, segment in enumerate(segments):
                documents.append(Document(text=segment, source=name, segment=index))
                digest.update(segment.encode("utf-8", "surrogatepass") + b"\x00")
        self.stats.segments = len(documents)
        _warn_skips(config.source, self.stats)
        if not documents:
            raise ValueError(
                f"source: {config.source!r} has no usable document "
                f"(files skipped: {_reasons(self.stats.files_skipped) or 0}; "
                f"lines or rows skipped: {_reasons(self.stats.lines_skipped) or 0})"
            )
        self.documents: tuple[Document, ...] = tuple(documents)
        self.fingerprint = digest.hexdigest()[:16]  # identifies the segments, checked on resume
        self._seed = config.seed
        self._epoch = 0
        self._position = 0
        self._order = self._permutation(0)

    @classmethod
    def default(
        cls,
        max_doc_tokens: int = 6000,
        seed: int = 0,
        *,
        tokenizer: Any = None,
        count_tokens: CountTokens | None = None,
    ) -> Corpus:
        """The embedded corpus: the Python language reference topics (``pydoc_data.topics``)."""
        config = CorpusConfig(source=DEFAULT_SOURCE, max_doc_tokens=max_doc_tokens, seed=seed)
        return cls(config, tokenizer=tokenizer, count_tokens=count_tokens)

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        return self._position

    def _permutation(self, epoch: int) -> list[int]:
        # A string seed goes through SHA-512 in random.seed: the same order on every run and platform.
        order = list(range(len(self.documents)))
        random.Random(f"spice_fast.corpus:{self._seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, num_docs: int) -> list[Document]:
        """The next ``num_docs`` segments; crosses into the next epoch (new permutation) as needed."""
        if isinstance(num_docs, bool) or not isinstance(num_docs, int) or num_docs < 0:
            raise ValueError(f"num_docs: expected an int >= 0, got {num_docs!r}")
        batch: list[Document] = []
        while len(batch) < num_docs:
            if self._position == len(self._order):
                self._epoch += 1
                self._position = 0
                self._order = self._permutation(self._epoch)
            take = min(num_docs - len(batch), len(self._order) - self._position)
            batch.extend(self.documents[i] for i in self._order[self._position : self._position + take])
            self._position += take
        return batch

    def __iter__(self) -> Iterator[Document]:
        """Endless: one segment at a time, advancing the same position as ``next_batch``."""
        while True:
            yield self.next_batch(1)[0]

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self._seed,
            "epoch": self._epoch,
            "position": self._position,
            "num_documents": len(self.documents),
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise ValueError(f"state: expected a dict, got {type(state).__name__}")
        for key in ("seed", "epoch", "position", "num_documents"):
            value = state.get(key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"state[{key!r}]: expected an int, got {value!r}")
        if state["num_documents"] != len(self.documents) or state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"state: saved for a different corpus ({state['num_documents']} segments, fingerprint "
                f"{state.get('fingerprint')!r}) than this one ({len(self.documents)}, {self.fingerprint!r}); "
                "same source, max_doc_tokens and token counting are needed to resume"
            )
        if state["epoch"] < 0 or not 0 <= state["position"] <= len(self.documents):
            raise ValueError(
                f"state: epoch {state['epoch']} must be >= 0 and position {state['position']} "
                f"within [0, {len(self.documents)}]"
            )
        self._seed = state["seed"]
        self._epoch = state["epoch"]
        self._position = state["position"]
        self._order = self._permutation(self._epoch)
