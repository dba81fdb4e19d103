"""The Python API that custom models implement (the capability protocols, checked with ``isinstance``).

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
