"""Positive-aware false-negative filters (NV-Retriever, Moreira et al. 2024) and naive top-k.

A filter sees one query's candidate scores and its *anchor*: by default the query's lowest labelled
positive score (option: mean or highest). It returns which candidates to keep. Candidates scoring
above what the filter allows are likely unlabelled positives, and training on them as negatives
teaches the model to push relevant documents away.

All thresholds are on the scale of whatever scored the candidates (BM25, a bi-encoder, a
cross-encoder), which is why the anchor comes from the same scorer as the candidates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from retriever.io import HardnegError

ANCHORS = ("min", "mean", "max")


class Filter(Protocol):
    name: str

    def keep(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        """A boolean mask over ``scores``: True for the candidates that may be used as negatives."""
        ...


@dataclass(frozen=True)
class TopK:
    """Naive top-k: keep every candidate (only labelled positives are ever removed)."""

    name = "topk"

    def keep(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        return np.ones(len(scores), dtype=bool)


@dataclass(frozen=True)
class TopKAbs:
    """Drop candidates scoring above ``max_score`` (and, if given, below ``min_score``)."""

    max_score: float
    min_score: float | None = None
    name = "topk-abs"

    def keep(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        mask = scores <= self.max_score
        return mask & (scores >= self.min_score) if self.min_score is not None else mask


@dataclass(frozen=True)
class TopKMarginPos:
    """Drop candidates scoring above ``anchor - margin``."""

    margin: float
    name = "topk-marginpos"

    def keep(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        return scores <= anchor - self.margin


@dataclass(frozen=True)
class TopKPercPos:
    """Drop candidates scoring above ``perc`` of the anchor; NV-Retriever's best setting is 0.95.

    The threshold is ``anchor - |anchor| * (1 - perc)``, which equals ``anchor * perc`` for a
    positive anchor and stays *below* the anchor when it is negative (where ``anchor * perc`` would
    lie above it and let through candidates that outscore the positive).
    """

    perc: float = 0.95
    name = "topk-percpos"

    def __post_init__(self) -> None:
        if not 0 < self.perc <= 1:
            raise HardnegError(f"topk-percpos: perc must be in (0, 1], got {self.perc}")

    def threshold(self, anchor: float) -> float:
        return anchor - abs(anchor) * (1 - self.perc)

    def keep(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        return scores <= self.threshold(anchor)


FILTERS = {cls.name: cls for cls in (TopK, TopKAbs, TopKMarginPos, TopKPercPos)}


def make_filter(name: str, **params: float) -> Filter:
    """Build a filter from its CLI/config name and parameters, refusing bad settings up front."""
    if name not in FILTERS:
        raise HardnegError(f"unknown filter {name!r}; choose one of {', '.join(FILTERS)}")
    try:
        return FILTERS[name](**params)
    except TypeError as err:
        raise HardnegError(f"filter {name!r}: {err}") from None


def describe_filter(flt: Filter) -> dict:
    return {"name": flt.name, **asdict(flt)}


def anchor_score(positive_scores: list[float], how: str = "min") -> float:
    """The positive score a filter compares against: the query's lowest positive by default."""
    if how not in ANCHORS:
        raise HardnegError(f"unknown anchor {how!r}; choose one of {', '.join(ANCHORS)}")
    return float({"min": np.min, "mean": np.mean, "max": np.max}[how](positive_scores))
