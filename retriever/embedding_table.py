"""Embeddings computed elsewhere, used as a retriever: a teacher you cannot (or need not) run where you train.

Why: the teachers worth distilling from are often too big to run beside the student (a 7B embedder), reachable
only as an API, or simply already computed once on a GPU machine. Their embeddings of the corpus and of the
queries are all that mining with ``--teacher``, score fusion, in-batch distillation, re-mining and evaluation
need, so a folder of them is a teacher like any model: ``hardneg mine --teacher FOLDER`` and ``mine.teacher:
FOLDER`` accept it, as does ``hardneg evaluate --retriever FOLDER``. Scores are inner products of the stored
vectors, exactly what the model would give (normalise before writing for cosine).

The folder (written by :func:`write_embedding_table`, or by ``hardneg encode`` from any model)::

    embeddings.json    {"format": "hardneg-embeddings", "version": 1, "name": ..., "dimension": d,
                        "corpus": {"ids": "corpus_ids.txt", "vectors": "corpus.npy", "count": n,
                                   "fingerprint": ...}, "queries": {"ids": "query_ids.txt", ...}}
    corpus_ids.txt     one document id per line, in the row order of corpus.npy
    corpus.npy         n x d float32 or float16
    query_ids.txt, queries.npy   the same for queries (every query the teacher will be asked about)

Documents and queries are found by id, so the table may hold more than the data it is used with (a corpus
superset, every split's queries). A document or query it lacks is an error naming the table and the first
missing id, never a silent zero. ``fingerprint`` (optional) is :func:`retriever.data.corpus_fingerprint` of the
corpus the vectors were computed from: with it, a corpus whose texts changed under the same ids is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retriever.data import Corpus, Queries, corpus_fingerprint, id_problem
from retriever.dense import DenseRetriever
from retriever.embedding_cache import Rows, shard_rows
from retriever.io import DataError, atomic_directory, file_checksum, write_json
from retriever.protocol import components
from retriever.ranks import process_group

MANIFEST = "embeddings.json"
FORMAT = "hardneg-embeddings"
VERSION = 1
_DTYPES = ("float32", "float16")


def is_embedding_table(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder of precomputed embeddings (it holds ``embeddings.json``)."""
    return (Path(path).expanduser() / MANIFEST).is_file()


def write_embedding_table(folder: str | os.PathLike, *, name: str, corpus_ids: Sequence[str],
                          corpus_vectors: np.ndarray, query_ids: Sequence[str], query_vectors: np.ndarray,
                          corpus: Corpus | None = None) -> Path:
    """Write an embedding table atomically (the folder appears complete or not at all).

    ``name`` says which model made the vectors (recorded in pools and metrics as the teacher's name); give the
    ``corpus`` they were computed from to record its fingerprint, so a later corpus with other texts under the
    same ids is refused. Vectors are kept in their dtype when it is float16 or float32, else stored as float32.
    """
    folder = Path(folder).expanduser()
    parts = {"corpus": (list(corpus_ids), np.asarray(corpus_vectors)),
             "queries": (list(query_ids), np.asarray(query_vectors))}
    dimensions = {vectors.shape[1] for _, vectors in parts.values() if vectors.ndim == 2}
    for part, (ids, vectors) in parts.items():
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise ValueError(f"{part}: {len(ids)} ids for vectors of shape {vectors.shape}: give one row per id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{part}: ids repeat (each id names one row)")
        problem = next(((i, id_problem(i)) for i in ids if id_problem(i)), None)
        if problem:
            raise ValueError(f"{part}: id {problem[0]!r} {problem[1]} (ids are written one per line)")
    if len(dimensions) != 1:
        raise ValueError(f"corpus and query vectors differ in dimension ({sorted(dimensions)})")
    manifest: dict = {"format": FORMAT, "version": VERSION, "name": name, "dimension": dimensions.pop()}
    with atomic_directory(folder) as staging:
        for part, (ids, vectors) in parts.items():
            if vectors.dtype.name not in _DTYPES:
                vectors = vectors.astype(np.float32)
            prefix = "corpus" if part == "corpus" else "query"
            vectors_file = "corpus.npy" if part == "corpus" else "queries.npy"
            (staging / f"{prefix}_ids.txt").write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
            np.save(staging / vectors_file, vectors)
            manifest[part] = {"ids": f"{prefix}_ids.txt", "vectors": vectors_file, "count": len(ids),
                              "dtype": vectors.dtype.name}
        if corpus is not None:
            manifest["corpus"]["fingerprint"] = corpus_fingerprint(corpus)
        write_json(staging / MANIFEST, manifest)
    return folder


