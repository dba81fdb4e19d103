"""The data every stage shares: corpus, queries, qrels, pools, and the readers for their files.

This is the one home of these types. It lives in ``retriever`` (not ``eval``) because training reads
corpora and pools too, and ``retriever`` imports neither ``mining`` nor ``eval``.

Readers accept BEIR folders (``corpus.jsonl[.gz]``, ``queries.jsonl[.gz]``, ``qrels/<split>.tsv``,
CRLF or LF) and MS MARCO passage files (``collection.tsv``, ``queries.*.tsv``, qrels as TSV or as TREC
``qid 0 pid rel``). A byte-order mark on the first line is read as the encoding marker it is, on any file.
A qrels row naming a document that is not in the corpus is kept for evaluation (the document can never be
retrieved and its query still counts, as in BEIR and MTEB) but never used as a positive; a row naming an
unknown query is dropped (there is no text to search with). Both are counted. Ids with whitespace or control
characters are refused, since the run files and TSVs hardneg writes separate fields by whitespace. Any
malformed line raises :class:`~retriever.io.DataError` naming file, line and field.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import random
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from retriever.io import DataError, HardnegError, atomic_write, file_checksum

Queries = dict[str, str]
"""query id -> query text"""
Qrels = dict[str, dict[str, int]]
"""query id -> {document id -> graded relevance}; a grade <= 0 means judged non-relevant"""
Run = dict[str, dict[str, float]]
"""query id -> {document id -> score}; higher is better"""

BUNDLED_DIR = Path(__file__).parent / "bundled"


def standardized(row: dict[str, float], mean: float, deviation: float) -> dict[str, float]:
    """One query's scores as z-scores, ``(score - mean) / deviation``, with the mean and deviation of its scores
    over the whole corpus (``retriever.protocol.StandardizedScorer``); all 0 when the query scores every document
    alike (nothing to tell the documents apart by)."""
    if not deviation > 1e-12:
        return dict.fromkeys(row, 0.0)
    return {doc_id: float((score - mean) / deviation) for doc_id, score in row.items()}


@dataclass
class Corpus:
    """Documents in file order. ``text(i)`` is what encoders and BM25 see: title and body joined."""

    ids: list[str]
    titles: list[str]
    bodies: list[str]
    path: Path | None = field(default=None, compare=False)
    position: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.position = {doc_id: i for i, doc_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:  # the dataclass repr would print every document
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"Corpus({len(self.ids):,} documents{where})"

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self.position

    def text(self, i: int) -> str:
        # BEIR and sentence-transformers join title and body with a space; so do we, to match their numbers.
        title, body = self.titles[i], self.bodies[i]
        return f"{title} {body}".strip() if title else body

    def texts(self) -> list[str]:
        return [self.text(i) for i in range(len(self.ids))]

    def text_of(self, doc_id: str) -> str:
        return self.text(self.position[doc_id])


def corpus_fingerprint(corpus: Corpus) -> str:
    """sha256 over document ids and the exact texts the encoder sees (so a subset or edit changes it): the key of
    cached embeddings, and what ties mined pools to the corpus they were mined on."""
    cached = getattr(corpus, "_hardneg_fingerprint", None)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    for i, doc_id in enumerate(corpus.ids):
        digest.update(doc_id.encode("utf-8") + b"\x00" + corpus.text(i).encode("utf-8") + b"\x01")
    value = digest.hexdigest()
    object.__setattr__(corpus, "_hardneg_fingerprint", value)
    return value


@dataclass
class Dataset:
    """One split of a retrieval dataset, with qrels already checked against corpus and queries.

    ``queries`` holds only the queries that have at least one judged document in ``qrels``.
    ``skipped_qrels`` counts qrels rows dropped because their query is unknown; ``unretrievable_qrels`` the rows
    kept although their document is not in the corpus (evaluation counts them, mining cannot use them);
    ``duplicate_qrels`` identical rows read once. ``files`` are the input files, checksummed into every
    output's provenance record.
    """

    name: str
    split: str
    corpus: Corpus
    queries: Queries
    qrels: Qrels
    files: list[Path]
    skipped_qrels: int = 0
    unretrievable_qrels: int = 0
    duplicate_qrels: int = 0

    def __repr__(self) -> str:
        judged = sum(len(judged) for judged in self.qrels.values())
        return (f"Dataset({self.name}/{self.split}: {len(self.queries):,} queries, {judged:,} judgements, "
                f"{len(self.corpus):,} documents)")

    def checksums(self) -> dict[str, str]:
        return {str(path): file_checksum(path) for path in self.files}

    def relevant(self, query_id: str) -> dict[str, int]:
        """The documents of the corpus judged relevant (grade > 0) for a query: the positives to mine and train
        with. Evaluation reads ``qrels`` itself, where a judged document missing from the corpus still counts."""
        return {doc_id: grade for doc_id, grade in self.qrels.get(query_id, {}).items()
                if grade > 0 and doc_id in self.corpus}

    def qrels_counts(self) -> dict[str, int]:
        """What reading the qrels dropped, kept or merged, for the provenance records of every output."""
        return {"skipped_qrels_rows": self.skipped_qrels, "unretrievable_qrels_rows": self.unretrievable_qrels,
                "duplicate_qrels_rows": self.duplicate_qrels}


# ---------------------------------------------------------------------------------------------- lines


def _open_binary(path: Path) -> IO[bytes]:
    # Binary, so that each line is decoded on its own: a text stream decodes ahead in blocks, and an
    # invalid byte on line 3 of a small file would be reported on line 1.
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its end-of-line), decoding strictly so bad bytes are located.

    Lines end at "\\n"; a trailing "\\r" is stripped, since BEIR ships qrels with CRLF. A UTF-8 byte-order
    mark opening the file is dropped (Windows editors write one): kept, it would become part of the first id.
    """
    if not path.is_file():
        raise DataError(path, "file not found", hint="check the path")
    number = 0
    try:
        with _open_binary(path) as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(path, f"not valid UTF-8 ({err.reason} at byte {err.start + 1} of the line)",
                                    line=number, hint="re-encode the file as UTF-8") from None
                if number == 1:
                    line = line.removeprefix("\ufeff")
                yield number, line.rstrip("\r\n")
    except (OSError, EOFError) as err:  # a truncated .gz, for example
        raise DataError(path, f"cannot be read: {err}", line=number + 1) from None


