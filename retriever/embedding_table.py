"""Embeddings computed elsewhere, used as a retriever: a teacher you cannot (or need not) run where you train.

Why: the teachers worth distilling from are often too big to run beside the student (a 7B embedder), reachable
only as an API, or simply already computed once on a GPU machine. Their embeddings of the corpus and of the
queries are all that mining with ``--teacher``, score fusion, in-batch distillation, re-mining and evaluation
need, so a folder of them is a teacher like any model: ``hardneg mine --teacher FOLDER`` and ``mine.teacher:
FOLDER`` accept it, as does ``hardneg evaluate --retriever FOLDER``. Scores are inner products of the stored
vectors, exactly what the model would give (normalise before writing for cosine).

The folder (written by :func:`write_embedding_table`, or by ``hardneg encode`` from any model)::

    embeddings.json    {"format": "hardneg-embeddings", "version": 1, "name": ..., "dimension": d,
                        "corpus": {"ids": "corpus_ids.txt", "vectors": "corpus.npy", "count": n, "dtype": ...,
                                   "text_hashes": "corpus_text_hashes.npy"},
                        "queries": {...the same for queries}, "checksums": {file: sha256}}
    corpus_ids.txt     one document id per line, in the row order of corpus.npy
    corpus.npy         n x d float32 or float16
    corpus_text_hashes.npy   n uint64: a hash of each row's text (optional)
    query_ids.txt, queries.npy, query_text_hashes.npy   the same for queries

Documents and queries are found by id, so a table may hold more than the data it serves (a corpus superset,
every split's queries) and in any order. A document or query it lacks is an error naming the table and the first
missing id, never a silent zero; with text hashes (``hardneg encode`` writes them), so is one whose text is not the
text the vector was computed from (an edited corpus, or another dataset's query "0"). Vectors stay
memory-mapped when the table's rows are in the corpus's order (as ``hardneg encode`` writes them); otherwise the
rows used are gathered into memory, in the table's dtype.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retriever.data import Corpus, Queries, id_problem
from retriever.dense import DenseRetriever
from retriever.embedding_cache import Rows, shard_rows
from retriever.io import DataError, HardnegError, atomic_directory, file_checksum, write_json
from retriever.protocol import components
from retriever.ranks import is_main, process_group

MANIFEST = "embeddings.json"
FORMAT = "hardneg-embeddings"
VERSION = 1
_DTYPES = ("float32", "float16")
_PARTS = {"corpus": ("corpus_ids.txt", "corpus.npy", "corpus_text_hashes.npy"),
          "queries": ("query_ids.txt", "queries.npy", "query_text_hashes.npy")}
_WHAT = {"corpus": "documents", "queries": "queries"}


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """A 64-bit hash of each text (BLAKE2b of its UTF-8 bytes): what ties a stored vector to the text it embeds."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
                        for text in texts), dtype=np.uint64, count=len(texts))


def is_embedding_table(path: object) -> bool:
    """Whether ``path`` is a folder of precomputed embeddings (it holds ``embeddings.json``)."""
    return isinstance(path, str | os.PathLike) and (Path(path).expanduser() / MANIFEST).is_file()


def check_table_folder(folder: str | os.PathLike) -> Path:
    """Refuse, before anything is encoded, a destination that is neither new, empty, nor an embedding table:
    writing swaps the whole folder, which must never take a user's other files with it."""
    folder = Path(folder).expanduser()
    if folder.exists() and not is_embedding_table(folder) and (not folder.is_dir() or any(folder.iterdir())):
        raise HardnegError(f"{folder}: exists and is not an embedding table; give a new or empty folder (a table "
                           "there would be replaced)")
    return folder