class EmbeddingTable:
    """A loaded table: ids and memory-mapped vectors of the corpus and the queries, checked on load."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        manifest_path = self.folder / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(manifest_path, f"not readable JSON ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataError(manifest_path, f"not a hardneg embedding table (expected \"format\": \"{FORMAT}\")",
                            field="format", hint="write it with hardneg encode or hardneg.write_embedding_table")
        if manifest.get("version") != VERSION:
            raise DataError(manifest_path, f"version {manifest.get('version')!r}; this hardneg reads {VERSION}",
                            field="version")
        self.manifest_path = manifest_path
        self.name = str(manifest.get("name") or self.folder.name)
        self.dimension = manifest.get("dimension")
        self.fingerprint = (manifest.get("corpus") or {}).get("fingerprint") if isinstance(
            manifest.get("corpus"), dict) else None
        self.corpus_ids, self.corpus_vectors = self._part(manifest, "corpus")
        self.query_ids, self.query_vectors = self._part(manifest, "queries")
        self.corpus_row = {doc_id: row for row, doc_id in enumerate(self.corpus_ids)}
        self.query_row = {query_id: row for row, query_id in enumerate(self.query_ids)}

    def _part(self, manifest: dict, part: str) -> tuple[list[str], np.ndarray]:
        entry = manifest.get(part)
        if not isinstance(entry, dict) or not isinstance(entry.get("ids"), str) \
                or not isinstance(entry.get("vectors"), str):
            raise DataError(self.manifest_path, "expected an object with \"ids\" and \"vectors\" file names",
                            field=part)
        ids_path, vectors_path = self.folder / entry["ids"], self.folder / entry["vectors"]
        try:
            ids = [line.removesuffix("\r") for line in ids_path.read_text(encoding="utf-8").split("\n")]
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(ids_path, f"not readable ({err})") from None
        if ids and ids[-1] == "":  # the last line's newline
            ids.pop()
        try:
            vectors = np.load(vectors_path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(vectors_path, f"not a readable .npy array ({err})") from None
        if vectors.ndim != 2 or vectors.dtype.name not in _DTYPES:
            raise DataError(vectors_path, f"expected a 2-d float32 or float16 array, got {vectors.dtype.name} of "
                            f"shape {vectors.shape}")
        if vectors.shape[1] != self.dimension:
            raise DataError(vectors_path, f"{vectors.shape[1]}-d vectors, but {MANIFEST} says {self.dimension}",
                            field="dimension")
        if len(ids) != len(vectors):
            raise DataError(ids_path, f"{len(ids)} ids for {len(vectors)} rows of {vectors_path.name}",
                            hint="one id per line, in the rows' order")
        seen: dict[str, int] = {}
        for line, item in enumerate(ids, start=1):
            problem = id_problem(item)
            if problem:
                raise DataError(ids_path, f"id {item!r} {problem}", line=line)
            if item in seen:
                raise DataError(ids_path, f"id {item!r} repeats line {seen[item]}", line=line)
            seen[item] = line
        return ids, vectors

    def cache_identity(self) -> dict:
        """What identifies these vectors (``retriever.dense.encoder_identity``), so a resumed mining run is not
        continued with another table: the folder, the manifest's bytes and each array file's size and time (their
        checksums would read gigabytes)."""
        files = {}
        for path in sorted(self.folder.iterdir()):
            if path.is_file():
                stat = path.stat()
                files[path.name] = [stat.st_size, stat.st_mtime_ns]
        return {"embeddings": str(self.folder.resolve()), "manifest": file_checksum(self.manifest_path),
                "files": files}

    def rows_of(self, ids: Sequence[str], *, part: str) -> np.ndarray:
        """Row numbers of ``ids`` in ``part`` ("corpus" or "queries"); a missing id is an error that names it."""
        index = self.corpus_row if part == "corpus" else self.query_row
        missing = [item for item in ids if item not in index]
        if missing:
            what = "documents" if part == "corpus" else "queries"
            raise DataError(self.manifest_path, f"{len(missing)} of the {len(ids)} {what} asked for have no "
                            f"embedding (first: {missing[0]!r})", field=part,
                            hint="compute the table over this corpus and every query it will score "
                                 "(hardneg encode --data ...)")
        return np.fromiter((index[item] for item in ids), dtype=np.int64, count=len(ids))

    def check_corpus(self, corpus: Corpus) -> None:
        """Refuse a corpus the vectors were not computed for: ids missing, or other texts under the same ids."""
        self.rows_of(corpus.ids, part="corpus")
        if self.fingerprint and len(corpus) == len(self.corpus_ids) and corpus_fingerprint(corpus) != self.fingerprint:
            raise DataError(self.manifest_path, "the corpus has the table's document ids but other texts (its "
                            "fingerprint differs): the vectors describe another version of it", field="corpus",
                            hint="compute the table again over this corpus")


class PrecomputedRetriever(DenseRetriever):
    """Dense search and scoring over an :class:`EmbeddingTable` instead of an encoder: the same exact search,
    scores, whole-corpus moments (score fusion) and torchrun sharding as :class:`DenseRetriever`, with the
    vectors looked up by id rather than encoded."""

    def __init__(self, table: EmbeddingTable | str | os.PathLike, **options) -> None:
        table = table if isinstance(table, EmbeddingTable) else EmbeddingTable(table)
        options.pop("cache_dir", None)  # nothing to cache: the table is the cache
        super().__init__(table, **options)  # ``encoder`` is the table: named, never asked to encode
        self.table = table
        self.description = f"embeddings:{table.name}"

    def cache_path(self, corpus: Corpus) -> Path | None:
        return None

    def local_rows(self, corpus: Corpus) -> list[Rows]:
        if self._rows is not None and self._rows[0] is corpus:
            return self._rows[1]
        self.table.check_corpus(corpus)
        group = process_group()
        start, end = shard_rows(len(corpus), group.rank(), group.world_size()) if group else (0, len(corpus))
        rows = self.table.rows_of(corpus.ids[start:end], part="corpus")
        vectors = self.table.corpus_vectors
        if len(rows) and vectors.dtype == np.float32 and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
            block = vectors[rows[0]:rows[0] + len(rows)]  # in corpus order (hardneg encode): stays memory-mapped
        else:  # another order, a subset or float16: gathered into memory as float32
            block = np.asarray(vectors[rows], dtype=np.float32)
        pieces = [Rows(start, block)] if end > start else []
        self._rows = (corpus, pieces)
        self.shard_documents = end - start
        return pieces

    def check(self, corpus: Corpus, queries: Queries) -> None:
        """Refuse, before any work, data the table cannot score: a document or query it has no vector for."""
        self.table.check_corpus(corpus)
        self.table.rows_of(list(queries), part="queries")

    def query_embeddings(self, queries: Queries) -> np.ndarray:
        rows = self.table.rows_of(list(queries), part="queries")
        return np.asarray(self.table.query_vectors[rows], dtype=np.float32).reshape(len(rows), -1)


def check_tables(retriever: object, corpus: Corpus, queries: Queries) -> None:
    """:meth:`PrecomputedRetriever.check` for every table among ``retriever``'s parts (a teacher inside a
    fusion, a source of a hybrid): what mining and training call before they start."""
    for part in components(retriever):
        if isinstance(part, PrecomputedRetriever):
            part.check(corpus, queries)


def encode_embedding_table(retriever: DenseRetriever, corpus: Corpus, queries: Queries,
                           folder: str | os.PathLike, *, name: str, dtype: str = "float32") -> Path:
    """Encode ``corpus`` and ``queries`` with a dense retriever's model and write them as a table (``hardneg
    encode``): run a big teacher once where it fits, then mine and distil with the folder anywhere. ``dtype``
    float16 halves the folder (scores then agree with the model's to about 1e-3, not 1e-6)."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    vectors = np.asarray(retriever.corpus_embeddings(corpus), dtype=dtype)
    return write_embedding_table(folder, name=name, corpus_ids=corpus.ids, corpus_vectors=vectors,
                                 query_ids=list(queries),
                                 query_vectors=retriever.query_embeddings(queries).astype(dtype), corpus=corpus)
