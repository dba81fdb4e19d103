"""Dense retrieval: encode the corpus once (cached on disk), then search a faiss index (``retriever.index``).

Encoding the corpus is the expensive step of dense mining and evaluation, and users re-run mining with
other filters many times. With ``cache_dir`` set, the corpus embeddings are saved there as ``.npy`` under
a key made of everything that changes them: the model's identity (its resolved path and the checksums of
its weight and config files, or its hub name), the corpus content (sha256 over ids and texts), and the
encoding options (max length, document prefix, pooling, normalisation, and the precision the
encoder runs in: bf16 and fp32 embeddings are never mixed). A later run with the same key
memory-maps the file instead of encoding; any change gives a new key, never a stale hit.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import warnings
from pathlib import Path

import numpy as np

from retriever.data import Corpus, Queries, Run, corpus_fingerprint
from retriever.index import VectorIndex, check_index_spec
from retriever.io import atomic_write, file_checksum, write_json
from retriever.protocol import Encoder, PrecisionAware, components

DEFAULT_CACHE_DIR = Path(os.environ.get("HARDNEG_CACHE_DIR", "~/.cache/hardneg/embeddings")).expanduser()
_MODEL_FILES = (".safetensors", ".bin", ".json", ".txt", ".model")


def encoder_identity(encoder: object) -> dict | None:
    """What identifies an encoder's document embeddings, or None when it cannot be told (no caching).

    A custom encoder can opt in by defining ``cache_identity`` (a JSON-able dict).
    """
    custom = getattr(encoder, "cache_identity", None)
    if custom is not None:
        return dict(custom() if callable(custom) else custom)
    name = getattr(encoder, "name", None)
    if not name or not hasattr(encoder, "tokenizer") or getattr(encoder, "trained_in_memory", False):
        return None  # weights that may differ from the files ``name`` points to are never cached
    from retriever.encoder import resolve_model

    location = resolve_model(name)
    identity: dict = {"model": location}
    folder = Path(location)
    if folder.is_dir():
        identity["files"] = {str(path.relative_to(folder)): file_checksum(path)
                             for path in sorted(folder.rglob("*"))
                             if path.is_file() and path.suffix in _MODEL_FILES}
    for key in ("max_length", "document_prefix", "pooling", "normalize"):
        identity[key] = getattr(encoder, key, None)
    if isinstance(encoder, PrecisionAware):
        identity["precision"] = encoder.encode_precision  # bf16 and fp32 embeddings are not interchangeable
    return identity


def encoding_record(retriever: object) -> list[dict]:
    """The precision each model behind ``retriever`` encodes in, for ``metrics.json`` / ``pools.meta.json``.

    Every composed source and scorer is named (hybrid, rescored); BM25 and run files give nothing.
    """
    found = []
    for part in components(retriever):
        model = getattr(part, "encoder", part)
        if isinstance(model, PrecisionAware):
            found.append({"model": getattr(model, "name", "") or type(model).__name__,
                          "precision": model.encode_precision, "requested": model.precision})
    return found


def _read_cache_entry(path: Path, corpus: Corpus) -> np.ndarray | None:
    """A cached embedding matrix, memory-mapped, or None (with a warning) when the entry cannot be trusted.

    The ``.npy`` must match its sidecar ``.json`` (written after it) in checksum, shape and dtype, and the
    sidecar must name this corpus: a truncated, edited or half-written entry is re-encoded, never used.
    """
    sidecar = path.with_suffix(".json")
    problem = None
    try:
        record = json.loads(sidecar.read_text(encoding="utf-8"))
        if record.get("corpus_sha256") != corpus_fingerprint(corpus):
            problem = "it was written for another corpus"
        elif record.get("sha256") != file_checksum(path):
            problem = "its checksum does not match (truncated or changed on disk)"
        else:
            embeddings = np.load(path, mmap_mode="r")
            if embeddings.shape != (len(corpus), record.get("dimension")) or str(embeddings.dtype) != record.get(
                    "dtype", "float32"):
                problem = f"its shape {embeddings.shape} / {embeddings.dtype} is not what its record says"
            else:
                return embeddings
    except FileNotFoundError:
        problem = f"its record {sidecar.name} is missing (an interrupted write)"
    except (OSError, ValueError) as err:
        problem = f"it cannot be read ({type(err).__name__}: {err})"
    warnings.warn(f"embedding cache entry {path} is not usable: {problem}; encoding the corpus again", stacklevel=3)
    return None


class DenseRetriever:
    """Wraps any :class:`~retriever.protocol.Encoder`; searches a faiss index over the corpus embeddings.

    ``index`` is a faiss index-factory string (exact ``"Flat"`` by default), ``nprobe`` / ``ef_search``
    its search-time knobs, ``use_gpu`` None for "when faiss-gpu sees a GPU", ``k_limit`` the per-call
    depth cap of the device (faiss-gpu: 2048; deeper searches are exact, see ``retriever.index``).
    """

    kind = "dense"

    def __init__(self, encoder: Encoder, *, batch_size: int = 64, show_progress: bool = True,
                 index: str = "Flat", nprobe: int | None = None, ef_search: int | None = None,
                 use_gpu: bool | None = None, k_limit: int | None = None,
                 cache_dir: str | os.PathLike | None = None) -> None:
        check_index_spec(index)
        self.encoder = encoder
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.index_spec, self.nprobe, self.ef_search = index, nprobe, ef_search
        self.use_gpu, self.k_limit = use_gpu, k_limit
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.cache_hits = 0
        self._cached: tuple[Corpus, np.ndarray] | None = None
        self._index: tuple[Corpus, VectorIndex] | None = None
        self._last_queries: tuple[bytes, np.ndarray] | None = None
        name = getattr(encoder, "name", "") or type(encoder).__name__
        self.description = f"dense:{name}" + ("" if index == "Flat" else f"[{index}]")

    def _encode(self, texts: list[str], *, is_query: bool) -> np.ndarray:
        method = self.encoder.encode_queries if is_query else self.encoder.encode_documents
        parameters = inspect.signature(method).parameters
        takes_options = "batch_size" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        options = {"batch_size": self.batch_size, "show_progress": self.show_progress} if takes_options else {}
        return np.asarray(method(texts, **options), dtype=np.float32)  # a custom Encoder may take only texts

    def cache_path(self, corpus: Corpus) -> Path | None:
        """Where this encoder's embeddings of ``corpus`` are cached (None: caching off or encoder unknown)."""
        if self.cache_dir is None:
            return None
        identity = encoder_identity(self.encoder)
        if identity is None:
            return None
        key = hashlib.sha256(json.dumps({"encoder": identity, "corpus": corpus_fingerprint(corpus)},
                                        sort_keys=True).encode()).hexdigest()[:32]
        return self.cache_dir / f"{key}.npy"

    def corpus_embeddings(self, corpus: Corpus) -> np.ndarray:
        if self._cached is not None and self._cached[0] is corpus:
            return self._cached[1]
        path = self.cache_path(corpus)
        if path is not None and path.is_file():
            embeddings = _read_cache_entry(path, corpus)
            if embeddings is not None:
                self.cache_hits += 1
                self._cached = (corpus, embeddings)
                return embeddings
        embeddings = self._encode(corpus.texts(), is_query=False)
        if path is not None:
            with atomic_write(path, "wb") as handle:
                np.save(handle, embeddings)
            # The sidecar is written last: an entry without it (a crash in between) is never trusted.
            write_json(path.with_suffix(".json"), {"encoder": encoder_identity(self.encoder),
                                                   "corpus_sha256": corpus_fingerprint(corpus),
                                                   "documents": len(corpus), "dimension": int(embeddings.shape[1]),
                                                   "dtype": str(embeddings.dtype), "sha256": file_checksum(path)})
        self._cached = (corpus, embeddings)
        return embeddings

    def vector_index(self, corpus: Corpus) -> VectorIndex:
        if self._index is None or self._index[0] is not corpus:
            self._index = (corpus, VectorIndex(self.corpus_embeddings(corpus), self.index_spec, nprobe=self.nprobe,
                                               ef_search=self.ef_search, use_gpu=self.use_gpu,
                                               k_limit=self.k_limit))
        return self._index[1]

    def query_embeddings(self, queries: Queries) -> np.ndarray:
        """Embeddings of the query texts; the last batch is kept, because mining asks for the same queries
        twice (search, then the positives' scores) and encoding them is a large share of the work."""
        texts = list(queries.values())
        key = hashlib.sha256("\x00".join(texts).encode("utf-8")).digest()
        if self._last_queries is not None and self._last_queries[0] == key:
            return self._last_queries[1]
        embeddings = self._encode(texts, is_query=True)
        self._last_queries = (key, embeddings)
        return embeddings

    def search_and_score(self, corpus: Corpus, queries: Queries, top_k: int,
                         pairs: dict[str, list[str]]) -> tuple[Run, Run]:
        """``search`` and the listed documents' ``score`` with one encoding of the queries."""
        run = self.search(corpus, queries, top_k)
        documents = self.corpus_embeddings(corpus)
        vectors = self.query_embeddings(queries)
        scored = {query_id: {doc_id: float(np.asarray(documents[corpus.position[doc_id]]) @ vector)
                             for doc_id in pairs[query_id]}
                  for query_id, vector in zip(queries, vectors) if query_id in pairs}
        return run, scored

    def search(self, corpus: Corpus, queries: Queries, top_k: int) -> Run:
        scores, positions = self.vector_index(corpus).search(self.query_embeddings(queries), top_k,
                                                             show_progress=self.show_progress)
        return {query_id: {corpus.ids[p]: float(s) for s, p in zip(row_scores, row_positions) if p >= 0}
                for query_id, row_scores, row_positions in zip(queries, scores, positions)}

    def score(self, corpus: Corpus, queries: Queries, pairs: dict[str, list[str]]) -> Run:
        documents = self.corpus_embeddings(corpus)
        wanted = {query_id: queries[query_id] for query_id in pairs}
        query_vectors = self.query_embeddings(wanted)
        return {query_id: {doc_id: float(np.asarray(documents[corpus.position[doc_id]]) @ vector)
                           for doc_id in pairs[query_id]}
                for query_id, vector in zip(wanted, query_vectors)}