def write_embedding_table(folder: str | os.PathLike, *, name: str, corpus_ids: Sequence[str],
                          corpus_vectors: np.ndarray, query_ids: Sequence[str], query_vectors: np.ndarray,
                          corpus_texts: Sequence[str] | None = None,
                          query_texts: Sequence[str] | None = None) -> Path:
    """Write an embedding table atomically (the folder appears complete or not at all; an existing table there
    is replaced, any other folder refused).

    ``name`` says which model made the vectors (pools and metrics name the teacher so). Give the texts the vectors
    were computed from (for documents, hardneg's ``Corpus.text``: title and body joined) and a later use with other
    texts under the same ids is refused. Vectors are kept in their dtype when it is float16 or float32, else
    stored as float32; a NaN or infinite value is refused.
    """
    folder = check_table_folder(folder)
    parts = {"corpus": (list(corpus_ids), np.asarray(corpus_vectors), corpus_texts),
             "queries": (list(query_ids), np.asarray(query_vectors), query_texts)}
    for part, (ids, vectors, texts) in parts.items():
        if vectors.ndim != 2 or len(ids) != len(vectors):
            raise ValueError(f"{part}: {len(ids)} ids for vectors of shape {vectors.shape}: give one row per id")
        if texts is not None and len(texts) != len(ids):
            raise ValueError(f"{part}: {len(texts)} texts for {len(ids)} ids")
        problem = next(((i, id_problem(i)) for i in ids if id_problem(i)), None)
        if problem:
            raise ValueError(f"{part}: id {problem[0]!r} {problem[1]} (ids are written one per line)")
        if len(set(ids)) != len(ids):
            raise ValueError(f"{part}: ids repeat (each id names one row)")
    dimensions = {vectors.shape[1] for _, vectors, _ in parts.values()}
    if len(dimensions) != 1:
        raise ValueError(f"corpus and query vectors differ in dimension ({sorted(dimensions)})")
    manifest: dict = {"format": FORMAT, "version": VERSION, "name": name, "dimension": dimensions.pop()}
    with atomic_directory(folder) as staging:
        for part, (ids, vectors, texts) in parts.items():
            if vectors.dtype.name not in _DTYPES:
                vectors = vectors.astype(np.float32)
            bad = np.flatnonzero(~np.isfinite(vectors).all(axis=1))
            if len(bad):
                raise ValueError(f"{part}: the vector of {ids[bad[0]]!r} (row {bad[0]}) holds NaN or infinity"
                                 + (" (beyond float16's range?)" if vectors.dtype == np.float16 else ""))
            ids_file, vectors_file, hashes_file = _PARTS[part]
            (staging / ids_file).write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")
            np.save(staging / vectors_file, vectors)
            manifest[part] = {"ids": ids_file, "vectors": vectors_file, "count": len(ids),
                              "dtype": vectors.dtype.name}
            if texts is not None:
                np.save(staging / hashes_file, text_hashes(texts))
                manifest[part]["text_hashes"] = hashes_file
        manifest["checksums"] = {path.name: file_checksum(path) for path in sorted(staging.iterdir())}
        write_json(staging / MANIFEST, manifest)
    return folder