def _json_records(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(path, f"malformed JSON ({err.msg} at column {err.colno})", line=number,
                            hint="each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(path, "expected a JSON object", line=number)
        yield number, record


def _string_field(path: Path, number: int, record: dict, name: str, *, required: bool = True) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise DataError(path, "missing", line=number, field=name)
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name == "_id":
        return str(value)
    if not isinstance(value, str):
        raise DataError(path, f"expected a string, got {type(value).__name__}", line=number, field=name)
    return value


def id_problem(value: object) -> str | None:
    """Why ``value`` cannot be an id in the files hardneg writes (TREC runs, TSVs), or None when it can.

    Whitespace and control characters split or break a line; format characters (a zero-width joiner in a
    Persian title) do not, and stay allowed.
    """
    if not isinstance(value, str):
        return f"is not a string ({type(value).__name__})"
    if not value:
        return "is empty"
    if value.isprintable() and " " not in value:  # the common case, at C speed
        return None
    for char in value:
        if char.isspace() or unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            name = unicodedata.name(char, "")
            return f"contains {name} ({char!r})" if name else f"contains the control character {char!r}"
    return None


def _checked_id(path: Path, number: int, field: str, value: str) -> str:
    problem = id_problem(value)
    if problem:
        raise DataError(path, f"id {value!r} {problem}", line=number, field=field,
                        hint="ids must have no whitespace or control characters: TREC run files and TSVs "
                             "separate fields by whitespace")
    return value


def _check_unique(seen: set[str], doc_id: str, path: Path, number: int) -> None:
    if doc_id in seen:
        raise DataError(path, f"duplicate id {doc_id!r}", line=number, field="_id",
                        hint="ids must be unique within a file")
    seen.add(doc_id)


# --------------------------------------------------------------------------------------------- corpus


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Read a BEIR ``corpus.jsonl[.gz]`` or an MS MARCO ``collection.tsv[.gz]`` (``pid<TAB>text``)."""
    path = Path(path)
    ids: list[str] = []
    titles: list[str] = []
    bodies: list[str] = []
    seen: set[str] = set()
    if _is_tsv(path):
        for number, line in numbered_lines(path):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2:
                raise DataError(path, "expected 'pid<TAB>text'", line=number, field="text")
            doc_id, body = _checked_id(path, number, "pid", parts[0].strip()), "\t".join(parts[1:]).strip()
            _check_unique(seen, doc_id, path, number)
            if not body:
                raise DataError(path, f"empty text for document {doc_id!r}", line=number, field="text")
            ids.append(doc_id)
            titles.append("")
            bodies.append(body)
    else:
        for number, record in _json_records(path):
            doc_id = _checked_id(path, number, "_id", _string_field(path, number, record, "_id").strip())
            body = _string_field(path, number, record, "text")
            title = _string_field(path, number, record, "title", required=False)
            _check_unique(seen, doc_id, path, number)
            if not body.strip() and not title.strip():
                raise DataError(path, f"document {doc_id!r} has neither title nor text", line=number,
                                field="text", hint="remove the document or give it text")
            ids.append(doc_id)
            titles.append(title.strip())
            bodies.append(body.strip())
    if not ids:
        raise DataError(path, "the corpus is empty", hint="expected at least one document")
    return Corpus(ids=ids, titles=titles, bodies=bodies, path=path)


# -------------------------------------------------------------------------------------------- queries


def load_queries(path: str | os.PathLike) -> Queries:
    """Read a BEIR ``queries.jsonl[.gz]`` or an MS MARCO ``queries.*.tsv`` (``qid<TAB>text``)."""
    path = Path(path)
    queries: Queries = {}
    if _is_tsv(path):
        for number, line in numbered_lines(path):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or not parts[1].strip():
                raise DataError(path, "expected 'qid<TAB>text' with non-empty text", line=number, field="text")
            query_id = _checked_id(path, number, "qid", parts[0].strip())
            if query_id in queries:
                raise DataError(path, f"duplicate id {query_id!r}", line=number, field="qid")
            queries[query_id] = "\t".join(parts[1:]).strip()
    else:
        for number, record in _json_records(path):
            query_id = _checked_id(path, number, "_id", _string_field(path, number, record, "_id").strip())
            text = _string_field(path, number, record, "text").strip()
            if query_id in queries:
                raise DataError(path, f"duplicate id {query_id!r}", line=number, field="_id")
            if not text:
                raise DataError(path, f"empty text for query {query_id!r}", line=number, field="text")
            queries[query_id] = text
    if not queries:
        raise DataError(path, "no queries found")
    return queries


# ---------------------------------------------------------------------------------------------- qrels


def load_qrels(path: str | os.PathLike) -> Qrels:
    """Read qrels in any of the three layouts users have.

    * BEIR ``query-id<TAB>corpus-id<TAB>score`` with a header line;
    * MS MARCO ``qid<TAB>0<TAB>pid<TAB>rel``;
    * TREC ``qid 0 docid rel`` separated by spaces (anserini's qrels files).
    The layout is decided by the number of columns of the first data line and then enforced. A (query,
    document) pair judged twice with the same grade is read once (:func:`read_qrels` counts it); with two
    different grades it is an error naming both lines, since any choice between them changes the scores.
    """
    return read_qrels(path)[0]


def read_qrels(path: str | os.PathLike) -> tuple[Qrels, int]:
    """:func:`load_qrels` and the number of identical duplicate rows it read once."""
    path = Path(path)
    qrels: Qrels = {}
    first_line: dict[tuple[str, str], int] = {}
    duplicates = 0
    columns = None
    for number, line in numbered_lines(path):
        if not line.strip():
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if number == 1 and len(parts) >= 3 and not _is_int(parts[-1]):
            continue  # header, e.g. "query-id corpus-id score"
        if columns is None:
            columns = len(parts)
            if columns not in (3, 4):
                raise DataError(path, f"expected 3 columns (qid docid grade) or 4 (qid 0 docid grade), "
                                f"found {columns}", line=number, field="columns")
        if len(parts) != columns:
            raise DataError(path, f"expected {columns} columns like the first line, found {len(parts)}",
                            line=number, field="columns")
        query_id, doc_id, grade = (parts[0], parts[1], parts[2]) if columns == 3 else (parts[0], parts[2], parts[3])
        if not _is_int(grade):
            raise DataError(path, f"relevance grade {grade!r} is not an integer", line=number, field="score")
        query_id = _checked_id(path, number, "query-id", query_id.strip())
        doc_id = _checked_id(path, number, "corpus-id", doc_id.strip())
        judged = qrels.setdefault(query_id, {})
        if doc_id in judged:
            if judged[doc_id] != int(grade):
                raise DataError(path, f"query {query_id!r} judges document {doc_id!r} twice, {judged[doc_id]} on "
                                f"line {first_line[query_id, doc_id]} and {int(grade)} here", line=number,
                                field="score", hint="keep one judgement per (query, document)")
            duplicates += 1
            continue
        judged[doc_id] = int(grade)
        first_line[query_id, doc_id] = number
    if not qrels:
        raise DataError(path, "no qrels rows found")
    return qrels, duplicates


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _is_tsv(path: Path) -> bool:
    return path.name.removesuffix(".gz").endswith((".tsv", ".txt"))


# ----------------------------------------------------------------------------------------- datasets


def resolve_qrels(qrels: Qrels, corpus: Corpus, queries: Queries) -> tuple[Qrels, int, int]:
    """Check qrels against the queries and the corpus: (kept rows, rows dropped for an unknown query, kept rows
    whose document is not in the corpus).

    A judged document missing from the corpus stays: BEIR and MTEB evaluate with the qrels as given, so such a
    document lowers recall and nDCG (it can never be retrieved) and a query whose relevant documents are all
    missing still counts, at 0. Dropping them would move the mean away from the published figures.
    """
    kept: Qrels = {}
    skipped = unretrievable = 0
    for query_id, judged in qrels.items():
        if query_id not in queries:
            skipped += len(judged)
            continue
        unretrievable += sum(1 for doc_id in judged if doc_id not in corpus)
        kept[query_id] = dict(judged)
    return kept, skipped, unretrievable


def build_dataset(name: str, split: str, corpus_path: Path, queries_path: Path, qrels_path: Path) -> Dataset:
    """Read the three files of a split and check them against each other."""
    corpus = load_corpus(corpus_path)
    all_queries = load_queries(queries_path)
    judged, duplicates = read_qrels(qrels_path)
    qrels, skipped, unretrievable = resolve_qrels(judged, corpus, all_queries)
    if not any(doc_id in corpus for judged in qrels.values() for doc_id in judged):
        raise DataError(qrels_path, "no qrels row refers to a known query and document",
                        hint=f"are {queries_path.name} and {corpus_path.name} from the same dataset?")
    queries = {query_id: all_queries[query_id] for query_id in qrels}
    return Dataset(name=name, split=split, corpus=corpus, queries=queries, qrels=qrels,
                   files=[corpus_path, queries_path, qrels_path], skipped_qrels=skipped,
                   unretrievable_qrels=unretrievable, duplicate_qrels=duplicates)


def bundled_datasets() -> list[str]:
    """Names of the datasets shipped inside the package (usable offline)."""
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "qrels").is_dir()) if BUNDLED_DIR.is_dir() else []


def dataset_folder(data: str | os.PathLike, *, show_progress: bool = True) -> Path:
    """The folder of a dataset given as a path, a bundled name (``nfcorpus-demo``), or a BEIR name.

    ``beir:NAME`` downloads BEIR's ``NAME.zip`` into the cache on first use (md5-checked, see
    :mod:`retriever.download`); a bare BEIR name (``scifact``) that is not a folder is looked up in the
    cache only, so nothing is downloaded unless asked.
    """
    from retriever.download import BEIR_MD5, BEIR_PREFIX, cache_dir, cached_folder, offline_hint, resolve_beir

    text = str(data)
    if text.startswith(BEIR_PREFIX):
        return resolve_beir(text[len(BEIR_PREFIX):], show_progress=show_progress)
    folder = Path(data).expanduser()  # "~/data/scifact" from a YAML config, where no shell expands it
    if not folder.exists() and text in bundled_datasets():
        folder = BUNDLED_DIR / text
    if not folder.exists() and text in BEIR_MD5:
        cached = cached_folder(text)
        if cached is not None:
            return cached
        raise DataError(folder, "dataset folder not found",
                        hint=f"--data {BEIR_PREFIX}{text} downloads BEIR's {text} into {cache_dir()}; "
                             + offline_hint(text, cache_dir()))
    if not folder.is_dir():
        known = ", ".join(bundled_datasets()) or "none"
        raise DataError(folder, "dataset folder not found",
                        hint=f"give a BEIR folder with corpus.jsonl, queries.jsonl and qrels/, a bundled name "
                             f"({known}), or {BEIR_PREFIX}NAME to download a BEIR dataset")
    return folder


def load_beir(folder: str | os.PathLike, split: str) -> Dataset:
    """Load one split of a BEIR-format folder, or of a bundled dataset given by name (``nfcorpus-demo``)."""
    folder = dataset_folder(folder)
    corpus_path = _first_existing(folder, ["corpus.jsonl", "corpus.jsonl.gz"])
    queries_path = _first_existing(folder, ["queries.jsonl", "queries.jsonl.gz"])
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not qrels_path.is_file():
        splits = sorted(p.stem for p in (folder / "qrels").glob("*.tsv"))
        raise DataError(qrels_path, f"no qrels for split {split!r}", hint=f"available splits: {splits}")
    return build_dataset(folder.name, split, corpus_path, queries_path, qrels_path)


def _first_existing(folder: Path, names: list[str]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise DataError(folder / names[0], "file not found", hint=f"expected one of {names} in {folder}")


def load_msmarco(collection: str | os.PathLike, queries: str | os.PathLike, qrels: str | os.PathLike,
                 split: str = "dev") -> Dataset:
    """Load MS MARCO passage files (collection.tsv, queries.*.tsv, qrels TSV or TREC)."""
    return build_dataset("msmarco", split, Path(collection), Path(queries), Path(qrels))


# ---------------------------------------------------------------------------------------------- pools


@dataclass
class Candidate:
    """A scored document in a pool. ``rank`` and ``source`` are set for negatives (1-based rank)."""

    doc_id: str
    score: float | None
    rank: int | None = None
    source: str | None = None

    def to_json(self) -> dict:
        record = {"doc_id": self.doc_id, "score": self.score}
        if self.rank is not None:
            record["rank"] = self.rank
        if self.source is not None:
            record["source"] = self.source
        return record


@dataclass
class Pool:
    """The mined training example of one query: its positives and the negatives kept for it."""

    query_id: str
    query: str
    positives: list[Candidate]
    negatives: list[Candidate]

    def __repr__(self) -> str:
        return f"Pool({self.query_id!r}: {len(self.positives)} positives, {len(self.negatives)} negatives)"

    def to_json(self) -> dict:
        return {"query_id": self.query_id, "query": self.query,
                "positives": [p.to_json() for p in self.positives],
                "negatives": [n.to_json() for n in self.negatives]}

    def to_line(self) -> str:
        """The pool as one line of ``pools.jsonl`` (the one place that format is written)."""
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(", ", ": ")) + "\n"


POOLS_FILE = "pools.jsonl"
POOLS_META = "pools.meta.json"


def pools_file(path: str | os.PathLike) -> Path:
    """``pools.jsonl`` itself, or the one in the folder ``path``."""
    path = Path(path)
    return path / POOLS_FILE if path.is_dir() else path


def pools_scorer(path: str | os.PathLike) -> str | None:
    """The teacher or cross-encoder whose scores the pools carry (from ``pools.meta.json`` beside them), or None
    when they carry the retriever's own scores or no metadata says otherwise (pools not written by ``mine``)."""
    return ((read_pools_meta(path) or {}).get("settings") or {}).get("rescorer")


_META_OBJECTS = ("settings", "config", "corpus", "counts")  # sections of pools.meta.json read as objects


def read_pools_meta(path: str | os.PathLike) -> dict | None:
    """``pools.meta.json`` beside the pools (how they were mined: settings, counts, the corpus), or None when
    there is none (pools written by another tool)."""
    meta = pools_file(path).parent / POOLS_META
    if not meta.is_file():
        return None
    try:
        record = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(meta, f"not readable JSON ({err})") from None
    if not isinstance(record, dict):
        raise DataError(meta, "not a JSON object")
    for key in _META_OBJECTS:  # what training, re-mining and the model card read from it
        if record.get(key) is not None and not isinstance(record[key], dict):
            raise DataError(meta, f"expected a JSON object, got {record[key]!r}"[:200], field=key,
                            hint="was the file edited? mine again to rewrite it")
    settings = record.get("settings") or {}
    if settings.get("filter") is not None and not isinstance(settings["filter"], dict):
        raise DataError(meta, f"expected a JSON object, got {settings['filter']!r}"[:200], field="settings.filter",
                        hint="was the file edited? mine again to rewrite it")
    return record


def hold_out(pools: list[Pool], fraction: float, seed: int) -> tuple[list[Pool], list[Pool]]:
    """Split pools by query into (train, dev): the queries of :func:`held_out_ids` are held out."""
    held = held_out_ids([pool.query_id for pool in pools], fraction, seed)
    return [p for p in pools if p.query_id not in held], [p for p in pools if p.query_id in held]


def held_out_ids(query_ids: list[str], fraction: float, seed: int) -> set[str]:
    """A seeded ``fraction`` of ``query_ids``, at least one: the dev queries of ``dev_fraction``.

    The choice depends only on the query ids and the seed, so the same queries are held out whatever the pools'
    order or mining settings (a recipe's runs on one dataset all select on the same queries, and a benchmark can
    hold out the same ones for a peer that never sees pools).
    """
    if not 0 < fraction <= 0.5:
        raise HardnegError(f"dev_fraction must be in (0, 0.5], got {fraction}")
    if len(query_ids) < 2:
        raise HardnegError(f"train.dev_fraction (--dev-fraction) holds out training queries to select on, and "
                           f"needs at least two with a positive; there {'is' if len(query_ids) == 1 else 'are'} "
                           f"{len(query_ids)}: give more training queries, or leave dev_fraction unset (no "
                           "selection: the last epoch's model is kept)")
    ids = sorted(query_ids)
    random.Random(seed).shuffle(ids)
    return set(ids[:max(1, round(fraction * len(ids)))])


def pools_dataset(pools: list[Pool], corpus: Corpus, source: Dataset | None = None, *,
                  split: str = "held-out") -> Dataset:
    """The queries of ``pools`` as a dataset over the whole corpus: the dev set of :func:`hold_out`, or the
    queries re-mining mines again. Judgements come from ``source`` (the split they were mined from, graded) when
    given, else from the pools' positives (grade 1)."""
    queries = {pool.query_id: pool.query for pool in pools}
    if source is not None:
        qrels = {query_id: dict(source.qrels[query_id]) for query_id in queries if query_id in source.qrels}
    else:
        qrels = {pool.query_id: {p.doc_id: 1 for p in pool.positives} for pool in pools}
    name = source.name if source is not None else (corpus.path.parent.name if corpus.path else "pools")
    return Dataset(name, split, corpus, queries, qrels, list(source.files) if source is not None else [])


def mined_negatives(pools: Iterable[Pool]) -> list[str]:
    """The negatives of ``pools``, every query's first, then every query's second, ...: the hard distractors
    :func:`dev_subset` keeps first, interleaved so that a tight budget still gives each query its hardest ones."""
    lists = [[negative.doc_id for negative in pool.negatives] for pool in pools]
    return [doc_ids[rank] for rank in range(max(map(len, lists), default=0)) for doc_ids in lists
            if rank < len(doc_ids)]


def dev_subset(dev: Dataset, size: int, seed: int, distractors: Iterable[str] = ()) -> tuple[Dataset, dict[str, int]]:
    """``dev`` over a sub-corpus of ``size`` documents, so that selecting on it does not re-encode a whole corpus
    (MS MARCO's 8.8M passages) at every dev evaluation; and how many documents of each kind it holds (empty when
    ``size`` covers the corpus and ``dev`` is returned as it is).

    The sub-corpus keeps, in this order of priority: every judged document of the dev queries (so each query's
    metric counts all its relevant documents), then ``distractors`` (the dev queries' mined negatives: without them
    the rest is random documents, which make the ranking easier than the whole corpus does), then documents drawn at
    random with ``seed`` until ``size``. The judged documents are always all kept, even beyond ``size``. Scores on
    it rank models against each other; they are higher than on the whole corpus, so are not comparable with them.
    """
    if size < 1:
        raise HardnegError(f"dev_corpus_size must be >= 1, got {size}")
    corpus = dev.corpus
    if size >= len(corpus):
        return dev, {}
    kept = {corpus.position[doc_id] for judged in dev.qrels.values() for doc_id in judged if doc_id in corpus}
    judged = len(kept)
    for doc_id in distractors:
        if len(kept) >= size:
            break
        if doc_id in corpus:
            kept.add(corpus.position[doc_id])
    negatives = len(kept) - judged
    missing = size - len(kept)
    if missing > 0:  # a sample of range() is drawn without listing the corpus; the kept ones it hits are dropped
        drawn = random.Random(seed).sample(range(len(corpus)), missing + len(kept))
        kept.update([i for i in drawn if i not in kept][:missing])
    order = sorted(kept)
    sub = Corpus([corpus.ids[i] for i in order], [corpus.titles[i] for i in order],
                 [corpus.bodies[i] for i in order])
    return replace(dev, corpus=sub), {"judged": judged, "mined negatives": negatives,
                                      "random": len(kept) - judged - negatives}


def write_pools(path: str | os.PathLike, pools: Iterable[Pool]) -> int:
    """Atomically write pools as JSON lines; returns how many were written."""
    count = 0
    with atomic_write(path) as handle:
        for pool in pools:
            handle.write(pool.to_line())
            count += 1
    return count


def read_pools(path: str | os.PathLike, corpus: Corpus | None = None, *,
               allow_corpus_mismatch: bool = False) -> list[Pool]:
    """Read ``pools.jsonl``; with ``corpus``, also check that every document id is in it and, when
    ``pools.meta.json`` beside it records the corpus they were mined on, that it is this one (same ids, same
    texts): pools mined on other texts would train without a word. ``allow_corpus_mismatch`` skips that check
    for a user who edited the corpus on purpose."""
    path = Path(path)
    if corpus is not None and not allow_corpus_mismatch:
        _check_mined_on(path, corpus)
    pools = []
    seen: dict[str, int] = {}
    for number, record in _json_records(path):
        query_id = _checked_id(path, number, "query_id", _string_field(path, number, record, "query_id"))
        if query_id in seen:
            raise DataError(path, f"query {query_id!r} has a second pool (the first is on line {seen[query_id]})",
                            line=number, field="query_id", hint="one pool per query; were two files joined?")
        seen[query_id] = number
        query = _string_field(path, number, record, "query")
        lists = {}
        for key in ("positives", "negatives"):
            items = record.get(key)
            if not isinstance(items, list):
                raise DataError(path, "missing or not a list", line=number, field=key)
            parsed = []
            for item in items:
                if not isinstance(item, dict) or not isinstance(item.get("doc_id"), str):
                    raise DataError(path, "each entry needs a string 'doc_id'", line=number, field=key)
                _checked_id(path, number, key, item["doc_id"])
                if corpus is not None and item["doc_id"] not in corpus:
                    raise DataError(path, f"document {item['doc_id']!r} is not in the corpus", line=number,
                                    field=key, hint="were the pools mined on this corpus?")
                score = item.get("score")
                if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
                    raise DataError(path, f"score {score!r} is not a number", line=number, field=key)
                if score is not None and not math.isfinite(score):
                    raise DataError(path, f"score {score!r} is not a finite number", line=number, field=key,
                                    hint="a NaN or infinite teacher score would make the distillation loss NaN")
                parsed.append(Candidate(item["doc_id"], None if score is None else float(score), item.get("rank"),
                                        item.get("source")))
            lists[key] = parsed
        if not lists["positives"]:
            raise DataError(path, f"query {query_id!r} has no positive", line=number, field="positives")
        pools.append(Pool(query_id, query, lists["positives"], lists["negatives"]))
    if not pools:
        raise DataError(path, "no pools found", hint="did mining finish?")
    return pools


def _check_mined_on(path: Path, corpus: Corpus) -> None:
    meta = pools_file(path).parent / POOLS_META
    mined_on = (read_pools_meta(path) or {}).get("corpus") or {}
    recorded = mined_on.get("fingerprint")
    if recorded and recorded != corpus_fingerprint(corpus):
        raise DataError(meta, f"the pools were mined on another corpus ({mined_on.get('documents')} documents, "
                        f"sha256 {recorded[:12]}) than the one given ({len(corpus)} documents, sha256 "
                        f"{corpus_fingerprint(corpus)[:12]}): same ids with other texts would train on the wrong "
                        "documents", field="corpus",
                        hint="give the corpus they were mined on, or, if you changed it on purpose, "
                             "--allow-corpus-mismatch (allow_corpus_mismatch=True in Python)")


def load_dataset(data: str | os.PathLike | None = None, split: str = "test", *,
                 corpus: str | os.PathLike | None = None, queries: str | os.PathLike | None = None,
                 qrels: str | os.PathLike | None = None) -> Dataset:
    """One entry point for the CLI and configs: a BEIR folder or bundled name, or three explicit files.

    With ``data`` set, any of ``corpus``/``queries``/``qrels`` given replaces that file of the folder
    (e.g. MS MARCO qrels in TREC form beside a BEIR-style corpus).
    """
    if data is None and not (corpus and queries and qrels):
        raise HardnegError("give a dataset folder (--data) or all of --corpus, --queries and --qrels")
    corpus, queries, qrels = (Path(f).expanduser() if f else None for f in (corpus, queries, qrels))  # YAML: no shell
    if data is None:
        return build_dataset(corpus.parent.name, split, corpus, queries, qrels)
    if not (corpus or queries or qrels):
        return load_beir(data, split)
    folder = dataset_folder(data)
    return build_dataset(folder.name, split,
                         corpus or _first_existing(folder, ["corpus.jsonl", "corpus.jsonl.gz"]),
                         queries or _first_existing(folder, ["queries.jsonl", "queries.jsonl.gz"]),
                         qrels or folder / "qrels" / f"{split}.tsv")


def load_corpus_of(data: str | os.PathLike | None = None, corpus: str | os.PathLike | None = None) -> Corpus:
    """The corpus of a dataset folder (or bundled name), or of an explicit corpus file."""
    if corpus is not None:
        return load_corpus(corpus)
    if data is None:
        raise HardnegError("give a dataset folder (--data) or a corpus file (--corpus)")
    return load_corpus(_first_existing(dataset_folder(data), ["corpus.jsonl", "corpus.jsonl.gz"]))


def load_queries_of(data: str | os.PathLike | None = None, queries: str | os.PathLike | None = None) -> Queries:
    """Every query of a dataset folder's queries file (or bundled name), or of an explicit queries file."""
    if queries is not None:
        return load_queries(queries)
    if data is None:
        raise HardnegError("give a dataset folder (--data) or a queries file (--queries)")
    return load_queries(_first_existing(dataset_folder(data), ["queries.jsonl", "queries.jsonl.gz"]))
