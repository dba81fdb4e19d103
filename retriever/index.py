"""Maximum-inner-product search with faiss: exact by default, IVF/HNSW for large corpora, GPU when present.

Why this module exists rather than a bare ``faiss.IndexFlatIP``:

- the index is any faiss *index-factory* string (``"Flat"``, ``"IVF256,Flat"``, ``"HNSW32"``,
  ``"IVF4096,PQ32"``...), checked with ``faiss.index_factory`` on a tiny dimension before any model is
  loaded, so a typo fails in a second (:func:`check_index_spec`);
- queries are searched in chunks so only ``chunk_size x k`` results are alive beyond the output;
- with faiss-gpu and a GPU the index moves to the GPU, where faiss refuses ``k`` above 2048. Deeper
  pools are searched *exactly*, not capped: the corpus is split into shards, each shard returns at most
  ``k_limit`` candidates, the lists are merged, and any query for which a shard filled its whole list
  above the merged k-th score (so it might hold more of the top k) is searched again on the CPU copy.
  ``k_limit`` is a parameter, so that path runs and is tested on a CPU-only machine too. Approximate
  (IVF) GPU indexes fall back to their CPU copy when ``k`` exceeds the limit. HNSW has no GPU version and
  stays on the CPU.
"""

from __future__ import annotations

import logging
import math

import faiss
import numpy as np
from tqdm.auto import tqdm

from retriever.io import HardnegError, last_line

GPU_K_LIMIT = 2048  # faiss-gpu's largest k (and nprobe) per search call
_LOG = logging.getLogger(__name__)


