"""Dense retrieval: encode the corpus once (cached on disk), then search a faiss index (``retriever.index``).

Encoding the corpus is the expensive step of dense mining and evaluation, and users re-run mining with
other filters many times. With ``cache_dir`` set, the corpus embeddings are saved there as ``.npy`` under
a key made of everything that changes them: the model's identity (its resolved path and the checksums of
its weight and config files, or its hub name), the corpus content (sha256 over ids and texts), and the
encoding options (max length, document prefix, pooling, normalisation, and the precision the
encoder runs in: bf16 and fp32 embeddings are never mixed). A later run with the same key
memory-maps the file instead of encoding; any change gives a new key, never a stale hit.

Under ``torchrun`` every rank encodes, caches and searches its own contiguous rows of the corpus; the queries
are encoded in shares and exchanged, and only the per-shard top-k lists and the scores of requested documents
travel between ranks (:meth:`DenseRetriever.search_embeddings`). Every rank calls the same methods in the same
order with the same arguments (each is a collective), and ends with the same results.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retriever.data import Corpus, Queries, Run, corpus_fingerprint, standardized
from retriever.embedding_cache import (
    EmbeddingCache,
    Rows,
    block_size,
    collect,
    encode_in_blocks,
    exact_top_k,
    release,
    shard_rows,
)
from retriever.index import VectorIndex, check_index_spec, merge_top_k, use_gpu_default
from retriever.io import file_checksum
from retriever.protocol import Encoder, PrecisionAware, components
from retriever.ranks import process_group

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
        self._rows: tuple[Corpus, list[Rows]] | None = None
        self.documents_encoded = 0  # by this process (the rest of its rows came from the cache)
        self.shard_documents = 0
        self._index: tuple[Corpus, VectorIndex] | None = None
        self._moments: tuple[Corpus, np.ndarray, np.ndarray] | None = None
        self._last_queries: tuple[bytes, np.ndarray] | None = None
        name = getattr(encoder, "name", "") or type(encoder).__name__
        self.description = f"dense:{name}" + ("" if index == "Flat" else f"[{index}]")

    def _encode(self, texts: list[str], *, is_query: bool, show_progress: bool | None = None) -> np.ndarray:
        method = self.encoder.encode_queries if is_query else self.encoder.encode_documents
        parameters = inspect.signature(method).parameters
        takes_options = "batch_size" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        show = self.show_progress if show_progress is None else show_progress
        options = {"batch_size": self.batch_size, "show_progress": show} if takes_options else {}
        return np.asarray(method(texts, **options), dtype=np.float32)  # a custom Encoder may take only texts

    def cache_path(self, corpus: Corpus) -> Path | None:
        """Where this encoder's embeddings of the whole ``corpus`` are cached (None: caching off or encoder unknown);
        the row ranges ranks write sit beside it (:mod:`retriever.embedding_cache`)."""
        if self.cache_dir is None:
            return None
        identity = encoder_identity(self.encoder)
        if identity is None:
            return None
        key = hashlib.sha256(json.dumps({"encoder": identity, "corpus": corpus_fingerprint(corpus)},
                                        sort_keys=True).encode()).hexdigest()[:32]
        return self.cache_dir / f"{key}.npy"

    def local_rows(self, corpus: Corpus) -> list[Rows]:
        """This process's rows of the corpus embeddings: all of them, or under torchrun its contiguous shard of
        whole encoding blocks (:func:`~retriever.embedding_cache.shard_rows`). Rows a valid cache entry holds
        are memory-mapped from it, whichever world size wrote it; the others are encoded, a block at a time, and
        cached as this rank's own entry."""
        if self._rows is not None and self._rows[0] is corpus:
            return self._rows[1]
        group = process_group()
        start, end = shard_rows(len(corpus), group.rank(), group.world_size()) if group else (0, len(corpus))
        path = self.cache_path(corpus)
        cache = EmbeddingCache(path, corpus, encoder_identity(self.encoder)) if path is not None else None
        if cache is not None:
            pieces, gaps = cache.rows(start, end)
        else:
            pieces, gaps = [], [(start, end)] if end > start else []
        if not gaps and pieces:
            self.cache_hits += 1
        several = sum(last - first for first, last in gaps) > block_size(len(corpus))
        with tqdm(total=sum(last - first for first, last in gaps), desc="encode documents", unit="text",
                  disable=not self.show_progress or not several) as bar:
            def encode(texts: list[str]) -> np.ndarray:  # one bar over the blocks, not a bar per block
                vectors = self._encode(texts, is_query=False, show_progress=self.show_progress and not several)
                bar.update(len(texts))
                return vectors

            for first, last in gaps:
                blocks = encode_in_blocks(encode, corpus.text, len(corpus), first, last)
                if cache is not None:
                    pieces.append(cache.write(first, last, blocks))
                else:
                    pieces.append(collect(first, last, blocks))
                self.documents_encoded += last - first
        pieces.sort(key=lambda piece: piece.start)
        self._rows = (corpus, pieces)
        self.shard_documents = end - start
        return pieces

    def corpus_embeddings(self, corpus: Corpus) -> np.ndarray:
        """Every document's embedding, in corpus order (memory-mapped from the cache when one entry holds them).

        Under torchrun this gathers every rank's rows on every rank, so it is for callers that need the whole
        matrix; hardneg's own search and scoring work on :meth:`local_rows` and exchange only results."""
        if self._cached is not None and self._cached[0] is corpus:
            return self._cached[1]
        pieces = self.local_rows(corpus)
        group = process_group()
        if group:
            pieces = [piece for part in group.all_gather_objects([Rows(p.start, np.asarray(p.array))
                                                                 for p in pieces]) for piece in part]
        embeddings = _joined(pieces)
        self._cached = (corpus, embeddings)
        return embeddings

    def vector_index(self, corpus: Corpus) -> VectorIndex:
        """A faiss index over this process's rows (all of them, or its shard under torchrun: an IVF or HNSW index
        is then trained on the shard alone); positions are local to the rows, see :meth:`search`."""
        if self._index is None or self._index[0] is not corpus:
            rows = _joined(self.local_rows(corpus))
            self._index = (corpus, VectorIndex(rows, self.index_spec, nprobe=self.nprobe, ef_search=self.ef_search,
                                               use_gpu=self.use_gpu, k_limit=self.k_limit))
        return self._index[1]

    def query_embeddings(self, queries: Queries) -> np.ndarray:
        """Embeddings of the query texts, encoded in blocks as the corpus is (under torchrun each rank encodes
        a contiguous run of blocks and all get all); the last batch is kept, because mining asks for the same
        queries twice (search, then the positives' scores) and encoding them is a large share of the work."""
        texts = list(queries.values())
        key = hashlib.sha256("\x00".join(texts).encode("utf-8")).digest()
        if self._last_queries is not None and self._last_queries[0] == key:
            return self._last_queries[1]
        group = process_group()
        start, end = shard_rows(len(texts), group.rank(), group.world_size()) if group else (0, len(texts))
        blocks = list(encode_in_blocks(lambda batch: self._encode(batch, is_query=True), texts.__getitem__,
                                       len(texts), start, end))
        if group:
            blocks = [block for part in group.all_gather_objects(blocks) for block in part]
        embeddings = np.concatenate(blocks) if blocks else np.zeros((0, 0), dtype=np.float32)
        self._last_queries = (key, embeddings)
        return embeddings

    def search_embeddings(self, corpus: Corpus, vectors: np.ndarray, top_k: int, *,
                          exact: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, positions)`` of the top ``top_k`` documents for each query vector, best first; ``exact``
        searches exactly whatever the index (evaluation does).

        Exact search on the CPU reads the rows a chunk at a time (:func:`~retriever.embedding_cache.exact_top_k`),
        so a memory-mapped corpus larger than memory is searched in bounded memory. Under torchrun each rank
        searches its shard and the per-shard lists are merged with the tie rule of one process (equal scores by
        corpus position): with ``Flat`` the result is the one-process result."""
        pieces = self.local_rows(corpus)
        k = min(int(top_k), len(corpus))
        flat = exact or self.index_spec.replace(" ", "") in ("Flat", "IDMap,Flat")
        on_gpu = use_gpu_default() if self.use_gpu is None else self.use_gpu
        if not pieces:  # more ranks than documents: this one holds none
            scores = np.zeros((len(vectors), 0), dtype=np.float32)
            positions = np.zeros((len(vectors), 0), dtype=np.int64)
        elif flat and not on_gpu and self.k_limit is None:
            scores, positions = exact_top_k(pieces, vectors, k)
        else:
            index = self.vector_index(corpus) if not exact or self.index_spec == "Flat" else VectorIndex(
                _joined(pieces), "Flat", use_gpu=self.use_gpu, k_limit=self.k_limit)
            scores, positions = index.search(vectors, k, show_progress=self.show_progress)
            positions = np.where(positions >= 0, positions + pieces[0].start, -1)
        group = process_group()
        if group:
            parts = group.all_gather_objects((scores, positions))
            scores, positions = merge_top_k(np.hstack([s for s, _ in parts]), np.hstack([p for _, p in parts]), k)
        return scores, positions

    def search_and_score(self, corpus: Corpus, queries: Queries, top_k: int,
                         pairs: dict[str, list[str]]) -> tuple[Run, Run]:
        """``search`` and the listed documents' ``score`` with one encoding of the queries."""
        return self.search(corpus, queries, top_k), self.score(corpus, queries, pairs)

    def search(self, corpus: Corpus, queries: Queries, top_k: int) -> Run:
        scores, positions = self.search_embeddings(corpus, self.query_embeddings(queries), top_k)
        return {query_id: {corpus.ids[p]: float(s) for s, p in zip(row_scores, row_positions) if p >= 0}
                for query_id, row_scores, row_positions in zip(queries, scores, positions)}

    def score(self, corpus: Corpus, queries: Queries, pairs: dict[str, list[str]]) -> Run:
        """The listed documents' scores; under torchrun each rank scores the documents of its shard."""
        pieces = self.local_rows(corpus)
        wanted = {query_id: queries[query_id] for query_id in pairs}
        vectors = dict(zip(wanted, self.query_embeddings(wanted)))
        found: dict[str, dict[str, float]] = {}
        for query_id, doc_ids in pairs.items():
            for doc_id in doc_ids:
                position = corpus.position[doc_id]
                for piece in pieces:
                    if piece.start <= position < piece.end:
                        found.setdefault(query_id, {})[doc_id] = float(
                            np.asarray(piece.array[position - piece.start]) @ vectors[query_id])
        group = process_group()
        if group:
            for part in group.all_gather_objects(found):
                for query_id, scored in part.items():
                    found.setdefault(query_id, {}).update(scored)
        return {query_id: {doc_id: found[query_id][doc_id] for doc_id in doc_ids}
                for query_id, doc_ids in pairs.items()}

    def corpus_moments(self, corpus: Corpus) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, covariance)`` of the corpus embeddings (float64), from one pass over the rows.

        The sums are taken per encoding block (boundaries from the corpus alone, as the ranks' shards are) and
        combined on a fixed binary tree over the block numbers (:class:`_BlockTree`), so under torchrun, where
        each rank sums its own run of blocks and the partial sums are exchanged, every rank gets the bits one
        process gets, while a rank holds O(log blocks) d x d sums rather than one per block; memory-mapped rows
        are released as they go."""
        if self._moments is not None and self._moments[0] is corpus:
            return self._moments[1], self._moments[2]
        size = block_size(len(corpus))
        tree = _BlockTree()
        for piece in self.local_rows(corpus):
            if piece.start % size:  # the cache and the shards hand out runs of whole blocks (shard_rows)
                raise RuntimeError(f"corpus rows from {piece.start} do not start an encoding block of {size}")
            for first in range(piece.start, piece.end, size):
                last = min(piece.end, first + size)
                block = np.asarray(piece.array[first - piece.start:last - piece.start], dtype=np.float64)
                release(piece.array)
                tree.add(first // size, (block.sum(axis=0), block.T @ block))
        group = process_group()
        parts = group.all_gather_objects(tree.nodes()) if group else [tree.nodes()]
        total, outer = _BlockTree.combine(parts, blocks=-(-len(corpus) // size))
        mean = total / len(corpus)
        covariance = outer / len(corpus) - np.outer(mean, mean)
        self._moments = (corpus, mean, covariance)
        return mean, covariance

    def standardized_scores(self, corpus: Corpus, queries: Queries, pairs: dict[str, list[str]]) -> Run:
        """The listed documents' scores as z-scores over the whole corpus (``StandardizedScorer``).

        A query's mean and variance over every document are exact without scoring every document: for query
        vector ``q`` they are ``q . mu`` and ``q^T Sigma q`` with the corpus embeddings' mean ``mu`` and covariance
        ``Sigma`` (:meth:`corpus_moments`), so standardising costs one pass over the corpus, not a search."""
        raw = self.score(corpus, queries, pairs)
        mean, covariance = self.corpus_moments(corpus)
        wanted = {query_id: queries[query_id] for query_id in pairs}
        vectors = self.query_embeddings(wanted).astype(np.float64)
        means = vectors @ mean
        deviations = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", vectors, covariance, vectors), 0.0))
        return {query_id: standardized(raw[query_id], means[i], deviations[i])
                for i, query_id in enumerate(wanted)}

    def shard_record(self) -> dict:
        """How the corpus was split, for ``metrics.json`` / ``pools.meta.json``: the world size and, per rank,
        the documents it held and how many of them it encoded (the rest came from the cache)."""
        group = process_group()
        mine = {"documents": self.shard_documents, "encoded": self.documents_encoded}
        ranks = group.all_gather_objects(mine) if group else [mine]
        return {"model": getattr(self.encoder, "name", "") or type(self.encoder).__name__, "world_size": len(ranks),
                "ranks": [{"rank": r} | part for r, part in enumerate(ranks)]}


def _joined(pieces: list[Rows]) -> np.ndarray:
    """The rows of consecutive pieces as one matrix (the piece itself, memory-mapped, when there is one)."""
    return pieces[0].array if len(pieces) == 1 else np.concatenate([piece.array for piece in pieces])


class _BlockTree:
    """A running sum of per-block values (tuples of arrays) over consecutive block numbers, added on a fixed
    binary tree: node (level, k) is the sum of blocks ``[k * 2**level, (k + 1) * 2**level)``, left child plus
    right. Whichever contiguous runs of blocks the ranks hold, :meth:`combine` adds the same operands in the same
    order, so the floating-point result does not depend on the number of processes; and a run of blocks keeps
    only its O(log blocks) complete nodes (a sequential sum would too, but its bits would change with the
    shard boundaries)."""

    def __init__(self) -> None:
        self._stack: list[tuple[int, int, tuple]] = []

    def add(self, block: int, value: tuple) -> None:
        level, index = 0, block
        while index % 2 and self._stack and self._stack[-1][:2] == (level, index - 1):
            left = self._stack.pop()[2]
            value = tuple(a + b for a, b in zip(left, value))
            level, index = level + 1, index // 2
        self._stack.append((level, index, value))

    def nodes(self) -> dict[tuple[int, int], tuple]:
        return {(level, index): value for level, index, value in self._stack}

    @staticmethod
    def combine(parts: list[dict[tuple[int, int], tuple]], *, blocks: int) -> tuple:
        """The sum over blocks ``[0, blocks)`` from the nodes every rank kept (together they cover each block)."""
        nodes = {key: value for part in parts for key, value in part.items()}

        def node(level: int, index: int) -> tuple:
            if (level, index) in nodes:
                return nodes[(level, index)]
            left = node(level - 1, 2 * index)
            if (2 * index + 1) << (level - 1) >= blocks:  # the right child lies past the last block
                return left
            return tuple(a + b for a, b in zip(left, node(level - 1, 2 * index + 1)))

        return node(max(0, (blocks - 1).bit_length()), 0)
