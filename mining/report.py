"""What mining removed and why: per-stage counts, score quantiles, starved queries, a histogram.

Users of the peers' miners cannot tell whether a filter removed 5 % or 95 % of the candidates, or
whether the "hard negatives" score above the positives. :class:`MiningReport` is fed once per query
by the miner and answers exactly that, in ``pools.meta.json`` and in a PNG beside the pools.

Call sequence (the miner, :func:`mining.mine.mine`)::

    report = MiningReport(filter_stages=chain.stage_names, num_negatives=num_negatives, seed=seed)
    for each query:
        # candidate_scores: every retrieved candidate of the query (labelled positives included),
        # is_positive: bool mask, True for labelled positives among them,
        # removed_by: int per candidate, 0 = passed every filter, s = removed by filter stage s (1-based,
        #             what FilterChain.removed_by returns); ignored where is_positive,
        # sampled: bool mask, True for the candidates written to the pool as negatives.
        report.add_query(query_id, anchor=anchor_value, positive_scores=scores_of_all_labelled_positives,
                         candidate_scores=scores, is_positive=mask, removed_by=stages, sampled=chosen)
    meta["report"] = report.to_json()                        # into pools.meta.json
    report.write_histogram(output_dir / HISTOGRAM_FILE)      # atomically, beside pools.jsonl

Every candidate ends in exactly one stage: ``labelled-positive``, one filter stage (by name), ``not-sampled``
(survived the filters but more survived than ``num_negatives``) or ``sampled``. Counts are exact. Scores
are kept exactly while a group holds at most ``exact_limit`` values; beyond that a seeded uniform reservoir
of that size stands in (quantiles then approximate, flagged ``"exact": false``), while count, mean, min and
max stay exact. Memory therefore stays bounded (about 4 bytes x ``exact_limit`` per group) for any number of
candidates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retriever.io import HardnegError, new_figure, save_figure

POSITIVE = "labelled-positive"
NOT_SAMPLED = "not-sampled"
SAMPLED = "sampled"
HISTOGRAM_FILE = "pools.scores.png"
QUANTILES = (0, 5, 25, 50, 75, 95, 100)
MAX_LISTED_IDS = 100


class ScoreSample:
    """Scores of one group: exact count/mean/min/max, and all values or a uniform reservoir of them."""

    def __init__(self, limit: int, rng: np.random.Generator) -> None:
        self.limit, self.rng = limit, rng
        self.count, self.total = 0, 0.0
        self.low, self.high = math.inf, -math.inf
        self._chunks: list[np.ndarray] = []
        self._held = 0
        self._reservoir: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32).ravel()
        if not values.size:
            return
        if not np.all(np.isfinite(values)):
            raise HardnegError("mining report: a score is NaN or infinite; the scorer returned an invalid score")
        self.total += float(values.sum(dtype=np.float64))
        self.low, self.high = min(self.low, float(values.min())), max(self.high, float(values.max()))
        seen_before, self.count = self.count, self.count + values.size
        if self._reservoir is None:
            if self._held + values.size <= self.limit:
                self._chunks.append(values)
                self._held += values.size
                return
            # Switch to a reservoir: fill it from what is held, then treat the rest as a stream.
            held = np.concatenate([*self._chunks, values])
            self._chunks, self._held = [], 0
            self._reservoir = held[: self.limit].copy()
            values, seen_before = held[self.limit:], self.limit
        # Algorithm R, vectorised: item number i (0-based over the stream) replaces a random slot with
        # probability limit / (i + 1).
        index = np.arange(seen_before, seen_before + values.size, dtype=np.float64)
        accept = self.rng.random(values.size) < self.limit / (index + 1)
        slots = self.rng.integers(0, self.limit, size=int(accept.sum()))
        self._reservoir[slots] = values[accept]

    @property
    def exact(self) -> bool:
        return self._reservoir is None

    def values(self) -> np.ndarray:
        if self._reservoir is not None:
            return self._reservoir
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)

    def summary(self) -> dict:
        if not self.count:
            return {"count": 0}
        quantiles = np.percentile(self.values().astype(np.float64), QUANTILES)
        out = {"count": self.count, "mean": _r(self.total / self.count), "exact": self.exact}
        out |= {f"p{q}": _r(v) for q, v in zip(QUANTILES, quantiles)}
        out["p0"], out["p100"] = _r(self.low), _r(self.high)  # exact even when sampled
        return out


class MiningReport:
    """Accumulates one mining run's bookkeeping; see the module docstring for the call sequence."""

    def __init__(self, filter_stages: Sequence[str], num_negatives: int, *, seed: int = 0,
                 exact_limit: int = 1_000_000) -> None:
        if num_negatives < 1:
            raise HardnegError(f"mining report: num_negatives must be at least 1, got {num_negatives}")
        if exact_limit < 1:
            raise HardnegError(f"mining report: exact_limit must be at least 1, got {exact_limit}")
        self.num_negatives = num_negatives
        self.filter_stages = _unique_names(filter_stages)
        self.stages = [POSITIVE, *self.filter_stages, NOT_SAMPLED, SAMPLED]
        self.counts = np.zeros(len(self.stages), dtype=np.int64)
        rng = np.random.default_rng(seed)
        self._groups = {name: ScoreSample(exact_limit, rng) for name in
                        ("positive", "anchor", "sampled", "not_sampled", "removed", *self.filter_stages)}
        self.queries = 0
        self.short_query_ids: list[str] = []
        self.queries_without_negatives = 0

    def add_query(self, query_id: str, *, anchor: float | None, positive_scores: Sequence[float] | np.ndarray,
                  candidate_scores: Sequence[float] | np.ndarray, is_positive: Sequence[bool] | np.ndarray,
                  removed_by: Sequence[int] | np.ndarray, sampled: Sequence[bool] | np.ndarray) -> None:
        """Record one query. ``anchor`` and ``positive_scores`` may be None/contain None for scorers
        without scores (naive top-k on a run file); those are then left out of the score groups."""
        scores = np.asarray(candidate_scores, dtype=np.float64).ravel()
        is_positive = np.asarray(is_positive, dtype=bool).ravel()
        removed_by = np.asarray(removed_by, dtype=np.int64).ravel()
        sampled = np.asarray(sampled, dtype=bool).ravel()
        if not (len(scores) == len(is_positive) == len(removed_by) == len(sampled)):
            raise HardnegError(f"mining report, query {query_id!r}: candidate_scores, is_positive, removed_by "
                               f"and sampled differ in length ({len(scores)}, {len(is_positive)}, "
                               f"{len(removed_by)}, {len(sampled)})")
        known = np.asarray([s for s in positive_scores if s is not None], dtype=np.float64)
        if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(known))
                and (anchor is None or np.isfinite(anchor))):
            raise HardnegError(f"mining report, query {query_id!r}: a score is NaN or infinite; "
                               "the scorer returned an invalid score")
        negative = ~is_positive
        if np.any(negative & ((removed_by < 0) | (removed_by > len(self.filter_stages)))):
            raise HardnegError(f"mining report, query {query_id!r}: removed_by must be 0 (kept) or a filter "
                               f"stage 1..{len(self.filter_stages)}")
        if np.any(sampled & (is_positive | (removed_by != 0))):
            raise HardnegError(f"mining report, query {query_id!r}: a sampled candidate is a labelled positive "
                               "or was removed by a filter")

        self.queries += 1
        self.counts[0] += int(is_positive.sum())
        for stage in range(1, len(self.filter_stages) + 1):
            in_stage = negative & (removed_by == stage)
            self.counts[stage] += int(in_stage.sum())
            self._groups[self.filter_stages[stage - 1]].add(scores[in_stage])
        survived = negative & (removed_by == 0)
        self.counts[-2] += int((survived & ~sampled).sum())
        written = int(sampled.sum())
        self.counts[-1] += written
        self._groups["removed"].add(scores[negative & (removed_by > 0)])
        self._groups["not_sampled"].add(scores[survived & ~sampled])
        self._groups["sampled"].add(scores[sampled])
        self._groups["positive"].add(known)
        if anchor is not None:
            self._groups["anchor"].add(np.asarray([anchor], dtype=np.float64))
        if written < self.num_negatives:
            self.short_query_ids.append(query_id)
            self.queries_without_negatives += written == 0

    def removed_counts(self) -> dict[str, int]:
        """Candidates per final stage, in pipeline order (they sum to the candidates seen)."""
        return {name: int(n) for name, n in zip(self.stages, self.counts)}

    def to_json(self) -> dict:
        """The summary recorded in ``pools.meta.json`` (stable key order and rounding)."""
        short = len(self.short_query_ids)
        return {
            "queries": self.queries,
            "candidates": int(self.counts.sum()),
            "candidates_by_stage": self.removed_counts(),
            "score_quantiles": {name: group.summary() for name, group in self._groups.items()},
            "short_of_negatives": {
                "negatives_requested_per_query": self.num_negatives,
                "queries": short, "share": _r(short / max(self.queries, 1)),
                "queries_without_negatives": self.queries_without_negatives,
                "query_ids": self.short_query_ids[:MAX_LISTED_IDS],
                "query_ids_truncated": short > MAX_LISTED_IDS},
            "histogram": HISTOGRAM_FILE,
        }

    def write_histogram(self, path: str | Path, bins: int = 60) -> Path:
        """Positive vs sampled (kept) vs not-sampled vs filter-removed scores as a PNG, written atomically.

        Each group is normalised to its own area (counts differ by orders of magnitude); the legend gives
        the counts. The dashed line is the median anchor score.
        """
        groups = [("labelled positives", "positive", "tab:green"), ("kept (sampled)", "sampled", "tab:blue"),
                  ("kept, not sampled", "not_sampled", "tab:gray"), ("removed by filters", "removed", "tab:red")]
        present = [(label, self._groups[key], color) for label, key, color in groups if self._groups[key].count]
        fig = new_figure(7, 4)
        ax = fig.subplots()
        if present:
            low = min(group.low for _, group, _ in present)
            high = max(group.high for _, group, _ in present)
            edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)
            for label, group, color in present:
                ax.hist(group.values(), bins=edges, density=True, histtype="step", linewidth=1.6, color=color,
                        label=f"{label} (n={group.count:,}{'' if group.exact else ', sampled'})")
            anchors = self._groups["anchor"]
            if anchors.count:
                ax.axvline(float(np.median(anchors.values())), color="black", linestyle="--", linewidth=1,
                           label="median anchor")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no scores recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("score")
        ax.set_ylabel("density")
        ax.set_title(f"mining scores: {self.queries:,} queries, {int(self.counts.sum()):,} candidates", fontsize=10)
        fig.tight_layout()
        return save_figure(fig, path, dpi=100)


def _unique_names(names: Sequence[str]) -> list[str]:
    """Stage names as given; a repeated name gets ``#2``, ``#3`` so each stage keeps its own count."""
    out: list[str] = []
    for name in names:
        if name in (POSITIVE, NOT_SAMPLED, SAMPLED, "positive", "anchor", "sampled", "not_sampled", "removed"):
            raise HardnegError(f"mining report: {name!r} is reserved and cannot name a filter stage")
        candidate, n = name, 1
        while candidate in out:
            n += 1
            candidate = f"{name}#{n}"
        out.append(candidate)
    return out


def _r(value: float) -> float:
    return round(float(value), 6)
