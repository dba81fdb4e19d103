"""Candidate sources for mining, as objects that compose: BM25, dense, hybrid fusion, and rescoring.

Every source is a :class:`retriever.protocol.Retriever` (``search(corpus, queries, top_k) -> Run``);
positive-aware filters also need :class:`~retriever.protocol.Scorer` (``score(corpus, queries, pairs)``)
so that the positives are scored on the same scale as the candidates. The pieces:

- :func:`bm25` and :func:`dense` build hardneg's BM25 (bm25s or rank-bm25) and faiss retrievers;
- :class:`Hybrid` fuses the ranked lists of several sources with reciprocal-rank fusion;
- :class:`CrossEncoderScorer` scores (query, document) pairs with any sentence-transformers ``CrossEncoder``;
- :class:`Rescored` puts a scorer (a cross-encoder, or a *teacher* bi-encoder distinct from the model being
  trained) behind a source: the source proposes candidates, the scorer gives them and the positives their
  scores, and the filters compare those. A rescorer is never silently dropped: the pools record its name
  as each negative's ``source`` and ``pools.meta.json`` records it in the settings.

Example::

    from mining import sources
    candidates = sources.Hybrid([sources.bm25(), sources.dense("all-MiniLM-L6-v2")], k=60)
    source = sources.Rescored(candidates, sources.CrossEncoderScorer("path/to/cross-encoder"))
    mine(dataset, source, depth=200, filter=TopKPercPos(0.95))
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from tqdm.auto import tqdm

from mining.settings import FUSE_NEEDS_DENSE, RRF_K
from retriever.bm25 import BM25Retriever
from retriever.data import Corpus, Queries, Run
from retriever.encoding import autocast, resolve_precision
from retriever.factory import as_retriever
from retriever.io import HardnegError, last_line
from retriever.protocol import Retriever, Scorer, StandardizedScorer, components, describe
from retriever.ranks import process_group, work_record


def bm25(backend: str = "bm25s", *, k1: float = 0.9, b: float = 0.4, show_progress: bool = True) -> BM25Retriever:
    """BM25 with bm25s (default, fast) or rank-bm25 (the reference); both see the same tokens."""
    return BM25Retriever(backend=backend, k1=k1, b=b, show_progress=show_progress)


def dense(model: object, **options) -> Retriever:
    """A dense retriever from a model name/path or an Encoder; ``options`` as for ``as_retriever``
    (``index="HNSW32"``, ``nprobe``, ``ef_search``, ``cache_dir``, ``batch_size``, ``max_length`` ...)."""
    if isinstance(model, str) and model.split(":")[0].lower() == "bm25":
        raise HardnegError("sources.dense: give a model name or path, not bm25")
    return as_retriever(model, **options)


def ranked(run_row: dict[str, float], corpus: Corpus) -> list[str]:
    """Document ids best first; equal scores by corpus position, so the order never depends on dict order."""
    return sorted(run_row, key=lambda doc_id: (-run_row[doc_id], corpus.position[doc_id]))


class Hybrid:
    """Reciprocal-rank fusion: ``score(d) = sum over sources of 1 / (k + rank_s(d))``, rank 1-based.

    A document a source did not return contributes nothing from it (standard RRF). Each source is searched
    ``source_depth`` deep (default: the requested depth). RRF scores are ranks, not similarities, so a
    positive's score cannot be put on their scale: with a positive-aware filter, rescore the fused pool with
    a teacher or a cross-encoder (:class:`Rescored`), or use naive top-k.
    """

    kind = "hybrid"

    def __init__(self, sources: Sequence[Retriever], *, k: float = RRF_K, source_depth: int | None = None) -> None:
        if len(sources) < 2:
            raise HardnegError("hybrid: give at least two sources to fuse")
        if k <= 0:
            raise HardnegError(f"hybrid: the RRF constant k must be positive, got {k}")
        self.sources = list(sources)
        self.k, self.source_depth = float(k), source_depth
        self.description = f"hybrid-rrf(k={k:g}):" + "+".join(describe(s) for s in self.sources)

    def search(self, corpus: Corpus, queries: Queries, top_k: int) -> Run:
        depth = self.source_depth or top_k
        fused: dict[str, dict[str, float]] = {query_id: {} for query_id in queries}
        for source in self.sources:
            run = source.search(corpus, queries, depth)
            for query_id in queries:
                row = fused[query_id]
                for rank, doc_id in enumerate(ranked(run.get(query_id, {}), corpus), start=1):
                    row[doc_id] = row.get(doc_id, 0.0) + 1.0 / (self.k + rank)
        return {query_id: {doc_id: row[doc_id] for doc_id in ranked(row, corpus)[:top_k]}
                for query_id, row in fused.items()}

    def parts(self) -> list[object]:
        return list(self.sources)


class ScoreFusion:
    """A hybrid scorer: ``score = sum of weight x z`` over its parts, where ``z`` is each part's score standardised
    per query over the whole corpus (:class:`~retriever.protocol.StandardizedScorer`: BM25 and dense retrieval).

    Why: BM25 and a bi-encoder miss different relevant documents, and their fused scores rank better than either
    (NFCorpus dev nDCG@10: all-MiniLM-L6-v2 0.302, BM25 0.284, MiniLM + 0.3 x BM25 0.336; all-mpnet-base-v2 0.320,
    fused 0.351; BENCHMARKS.md "A hybrid teacher"). Behind the filters and as the soft labels of distillation
    (``--fuse-bm25``) it is a stronger teacher than its dense part, and the student learns some of what lexical
    matching finds.

    Why standardise over the whole corpus rather than over the scored candidates: a document's score then depends
    on the query alone, so positives and candidates scored in separate calls share one scale, and the weights mean
    the same for every query and every re-mining round. Unlike RRF (:class:`Hybrid`), the fused scores are scores,
    so positive-aware filters can compare candidates with the positives. They are z-scores (often negative): use a
    filter that is sign-safe (``topk-percpos`` is, ``topk-marginpos`` too).
    """

    kind = "fused"

    def __init__(self, parts: Sequence[tuple[object, float]]) -> None:
        if len(parts) < 2:
            raise HardnegError("score fusion: give at least two scorers to fuse")
        for part, weight in parts:
            if not isinstance(part, StandardizedScorer):
                raise HardnegError(f"score fusion: {describe(part)} cannot standardise its scores over the corpus "
                                   "(BM25 and dense retrievers can; a cross-encoder cannot score every document)")
            if not weight > 0:
                raise HardnegError(f"score fusion: weights must be positive, got {weight} for {describe(part)}")
        self.weighted = [(part, float(weight)) for part, weight in parts]
        self.description = "fused-z(" + "+".join(f"{weight:g}*{describe(part)}" for part, weight in parts) + ")"

    def score(self, corpus: Corpus, queries: Queries, pairs: dict[str, list[str]]) -> Run:
        fused: Run = {query_id: dict.fromkeys(doc_ids, 0.0) for query_id, doc_ids in pairs.items()}
        for part, weight in self.weighted:
            for query_id, row in part.standardized_scores(corpus, queries, pairs).items():
                for doc_id, value in row.items():
                    fused[query_id][doc_id] += weight * value
        return fused

    def parts(self) -> list[object]:
        return [part for part, _ in self.weighted]


class CrossEncoderScorer:
    """Scores (query, document) pairs with a sentence-transformers ``CrossEncoder`` (a path or a hub name).

    The model's own activation is applied (sigmoid for a one-label model, as ``CrossEncoder.predict`` does),
    so scores are what sentence-transformers users see. Pairs are scored longest-first in batches so
    padding is small; the output order is the input order.
    """

    kind = "cross-encoder"

    def __init__(self, model: str | os.PathLike | object, *, batch_size: int = 32, max_length: int | None = None,
                 device: str | None = None, show_progress: bool = True, precision: str = "auto") -> None:
        if isinstance(model, (str, os.PathLike)):
            from retriever.encoder import resolve_model

            location = resolve_model(model)  # a missing path is refused here, before any work
            try:
                from sentence_transformers import CrossEncoder

                model = CrossEncoder(location, max_length=max_length, device=device)
            except Exception as err:  # OSError/ValueError for a bad folder, the weight loaders' own types for damage
                raise HardnegError(f"cannot load cross-encoder '{location}': {type(err).__name__}: "
                                   f"{last_line(err)}") from None
            self.name = str(location)
        else:
            self.name = getattr(model, "name_or_path", None) or type(model).__name__
        if not hasattr(model, "predict"):
            raise HardnegError("cross-encoder: the model has no predict(pairs) method")
        self.model, self.batch_size, self.show_progress = model, batch_size, show_progress
        self.precision, self.device = precision, getattr(model, "device", "cpu")
        self.shard_pairs = 0  # pairs this process has scored (its shares under torchrun)
        resolve_precision(precision, self.device)  # refused now if the device cannot run it
        self.description = f"cross-encoder:{self.name}"

    @property
    def encode_precision(self) -> str:
        """The precision the cross-encoder scores in (``retriever.encoding``; scores leave it as float32)."""
        return resolve_precision(self.precision, self.device)

    def score(self, corpus: Corpus, queries: Queries, pairs: dict[str, list[str]]) -> Run:
        """Under torchrun each rank scores a contiguous run of whole batches of the one-process order, so every
        batch (and with it every score) is the one a single process computes."""
        keys = [(query_id, doc_id) for query_id, doc_ids in pairs.items() for doc_id in doc_ids]
        order = np.argsort([-(len(queries[q]) + len(corpus.text_of(d))) for q, d in keys], kind="stable")
        group = process_group()
        first, last = 0, len(keys)
        if group is not None:
            batches = group.shard(-(-len(keys) // self.batch_size))
            first, last = min(batches.start * self.batch_size, last), min(batches.stop * self.batch_size, last)
        self.shard_pairs += last - first
        predicted = self._predict([(queries[keys[i][0]], corpus.text_of(keys[i][1])) for i in order[first:last]])
        if group is not None:
            predicted = np.concatenate(group.all_gather_objects(predicted))
        scores = np.empty(len(keys), dtype=np.float32)
        scores[order] = predicted
        run: Run = {query_id: {} for query_id in pairs}
        for (query_id, doc_id), value in zip(keys, scores):
            run[query_id][doc_id] = float(value)
        return run

    def _predict(self, texts: list[tuple[str, str]]) -> np.ndarray:
        """One float32 score per (query, document) text pair, in the order given, one ``predict`` call per
        batch: the model sorts what it is given by length, so handing it one batch at a time keeps every batch
        the one a single process forms, whichever rank scores it."""
        if not texts:
            return np.zeros(0, dtype=np.float32)
        parts = []
        with autocast(self.precision, self.device):
            for start in tqdm(range(0, len(texts), self.batch_size), desc="cross-encoder", unit="batch",
                              disable=not self.show_progress):
                batch = texts[start:start + self.batch_size]
                parts.append(np.asarray(self.model.predict(batch, batch_size=len(batch), show_progress_bar=False,
                                                           convert_to_numpy=True), dtype=np.float32))
        predicted = np.concatenate(parts)
        if predicted.ndim != 1:
            raise HardnegError(f"cross-encoder {self.name}: expected one score per pair, got shape "
                               f"{predicted.shape} (a model with num_labels=1 is needed)")
        return predicted

    def shard_record(self) -> dict | None:
        """Under torchrun, per rank the pairs it scored in this run."""
        return work_record(self.description, "pairs", self.shard_pairs)


class Rescored:
    """Candidates from ``source``, scores (of candidates and positives) from ``scorer``.

    ``scorer`` is a :class:`CrossEncoderScorer`, a teacher (any :class:`Scorer`, e.g. a dense retriever
    over a stronger model than the one being trained), or a model name/path of a teacher bi-encoder.
    """

    def __init__(self, source: Retriever, scorer: object, **teacher_options) -> None:
        if isinstance(scorer, (str, os.PathLike)):
            scorer = as_retriever(str(scorer), **teacher_options)
        if not isinstance(scorer, Scorer):
            raise HardnegError(f"rescoring: {describe(scorer)} cannot score documents (it needs score())")
        self.source, self.scorer = source, scorer
        self.kind = f"{getattr(source, 'kind', 'source')}>{getattr(scorer, 'kind', 'scorer')}"
        self.description = f"{describe(source)}>{describe(scorer)}"

    def search(self, corpus: Corpus, queries: Queries, top_k: int) -> Run:
        return self.search_and_score(corpus, queries, top_k, {})[0]

    def search_and_score(self, corpus: Corpus, queries: Queries, top_k: int,
                         pairs: dict[str, list[str]]) -> tuple[Run, Run]:
        """The source's candidates and the listed documents (the positives), scored by the scorer in one call:
        a scorer with per-query work (BM25's full score row, a teacher's query encoding) does it once."""
        run = self.source.search(corpus, queries, top_k)
        wanted = {query_id: list(dict.fromkeys([*run.get(query_id, {}), *pairs.get(query_id, ())]))
                  for query_id in queries}
        scored = self.scorer.score(corpus, queries, wanted)
        return ({query_id: {doc_id: scored[query_id][doc_id] for doc_id in run.get(query_id, {})}
                 for query_id in queries},
                {query_id: {doc_id: scored[query_id][doc_id] for doc_id in doc_ids}
                 for query_id, doc_ids in pairs.items()})

    def score(self, corpus: Corpus, queries: Queries, pairs: dict[str, list[str]]) -> Run:
        return self.scorer.score(corpus, queries, pairs)

    def parts(self) -> list[object]:
        return [self.source, self.scorer]


def build_source(specs: Sequence[str | object], *, bm25_backend: str = "bm25s", index: str = "Flat",
                 nprobe: int | None = None, ef_search: int | None = None, rrf_k: float = RRF_K,
                 cache_dir: str | os.PathLike | None = None, models: dict[str, object] | None = None,
                 **encode_options) -> Retriever:
    """The candidate source the CLI and configs describe: one spec, or several fused with RRF.

    A spec is ``"bm25"`` (``"bm25:rank-bm25"`` picks the backend per source), a model name/path, an
    already built retriever/encoder, or a key of ``models`` (the pipeline passes its loaded base model as
    ``"model"`` so it is not loaded twice).
    """
    built = []
    show_progress = encode_options.get("show_progress", True)
    for spec in specs:
        if isinstance(spec, str) and spec.split(":")[0].lower() == "bm25":
            backend = spec.split(":", 1)[1] if ":" in spec else bm25_backend
            built.append(bm25(backend, show_progress=show_progress))
        elif isinstance(spec, str) and models and spec in models:
            loaded = models[spec]
            if index == "Flat" and nprobe is None and ef_search is None:
                built.append(as_retriever(loaded))  # keeps its corpus embeddings if it has encoded already
            else:
                built.append(dense(getattr(loaded, "encoder", loaded), index=index, nprobe=nprobe,
                                   ef_search=ef_search, cache_dir=cache_dir, **encode_options))
        else:
            built.append(dense(spec, index=index, nprobe=nprobe, ef_search=ef_search, cache_dir=cache_dir,
                               **encode_options))
    return built[0] if len(built) == 1 else Hybrid(built, k=rrf_k)


def build_rescorer(*, cross_encoder: str | None = None, teacher: str | None = None,
                   cross_encoder_batch_size: int = 32, fuse_bm25: float | None = None,
                   source: Retriever | None = None, bm25_backend: str = "bm25s",
                   cache_dir: str | os.PathLike | None = None, **encode_options) -> Scorer | None:
    """The scorer behind the source, if any: a cross-encoder, or a teacher bi-encoder (its own embeddings
    cached like any dense model's).

    ``fuse_bm25`` W makes it a :class:`ScoreFusion` of the teacher (or, without one, the dense retriever among
    ``source``'s parts) with weight 1 and BM25 with weight W; the BM25 of ``source``, when it has one, is reused
    (its index is built once)."""
    scorer = None
    if cross_encoder:
        scorer = CrossEncoderScorer(cross_encoder, batch_size=cross_encoder_batch_size,
                                    max_length=encode_options.get("max_length"),
                                    show_progress=encode_options.get("show_progress", True),
                                    precision=encode_options.get("precision", "auto"))
    elif teacher:
        scorer = as_retriever(teacher, cache_dir=cache_dir, **encode_options)
    if fuse_bm25 is None:
        return scorer
    parts = components(source) if source is not None else []
    if scorer is None:
        dense_parts = [part for part in parts if isinstance(part, StandardizedScorer)
                       and not isinstance(part, BM25Retriever)]
        if len(dense_parts) != 1:
            raise HardnegError(FUSE_NEEDS_DENSE)
        scorer = dense_parts[0]
    lexical = next((part for part in parts if isinstance(part, BM25Retriever)), None)
    if lexical is None:
        lexical = bm25(bm25_backend, show_progress=encode_options.get("show_progress", True))
    return ScoreFusion([(scorer, 1.0), (lexical, fuse_bm25)])
