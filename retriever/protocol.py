"""The Python API that custom models implement, and how a retriever is named on the command line.

Mining and evaluation accept anything that satisfies :class:`Retriever` (``search``). An object that
only embeds text, an :class:`Encoder` (``encode_queries`` / ``encode_documents``), is wrapped in exact
dense search. Positive-aware mining also needs the scores of the labelled positives, which a
:class:`Scorer` (``score``) provides; hardneg's BM25 and dense retrievers are both.
"""

from __future__ import annotations

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


DENSE_OPTIONS = ("batch_size", "show_progress", "index", "nprobe", "ef_search", "use_gpu", "k_limit", "cache_dir")
"""Options of :class:`retriever.dense.DenseRetriever` (search and cache); the others go to the model loader."""


def components(retriever: object) -> list[object]:
    """Every source and scorer composed inside ``retriever`` (hybrid, rescored), inner ones first, then itself.

    Provenance (the model files behind a run, the precision each model encodes in) walks this one list.
    """
    found: list[object] = []
    for child in (getattr(retriever, "source", None), getattr(retriever, "scorer", None),
                  *getattr(retriever, "sources", [])):
        if child is not None:
            found.extend(components(child))
    found.append(retriever)
    return found


def describe(retriever: object) -> str:
    """A short name for provenance records."""
    return getattr(retriever, "description", None) or type(retriever).__name__


def as_retriever(spec: object, **options) -> Retriever:
    """A retriever from what the user gave: a Retriever, an Encoder, ``"bm25"``, or a model name/path.

    ``"bm25"`` uses bm25s; ``"bm25:rank-bm25"`` the reference rank-bm25 backend. Any other string is a
    model directory or a Hugging Face / sentence-transformers model name; ``options`` go to
    :meth:`retriever.encoder.DualEncoder.load` and the dense retriever (``DENSE_OPTIONS``: faiss index
    string, nprobe, ef_search, GPU use, embedding cache folder).
    """
    from retriever.bm25 import BM25Retriever
    from retriever.dense import DenseRetriever
    from retriever.encoder import DualEncoder

    if isinstance(spec, Retriever):
        return spec
    if isinstance(spec, Encoder):
        return DenseRetriever(spec, **{key: value for key, value in options.items() if key in DENSE_OPTIONS})
    if isinstance(spec, str) and spec.split(":")[0].lower() == "bm25":
        backend = spec.split(":", 1)[1] if ":" in spec else "bm25s"
        return BM25Retriever(backend=backend, show_progress=options.get("show_progress", True))
    if isinstance(spec, str):
        search_options = {key: options.pop(key) for key in DENSE_OPTIONS if key in options}
        return DenseRetriever(DualEncoder.load(spec, **options), **search_options)
    raise TypeError(f"cannot make a retriever from {type(spec).__name__}: give a Retriever, an Encoder, "
                    "'bm25', or a model name/path")