def check_index_spec(spec: str) -> None:
    """Refuse an index-factory string faiss does not understand, without loading any data.

    Tried on a few small dimensions because some factories (``PQ16``, ``OPQ32``) need a dimension that
    their sub-quantizer count divides; the string is valid when any of them builds.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise HardnegError("index: give a faiss index-factory string such as Flat, IVF256,Flat or HNSW32")
    error = None
    for dimension in (64, 96, 384, 768):
        try:
            faiss.index_factory(dimension, spec, faiss.METRIC_INNER_PRODUCT)
            return
        except RuntimeError as err:  # faiss raises RuntimeError for unknown strings
            error = str(err).strip().split(": ")[-1] or "unknown"
    raise HardnegError(f"unknown faiss index {spec!r} (faiss: {error}); examples: Flat, IVF256,Flat, HNSW32, "
                       "IVF1024,PQ32")


def use_gpu_default() -> bool:
    return faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")


class VectorIndex:
    """A faiss inner-product index over ``documents`` (rows are corpus positions).

    ``spec`` is a faiss index-factory string; ``nprobe`` (IVF) and ``ef_search`` (HNSW) trade speed for
    recall at search time. ``use_gpu=None`` means "when faiss-gpu sees a GPU". ``shard_size`` splits
    an exact index into that many documents per shard (bounded GPU memory, and the deep-k path).
    """

    def __init__(self, documents: np.ndarray, spec: str = "Flat", *, nprobe: int | None = None,
                 ef_search: int | None = None, use_gpu: bool | None = None, k_limit: int | None = None,
                 shard_size: int | None = None, seed: int = 42) -> None:
        check_index_spec(spec)
        documents = np.ascontiguousarray(documents, dtype=np.float32)
        if documents.ndim != 2 or len(documents) == 0:
            raise HardnegError("index: need a non-empty 2-d array of document embeddings")
        self.spec, self.dimension, self.size = spec, documents.shape[1], len(documents)
        self.use_gpu = use_gpu_default() if use_gpu is None else use_gpu
        self.k_limit = k_limit if k_limit is not None else (GPU_K_LIMIT if self.use_gpu else None)
        self.exact = spec.replace(" ", "") in ("Flat", "IDMap,Flat")
        self.re_searched = 0  # queries whose sharded result could hide more of the top k (searched again)
        cpu = faiss.index_factory(self.dimension, spec, faiss.METRIC_INNER_PRODUCT)
        if not cpu.is_trained:
            # Train on a seeded sample: IVF centroids (and so the results) are then reproducible.
            sample = documents
            if len(documents) > 256 * 1024:
                rng = np.random.default_rng(seed)
                sample = documents[np.sort(rng.choice(len(documents), 256 * 1024, replace=False))]
            _train(cpu, spec, sample)
        self._set_search_params(cpu, nprobe, ef_search)
        self.nprobe, self.ef_search = nprobe, ef_search
        # Kept only where a deep or sharded search may need to rebuild part of the index (memory).
        self._documents = documents if (self.k_limit or shard_size) else None
        self._cpu = cpu
        if self.exact and not self.use_gpu and not shard_size and self.k_limit is None:
            # Exact search on the CPU needs no index: faiss.knn reads the array (or the memory-mapped cache
            # file) in place, so a 1M x 384 corpus costs 1.5 GB once instead of twice.
            self._documents, self._cpu, self._shards = documents, None, []
            return
        if self.exact and shard_size:
            self._shards = [(start, self._build_flat(documents[start:start + shard_size]))
                            for start in range(0, len(documents), shard_size)]
            self._cpu = None  # saturated queries are re-searched with faiss.knn over the array
        else:
            cpu.add(documents)
            self._shards = [(0, self._to_device(cpu))]
            if self.exact and self._shards[0][1] is not cpu:
                self._cpu = None  # on the GPU: a host copy is not needed for exact re-searches (faiss.knn)

    @staticmethod
    def _set_search_params(index, nprobe: int | None, ef_search: int | None) -> None:
        if nprobe is not None:
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is None:
                raise HardnegError("index: nprobe only applies to IVF indexes")
            ivf.nprobe = int(nprobe)
        if ef_search is not None:
            hnsw = _find_hnsw(index)
            if hnsw is None:
                raise HardnegError("index: ef_search only applies to HNSW indexes")
            hnsw.hnsw.efSearch = int(ef_search)

    def _build_flat(self, documents: np.ndarray):
        index = faiss.IndexFlatIP(self.dimension)
        index.add(documents)
        return self._to_device(index)

    def _to_device(self, index):
        if not self.use_gpu or _find_hnsw(index) is not None:
            return index
        try:
            return faiss.index_cpu_to_all_gpus(index)
        except (RuntimeError, AttributeError) as err:  # e.g. an index type with no GPU version
            _LOG.warning("faiss index %s stays on the CPU: %s", self.spec, err)
            return index

    def search(self, queries: np.ndarray, top_k: int, chunk_size: int = 4096,
               show_progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions), each ``len(queries) x min(top_k, size)``, best first; -1 pads a short list."""
        k = min(int(top_k), self.size)
        scores = np.empty((len(queries), k), dtype=np.float32)
        positions = np.empty((len(queries), k), dtype=np.int64)
        with tqdm(total=len(queries), desc=f"search {self.spec}", unit="query",
                  disable=not show_progress or len(queries) <= chunk_size) as bar:
            for start in range(0, len(queries), chunk_size):
                chunk = np.ascontiguousarray(queries[start:start + chunk_size], dtype=np.float32)
                end = start + len(chunk)
                scores[start:end], positions[start:end] = self._search_chunk(chunk, k)
                bar.update(len(chunk))
        return scores, positions

    def _search_chunk(self, chunk: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self._shards:
            return faiss.knn(chunk, self._documents, k, metric=faiss.METRIC_INNER_PRODUCT)
        limited = self.k_limit is not None and k > self.k_limit
        if len(self._shards) == 1 and not limited:
            return self._shards[0][1].search(chunk, k)
        if not self.exact:
            # An approximate index cannot be merged exactly across a k cap: search its CPU copy.
            if limited:
                _LOG.info("k=%d exceeds the GPU limit %d; searching %s on the CPU", k, self.k_limit, self.spec)
                return self._cpu.search(chunk, k)
            return self._shards[0][1].search(chunk, k)
        return self._search_shards(chunk, k)

    def _search_shards(self, chunk: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over shards whose searches each return at most ``k_limit`` rows."""
        shards = self._shards
        if len(shards) == 1:
            # One index but k too deep for it: split it so that each shard holds, on average, a quarter of
            # k_limit of a query's top k; a shard that still fills its list sends that query to the re-search.
            size = math.ceil(self.size / max(2, math.ceil(4 * k / self.k_limit)))
            shards = [(start, self._build_flat(self._documents[start:start + size]))
                      for start in range(0, self.size, size)]
            self._shards = shards
        all_scores, all_positions, saturated = [], [], []
        for offset, index in shards:
            shard_k = min(k, index.ntotal, self.k_limit or k)
            s, p = index.search(chunk, shard_k)
            all_scores.append(s)
            all_positions.append(np.where(p >= 0, p + offset, -1))
            # A shard that returned fewer rows than it holds may have more above the merged cutoff.
            saturated.append(s[:, -1] if shard_k < min(k, index.ntotal) else np.full(len(chunk), -np.inf))
        scores, positions = merge_top_k(np.concatenate(all_scores, axis=1), np.concatenate(all_positions, axis=1), k)
        cutoff = scores[:, -1]
        redo = np.zeros(len(chunk), dtype=bool)
        for last in saturated:
            redo |= last >= cutoff
        self.re_searched += int(redo.sum())
        if redo.any():
            scores[redo], positions[redo] = faiss.knn(chunk[redo], self._documents, k,
                                                      metric=faiss.METRIC_INNER_PRODUCT)
        return scores, positions


def check_index_fits(spec: str, documents: int) -> None:
    """Refuse an index the corpus is too small to train, before any document is encoded: an IVF index needs at
    least one document per list (IVF4096 on NFCorpus's 3,633 documents is otherwise a faiss traceback)."""
    check_index_spec(spec)
    try:
        lists = faiss.extract_index_ivf(faiss.index_factory(768, spec, faiss.METRIC_INNER_PRODUCT)).nlist
    except (RuntimeError, TypeError, AttributeError, ValueError):
        return  # not an IVF index (or one faiss builds only at full dimension: its training says)
    if documents < lists:
        raise HardnegError(f"index {spec}: IVF{lists} needs at least {lists} documents to train its {lists} lists "
                           f"(faiss advises 39 per list); the corpus has {documents} documents. Use fewer lists "
                           f"(IVF{max(1, documents // 39)},Flat) or Flat")


def _train(index, spec: str, sample: np.ndarray) -> None:
    """Train ``index`` on ``sample``; what faiss refuses is the user's to fix, not a faiss traceback."""
    check_index_fits(spec, len(sample))
    try:
        index.train(sample)
    except RuntimeError as err:
        raise HardnegError(f"index {spec}: faiss could not train it on {len(sample)} documents ({last_line(err)})") \
            from None


def merge_top_k(scores: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` per row of candidate lists (from shards of the corpus, or chunks of it); equal scores by corpus
    position, the order a single flat index gives, so a merged result does not depend on how the corpus was cut."""
    if scores.shape[1] < k:  # fewer candidates than asked (k-capped shards): pad; the caller re-searches
        pad = k - scores.shape[1]
        scores = np.hstack([scores, np.full((len(scores), pad), -np.inf, dtype=scores.dtype)])
        positions = np.hstack([positions, np.full((len(positions), pad), -1, dtype=positions.dtype)])
    scores = np.where(positions >= 0, scores, -np.inf)
    order = np.lexsort((np.where(positions >= 0, positions, np.iinfo(np.int64).max), -scores), axis=1)[:, :k]
    return (np.take_along_axis(scores, order, axis=1).astype(np.float32),
            np.take_along_axis(positions, order, axis=1))


def _find_hnsw(index):
    """The HNSW index inside ``index`` (possibly behind a pre-transform), or None."""
    for candidate in (index, getattr(faiss, "downcast_index", lambda x: x)(index)):
        if hasattr(candidate, "hnsw"):
            return candidate
    if isinstance(index, faiss.IndexPreTransform):
        return _find_hnsw(faiss.downcast_index(index.index))
    return None


def exact_search(documents: np.ndarray, queries: np.ndarray, top_k: int,
                 chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search (CPU or GPU); ``(scores, positions)`` best first."""
    return VectorIndex(documents).search(queries, top_k, chunk_size)
