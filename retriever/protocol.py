"""The Python API that custom models implement (the capability protocols, checked with ``isinstance``).

Mining and evaluation accept anything that satisfies :class:`Retriever` (``search``). An object that
only embeds text, an :class:`Encoder` (``encode_queries`` / ``encode_documents``), is wrapped in exact
dense search. Positive-aware mining also needs the scores of the labelled positives, which a
:class:`Scorer` (``score``) provides; hardneg's BM25 and dense retrievers are both.

The other protocols name optional capabilities that a stage uses when an object has them, each checked with
``isinstance`` where it is used: :class:`EmbeddingSource` and :class:`CorpusScorer` (whole-corpus scores, for
AUC against every document), :class:`PrecisionAware` (the precision recorded beside outputs and cache shards),
:class:`EncoderBacked` (a retriever whose model files identify its embeddings), :class:`StandardizedScorer` (scores
as z-scores over the corpus, which score fusion adds), :class:`Sharded` (a part that
splits its work over the ranks of a torchrun job, recorded by :func:`sharding_record`) and :class:`Composite` (a
retriever made of others, walked by :func:`components`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np

from retriever.data import Corpus, Queries, Run


@runtime_checkable
class Encoder(Protocol):
    def encode_queries(self, texts: list[str]) -> np.ndarray: ...

    def encode_documents(self, texts: list[str]) -> np.ndarray: ...


@runtime_checkable
class Retriever(Protocol):
    def search(self, corpus: Corpus, queries: Queries, top_k: int) -> Run:
        """The ``top_k`` best documents of ``corpus`` for every query, with their scores."""
        ...


@runtime_checkable
class Scorer(Protocol):
    def score(self, corpus: Corpus, queries: Queries, pairs: dict[str, list[str]]) -> Run:
        """The score of each listed document for its query, on the same scale as ``search``."""
        ...


@runtime_checkable
class EmbeddingSource(Protocol):
    """A dense retriever that exposes its embeddings: exact search and whole-corpus scores are inner products."""

    def corpus_embeddings(self, corpus: Corpus) -> np.ndarray: ...

    def query_embeddings(self, queries: Queries) -> np.ndarray: ...


@runtime_checkable
class CorpusScorer(Protocol):
    """A retriever that scores every corpus document for each query (BM25), one query at a time."""

    def scores(self, corpus: Corpus, queries: Queries) -> Iterator[tuple[str, np.ndarray]]: ...


@runtime_checkable
class StandardizedScorer(Protocol):
    """A scorer that can put its scores on a query-independent scale: each listed document's score as a z-score
    over *every* document of the corpus for that query, so scores of different models can be added
    (:class:`mining.sources.ScoreFusion`). BM25 and dense retrieval are; a cross-encoder is not (it cannot score
    the whole corpus)."""

    def standardized_scores(self, corpus: Corpus, queries: Queries, pairs: dict[str, list[str]]) -> Run: ...


@runtime_checkable
class PrecisionAware(Protocol):
    """An encoder that says which precision it encodes in (``precision`` asked, ``encode_precision`` decided):
    bf16 and fp32 embeddings are not interchangeable, so caches and provenance record it."""

    precision: str

    @property
    def encode_precision(self) -> str: ...


@runtime_checkable
class EncoderBacked(Protocol):
    """A retriever built around an :class:`Encoder` (dense search over its embeddings)."""

    encoder: Encoder


@runtime_checkable
class Composite(Protocol):
    """A retriever built from others (a hybrid fuses its sources, a rescored source asks a scorer): provenance
    names every model inside it, so it says what it is made of. A custom composite defines ``parts()``;
    attributes such as ``.source`` are not looked for."""

    def parts(self) -> list[object]: ...


@runtime_checkable
class Sharded(Protocol):
    """A source or scorer that splits its work over the ranks of a torchrun job (dense search: the corpus rows;
    BM25: the queries; a cross-encoder: the pairs) and says how, as ``{"model", "world_size", "ranks": [...]}``,
    or None when it has nothing to say (BM25 in one process). ``shard_record`` is a collective: every rank calls
    it."""

    def shard_record(self) -> dict | None: ...


def components(retriever: object) -> list[object]:
    """Every source and scorer composed inside ``retriever`` (hybrid, rescored), inner ones first, then itself;
    each once, although a part may be shared (a BM25 fusion scores with the very retriever that searched).

    Provenance (the model files behind a run, the precision each model encodes in) walks this one list.
    """
    found: list[object] = []
    if isinstance(retriever, Composite):
        for part in retriever.parts():
            found.extend(inner for inner in components(part) if not any(inner is seen for seen in found))
    found.append(retriever)
    return found


def sharding_record(retriever: object) -> list[dict]:
    """How each sharded part of ``retriever`` split its work, for ``metrics.json`` / ``pools.meta.json``. A
    collective under torchrun: every rank calls it."""
    records = [part.shard_record() for part in components(retriever) if isinstance(part, Sharded)]
    return [record for record in records if record is not None]


def describe(retriever: object) -> str:
    """A short name for provenance records."""
    return getattr(retriever, "description", None) or type(retriever).__name__
