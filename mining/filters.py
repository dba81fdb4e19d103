"""Positive-aware false-negative filters (NV-Retriever, Moreira et al. 2024) and naive top-k.

A filter sees one query's candidate scores and its *anchor*: by default the query's lowest labelled
positive score (option: mean or highest). It returns which candidates to keep. Candidates scoring
above what the filter allows are likely unlabelled positives, and training on them as negatives
teaches the model to push relevant documents away.

All thresholds are on the scale of whatever scored the candidates (BM25, a bi-encoder, a
cross-encoder), which is why the anchor comes from the same scorer as the candidates.

Every filter takes one query's non-positive candidate scores *best first* (position 0 is rank 1, which
rank-window filters rely on) and returns a keep mask. :class:`FilterChain` composes filters: a candidate
survives when every stage keeps it, and is attributed to the *first* stage that rejects it, so each
stage's removals are counted separately and stage order changes only the attribution, never the result.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from retriever.io import HardnegError

ANCHORS = ("min", "mean", "max")


class Filter(Protocol):
    name: str
    needs_anchor: bool

    def keep(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        """A boolean mask over ``scores`` (best first): True for the candidates that may be negatives."""
        ...


def _check_number(filter_name: str, field: str, value: object, *, integer: bool = False) -> None:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        kind = "an integer" if integer else "a finite number"
        raise HardnegError(f"{filter_name}: {field} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class TopK:
    """Naive top-k: keep every candidate (only labelled positives are ever removed)."""

    name = "topk"
    needs_anchor = False

    def keep(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        return np.ones(len(scores), dtype=bool)


@dataclass(frozen=True)
class RankWindow:
    """Keep candidates ranked ``min_rank`` to ``max_rank`` (1-based, inclusive; ``None``: no upper bound).

    Ranks count the non-positive candidates only, best first: skipping the very top is the oldest
    defence against unlabelled positives (the top few are the most likely to be relevant).
    """

    min_rank: int = 1
    max_rank: int | None = None
    name = "rank-window"
    needs_anchor = False

    def __post_init__(self) -> None:
        _check_number(self.name, "min_rank", self.min_rank, integer=True)
        if self.min_rank < 1:
            raise HardnegError(f"{self.name}: min_rank must be at least 1, got {self.min_rank}")
        if self.max_rank is not None:
            _check_number(self.name, "max_rank", self.max_rank, integer=True)
            if self.max_rank < self.min_rank:
                raise HardnegError(f"{self.name}: min_rank ({self.min_rank}) is above max_rank ({self.max_rank})")

    def keep(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        ranks = np.arange(1, len(scores) + 1)
        mask = ranks >= self.min_rank
        return mask & (ranks <= self.max_rank) if self.max_rank is not None else mask


@dataclass(frozen=True)
class TopKShifted:
    """Top-k shifted by ``shift``: skip the ``shift`` best non-positive candidates (rank window [shift+1, ∞))."""

    shift: int
    name = "topk-shifted"
    needs_anchor = False

    def __post_init__(self) -> None:
        _check_number(self.name, "shift", self.shift, integer=True)
        if self.shift < 0:
            raise HardnegError(f"{self.name}: shift must be 0 or more, got {self.shift}")

    def keep(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        return np.arange(len(scores)) >= self.shift


@dataclass(frozen=True)
class TopKAbs:
    """Drop candidates scoring above ``max_score`` (and, if given, below ``min_score``)."""

    max_score: float
    min_score: float | None = None
    name = "topk-abs"
    needs_anchor = False

    def __post_init__(self) -> None:
        _check_number(self.name, "max_score", self.max_score)
        if self.min_score is not None:
            _check_number(self.name, "min_score", self.min_score)
            if self.min_score > self.max_score:
                raise HardnegError(f"{self.name}: min_score ({self.min_score}) is above max_score "
                                   f"({self.max_score}); no candidate could be kept")

    def keep(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        mask = scores <= self.max_score
        return mask & (scores >= self.min_score) if self.min_score is not None else mask


@dataclass(frozen=True)
class TopKMarginPos:
    """Drop candidates scoring above ``anchor - margin`` (a margin of 0 drops what outscores the anchor)."""

    margin: float
    name = "topk-marginpos"
    needs_anchor = True

    def __post_init__(self) -> None:
        _check_number(self.name, "margin", self.margin)
        if self.margin < 0:
            raise HardnegError(f"{self.name}: margin must be 0 or more, got {self.margin} (a negative margin "
                               "would keep candidates that outscore the positive)")

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
    needs_anchor = True

    def __post_init__(self) -> None:
        _check_number(self.name, "perc", self.perc)
        if not 0 < self.perc <= 1:
            raise HardnegError(f"topk-percpos: perc must be in (0, 1], got {self.perc}")

    def threshold(self, anchor: float) -> float:
        return anchor - abs(anchor) * (1 - self.perc)

    def keep(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        return scores <= self.threshold(anchor)


@dataclass(frozen=True)
class FilterChain:
    """Several filters applied together; each candidate is charged to the first stage that rejects it."""

    stages: tuple[Filter, ...]
    name = "chain"

    def __post_init__(self) -> None:
        if not self.stages:
            raise HardnegError("chain: give at least one filter stage")
        for stage in self.stages:
            if isinstance(stage, FilterChain) or not hasattr(stage, "keep"):
                raise HardnegError(f"chain: stage {stage!r} is not a single filter")

    @property
    def needs_anchor(self) -> bool:
        return any(stage.needs_anchor for stage in self.stages)

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def removed_by(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        """Per candidate: 0 if every stage keeps it, else the 1-based number of the first stage rejecting it."""
        scores = np.asarray(scores, dtype=np.float64)
        removed = np.zeros(len(scores), dtype=np.int64)
        for number, stage in enumerate(self.stages, start=1):
            rejected = ~np.asarray(stage.keep(scores, anchor), dtype=bool)
            removed[rejected & (removed == 0)] = number
        return removed

    def keep(self, scores: np.ndarray, anchor: float) -> np.ndarray:
        return self.removed_by(scores, anchor) == 0


FILTERS = {cls.name: cls for cls in (TopK, RankWindow, TopKShifted, TopKAbs, TopKMarginPos, TopKPercPos)}


def make_filter(name: str, **params: object) -> Filter:
    """Build a filter from its CLI/config name and parameters, refusing bad settings up front.

    ``make_filter("chain", stages=[{"name": "topk-shifted", "shift": 3}, {"name": "topk-percpos",
    "perc": 0.95}])`` builds a :class:`FilterChain` (the config form of a composed filter).
    """
    if name == "chain":
        stages = params.pop("stages", None)
        if params:
            raise HardnegError(f"filter 'chain': unknown parameter(s) {', '.join(params)}; give only 'stages'")
        if not isinstance(stages, (list, tuple)) or not stages:
            raise HardnegError("filter 'chain': 'stages' must be a non-empty list of {name: ..., params...}")
        built = []
        for number, spec in enumerate(stages, start=1):
            if not isinstance(spec, dict) or "name" not in spec:
                raise HardnegError(f"filter 'chain': stage {number} must be a mapping with a 'name', got {spec!r}")
            spec = dict(spec)
            stage_name = spec.pop("name")
            if stage_name == "chain":
                raise HardnegError(f"filter 'chain': stage {number} cannot itself be a chain")
            built.append(make_filter(stage_name, **spec))
        return FilterChain(tuple(built))
    if name not in FILTERS:
        raise HardnegError(f"unknown filter {name!r}; choose one of {', '.join([*FILTERS, 'chain'])}")
    try:
        return FILTERS[name](**params)
    except TypeError as err:
        raise HardnegError(f"filter {name!r}: {err}") from None


def as_chain(flt: Filter) -> FilterChain:
    """Any filter as a chain (a single filter is a chain of one), so the miner has one code path."""
    return flt if isinstance(flt, FilterChain) else FilterChain((flt,))


def describe_filter(flt: Filter) -> dict:
    """The filter as recorded in ``pools.meta.json``; ``make_filter(**describe_filter(f))`` rebuilds it."""
    if isinstance(flt, FilterChain):
        return {"name": "chain", "stages": [describe_filter(stage) for stage in flt.stages]}
    return {"name": flt.name, **asdict(flt)}


def check_anchor_fallback(anchor: str, fallback: str | None, flt: Filter) -> None:
    """Refuse an anchor fallback that could never fill a query up: one no looser than the anchor (a filter keeps
    more the higher its anchor: min < mean < max), or one beside a filter that compares with no positive."""
    for how in (anchor, fallback):
        if how is not None:
            anchor_score([0.0], how)  # an unknown name is refused with the choices
    if fallback is None:
        return
    if ANCHORS.index(fallback) <= ANCHORS.index(anchor):
        looser = ANCHORS[ANCHORS.index(anchor) + 1:]
        raise HardnegError(f"mine: anchor_fallback {fallback!r} "
                           + ("is the anchor itself" if fallback == anchor else f"is stricter than anchor {anchor!r}")
                           + " and can never fill a query up; "
                           + (f"choose a looser one ({' or '.join(looser)})" if looser else
                              "anchor 'max' is the loosest, so unset anchor_fallback"))
    if not as_chain(flt).needs_anchor:
        raise HardnegError(f"mine: anchor_fallback {fallback!r} loosens the positive the filter compares with, but "
                           f"filter {flt.name!r} compares with none; unset anchor_fallback or use topk-percpos / "
                           "topk-marginpos")


def anchor_score(positive_scores: list[float], how: str = "min") -> float:
    """The positive score a filter compares against: the query's lowest positive by default."""
    if how not in ANCHORS:
        raise HardnegError(f"unknown anchor {how!r}; choose one of {', '.join(ANCHORS)}")
    if len(positive_scores) == 0:
        raise HardnegError("anchor: the query has no positive score to anchor the filter on")
    return float({"min": np.min, "mean": np.mean, "max": np.max}[how](positive_scores))