class EmbeddingTable:
    """A loaded table: ids, memory-mapped vectors and text hashes of the corpus and the queries, checked on load
    (shapes, ids one per line, unique and well-formed)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        self.manifest_path = self.folder / MANIFEST
        try:
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(self.manifest_path, f"not readable JSON ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataError(self.manifest_path, f"not a hardneg embedding table (expected \"format\": \"{FORMAT}\")",
                            field="format", hint="write it with hardneg encode or hardneg.write_embedding_table")
        if manifest.get("version") != VERSION:
            raise DataError(self.manifest_path, f"version {manifest.get('version')!r}; this hardneg reads {VERSION}",
                            field="version")
        self.name = str(manifest.get("name") or self.folder.name)
        self.dimension = manifest.get("dimension")
        self.identity = file_checksum(self.manifest_path)  # the manifest holds every file's sha256
        self.ids: dict[str, list[str]] = {}
        self.vectors: dict[str, np.ndarray] = {}
        self.hashes: dict[str, np.ndarray | None] = {}
        self.row: dict[str, dict[str, int]] = {}
        for part in _PARTS:
            self.ids[part], self.vectors[part], self.hashes[part] = self._part(manifest, part)
            self.row[part] = {item: row for row, item in enumerate(self.ids[part])}

    def cache_identity(self) -> dict:
        """What identifies these vectors (``retriever.dense.encoder_identity``), so a resumed mining run is not
        continued with another table: the manifest's checksum, which covers every file's (a copied table keeps it)."""
        return {"embeddings": self.identity}

    def _part(self, manifest: dict, part: str) -> tuple[list[str], np.ndarray, np.ndarray | None]:
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
        vectors = self._array(vectors_path)
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
        hashes = None
        if entry.get("text_hashes") is not None:
            hashes_path = self.folder / str(entry["text_hashes"])
            hashes = self._array(hashes_path)
            if hashes.shape != (len(ids),) or hashes.dtype != np.uint64:
                raise DataError(hashes_path, f"expected {len(ids)} uint64 text hashes, got {hashes.dtype.name} of "
                                f"shape {hashes.shape}")
        return ids, vectors, hashes

    @staticmethod
    def _array(path: Path) -> np.ndarray:
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(path, f"not a readable .npy array ({err})") from None

    def rows_of(self, ids: Sequence[str], *, part: str, texts: Sequence[str] | None = None) -> np.ndarray:
        """Row numbers of ``ids`` in ``part`` ("corpus" or "queries"). An id the table lacks is an error that names
        it; so is, when ``texts`` are given and the table has text hashes, an id whose text is not the one its
        vector was computed from."""
        index = self.row[part]
        missing = [item for item in ids if item not in index]
        if missing:
            raise DataError(self.manifest_path, f"{len(missing)} of the {len(ids)} {_WHAT[part]} asked for have no "
                            f"embedding (first: {missing[0]!r})", field=part,
                            hint="compute the table over this corpus and every query it will score "
                                 "(hardneg encode --data ...)")
        rows = np.fromiter((index[item] for item in ids), dtype=np.int64, count=len(ids))
        stored = self.hashes[part]
        if texts is not None and stored is not None and len(rows):
            changed = np.flatnonzero(stored[rows] != text_hashes(texts))
            if len(changed):
                raise DataError(self.manifest_path, f"{len(changed)} of the {len(ids)} {_WHAT[part]} asked for "
                                f"have other texts than the ones the vectors were computed from (first: "
                                f"{ids[changed[0]]!r})", field=part,
                                hint="another version of the data, or another dataset with the same ids: compute "
                                     "the table again over this data")
        return rows


class PrecomputedRetriever(DenseRetriever):
    """Dense search and scoring over an :class:`EmbeddingTable` instead of an encoder: the same exact search (or
    faiss index), scores, whole-corpus moments (score fusion) and torchrun sharding as :class:`DenseRetriever`,
    with the vectors looked up by id rather than encoded."""

    def __init__(self, table: EmbeddingTable | str | os.PathLike, **options) -> None:
        table = table if isinstance(table, EmbeddingTable) else EmbeddingTable(table)
        options.pop("cache_dir", None)  # nothing to cache: the table is the cache
        super().__init__(table, **options)  # ``encoder`` is the table: named, never asked to encode
        self.table = table
        self.description = f"embeddings:{table.name}" + ("" if self.index_spec == "Flat" else f"[{self.index_spec}]")
        self._checked: Corpus | None = None

    def cache_path(self, corpus: Corpus) -> Path | None:
        return None

    def check(self, corpus: Corpus, queries: Queries) -> None:
        """Refuse, before any work, data the table cannot score: a document or query it has no vector for, or
        whose text is not the one its vector was computed from."""
        self._check_corpus(corpus)
        self.table.rows_of(list(queries), part="queries", texts=list(queries.values()))

    def _check_corpus(self, corpus: Corpus) -> None:
        if self._checked is not corpus:
            self.table.rows_of(corpus.ids, part="corpus", texts=[corpus.text(i) for i in range(len(corpus))])
            self._checked = corpus

    def local_rows(self, corpus: Corpus) -> list[Rows]:
        if self._rows is not None and self._rows[0] is corpus:
            return self._rows[1]
        self._check_corpus(corpus)
        group = process_group()
        start, end = shard_rows(len(corpus), group.rank(), group.world_size()) if group else (0, len(corpus))
        rows = self.table.rows_of(corpus.ids[start:end], part="corpus")
        vectors = self.table.vectors["corpus"]
        if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
            block = vectors[rows[0]:rows[0] + len(rows)]  # in corpus order (hardneg encode): stays memory-mapped
        else:  # another order or a superset: the rows used, gathered (search and scoring read them as float32)
            block = np.asarray(vectors[rows])
        pieces = [Rows(start, block)] if end > start else []
        self._rows = (corpus, pieces)
        self.shard_documents = end - start
        return pieces

    def query_embeddings(self, queries: Queries) -> np.ndarray:
        rows = self.table.rows_of(list(queries), part="queries", texts=list(queries.values()))
        return np.asarray(self.table.vectors["queries"][rows], dtype=np.float32).reshape(len(rows),
                                                                                        self.table.dimension)


def check_tables(retriever: object, corpus: Corpus, queries: Queries) -> None:
    """:meth:`PrecomputedRetriever.check` for every table among ``retriever``'s parts (a teacher inside a fusion, a
    source of a hybrid), or ``retriever`` given as a table's folder: what mining, training, ``run`` and
    ``evaluate`` call before they start."""
    if is_embedding_table(retriever):
        retriever = PrecomputedRetriever(retriever)
    for part in components(retriever):
        if isinstance(part, PrecomputedRetriever):
            part.check(corpus, queries)


def encode_embedding_table(retriever: DenseRetriever, corpus: Corpus, queries: Queries,
                           folder: str | os.PathLike, *, name: str, dtype: str = "float32") -> Path:
    """Encode ``corpus`` and ``queries`` with a dense retriever's model and write them as a table, with their
    text hashes (``hardneg encode``): run a big teacher once where it fits, then mine and distil with the folder
    anywhere. ``dtype`` float16 halves the folder (scores then agree with the model's to about 1e-3, not 1e-6).
    Under torchrun every rank encodes its share and rank 0 writes."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    check_table_folder(folder)
    vectors = retriever.corpus_embeddings(corpus)
    query_vectors = retriever.query_embeddings(queries)
    if is_main():
        write_embedding_table(folder, name=name, corpus_ids=corpus.ids, corpus_vectors=np.asarray(vectors, dtype),
                              query_ids=list(queries), query_vectors=query_vectors.astype(dtype),
                              corpus_texts=[corpus.text(i) for i in range(len(corpus))],
                              query_texts=list(queries.values()))
    group = process_group()
    if group:
        group.barrier()  # the folder exists on return, on every rank
    return Path(folder).expanduser()
