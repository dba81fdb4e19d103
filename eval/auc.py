"""AUC beyond the retrieved list: per query against the whole corpus, and pooled across queries.

Why two more AUCs. The per-query AUC of :mod:`eval.metrics` compares relevant documents with the
*retrieved* non-relevant ones, which says how well the top of the list is ordered. The MW-loss
argument for AUC as a calibration diagnostic is about something else: does one threshold on the
score separate relevant from non-relevant pairs, for every query at once?

* ``AUC-corpus`` (per query, then averaged): relevant documents vs *every* other document of the
  corpus, scored exactly (dense: all inner products; BM25: all BM25 scores). The score matrix is
  produced a chunk of queries at a time (:func:`score_rows`), never as a whole Q x N array.
* ``AUC-pooled``: the Mann-Whitney statistic U / (n_pos * n_neg) over the pooled pairs of all
  queries: positives are the scores of every judged-relevant (query, document) pair, negatives the
  scores of ``negatives_per_query`` non-relevant documents drawn per query (seeded, without
  replacement) from the corpus, or, when only a run is known, from the query's retrieved list.

Ties count one half everywhere. A document whose id equals its query id is left out of the
negatives when ``ignore_identical_ids`` is set, as in the ranking metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from retriever.data import Corpus, Qrels, Queries, Run
from retriever.protocol import CorpusScorer, EmbeddingSource


def mann_whitney_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(positive > negative) + 1/2 P(tie), over all pairs; computed by sorting, O((n+m) log m)."""
    negatives = np.sort(np.asarray(negatives, dtype=np.float64))
    positives = np.asarray(positives, dtype=np.float64)
    if positives.size == 0 or negatives.size == 0:
        raise ValueError("AUC needs at least one positive and one negative score")
    below = np.searchsorted(negatives, positives, side="left")
    tied = np.searchsorted(negatives, positives, side="right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (positives.size * negatives.size))


def roc_curve(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1).

    The trapezoid area under it equals :func:`mann_whitney_auc` (ties give a diagonal step).
    """
    scores = np.concatenate([positives, negatives]).astype(np.float64)
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_each = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tps = np.cumsum(labels)[last_of_each]
    fps = (last_of_each + 1) - tps
    return np.r_[0.0, fps / max(len(negatives), 1)], np.r_[0.0, tps / max(len(positives), 1)]


# ----------------------------------------------------------------------------------------- score rows


def can_score_corpus(source: object) -> bool:
    """Whether :func:`score_rows` can produce whole-corpus scores for this retriever."""
    return isinstance(source, (EmbeddingSource, CorpusScorer))


def score_rows(source: object, corpus: Corpus, queries: Queries, *, chunk_size: int | None = None,
               query_vectors: np.ndarray | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(query id, the scores of every corpus document) for each query, a chunk of queries at a time.

    Dense retrievers (``corpus_embeddings`` / ``query_embeddings``): inner products, ``chunk_size``
    queries per matrix product (default: as many as keep a chunk near 64 MB). BM25 (``scores``): its
    own per-query generator. The full Q x N matrix never exists.
    """
    if isinstance(source, EmbeddingSource):
        documents = np.asarray(source.corpus_embeddings(corpus), dtype=np.float32)
        vectors = query_vectors if query_vectors is not None else source.query_embeddings(queries)
        vectors = np.asarray(vectors, dtype=np.float32)
        chunk = chunk_size or max(1, (64 << 20) // (4 * max(len(documents), 1)))
        ids = list(queries)
        for start in range(0, len(ids), chunk):
            block = vectors[start:start + chunk] @ documents.T
            for offset, row in enumerate(block):
                yield ids[start + offset], row
    elif isinstance(source, CorpusScorer):
        yield from source.scores(corpus, queries)
    else:
        raise TypeError(f"{type(source).__name__} cannot score the whole corpus")


# ------------------------------------------------------------------------------------------ the AUCs


@dataclass
class AUCResult:
    """Per-query whole-corpus AUC, and the pooled samples behind ``AUC-pooled`` (kept for the plots)."""

    per_query: dict[str, float]
    pooled_positives: np.ndarray
    pooled_negatives: np.ndarray
    source: str  # "corpus" or "run"

    @property
    def pooled(self) -> float | None:
        if self.pooled_positives.size == 0 or self.pooled_negatives.size == 0:
            return None
        return mann_whitney_auc(self.pooled_positives, self.pooled_negatives)


def _row_auc(row: np.ndarray, positive_positions: np.ndarray, negative_mask: np.ndarray) -> float | None:
    """AUC of the positives of one score row against every position in ``negative_mask``."""
    negatives = np.sort(row[negative_mask].astype(np.float64))
    if negatives.size == 0 or positive_positions.size == 0:
        return None
    pos = row[positive_positions].astype(np.float64)
    below = np.searchsorted(negatives, pos, side="left")
    tied = np.searchsorted(negatives, pos, side="right") - below
    return float((below.sum() + 0.5 * tied.sum()) / (pos.size * negatives.size))


def corpus_auc(source: object, corpus: Corpus, queries: Queries, qrels: Qrels, *, relevance_level: int = 1,
               ignore_identical_ids: bool = False, negatives_per_query: int = 100, seed: int = 42,
               query_vectors: np.ndarray | None = None, chunk_size: int | None = None,
               show_progress: bool = False) -> AUCResult:
    """Whole-corpus per-query AUC and the pooled sample, from exact scores of every document.

    Positives are the documents judged with grade >= ``relevance_level``; negatives every other
    corpus document (judged non-relevant or unjudged). A relevant document missing from the corpus has no
    score and loses every pair, as an unretrieved one does in ``AUC`` (BEIR/MTEB keep such judgements); the
    pooled sample holds the scored ones only. The pooled negatives are drawn per query with
    ``numpy.random.default_rng(seed)``, in query order, so the same seed gives the same sample.
    """
    rng = np.random.default_rng(seed)
    evaluated = {q: qrels[q] for q in queries if any(g >= relevance_level for g in qrels.get(q, {}).values())}
    wanted = {q: queries[q] for q in evaluated}
    per_query: dict[str, float] = {}
    pooled_pos: list[np.ndarray] = []
    pooled_neg: list[np.ndarray] = []
    rows = score_rows(source, corpus, wanted, chunk_size=chunk_size, query_vectors=query_vectors)
    for query_id, row in tqdm(rows, total=len(wanted), desc="AUC (whole corpus)", unit="query",
                              disable=not show_progress):
        row = np.asarray(row)
        positives = np.array([corpus.position[d] for d, g in evaluated[query_id].items()
                              if g >= relevance_level and d in corpus.position], dtype=np.int64)
        negative_mask = np.ones(len(row), dtype=bool)
        negative_mask[positives] = False
        if ignore_identical_ids and query_id in corpus.position:
            negative_mask[corpus.position[query_id]] = False
        missing = sum(1 for d, g in evaluated[query_id].items() if g >= relevance_level and d not in corpus.position)
        value = _row_auc(row, positives, negative_mask) if positives.size else 0.0
        if value is not None and negative_mask.any():
            per_query[query_id] = value * positives.size / (positives.size + missing)
        pooled_pos.append(row[positives].astype(np.float64))
        candidates = np.flatnonzero(negative_mask)
        take = min(negatives_per_query, candidates.size)
        pooled_neg.append(row[rng.choice(candidates, size=take, replace=False)].astype(np.float64))
    return AUCResult(per_query, _concat(pooled_pos), _concat(pooled_neg), "corpus")


def run_pooled_sample(run: Run, qrels: Qrels, *, relevance_level: int = 1, negatives_per_query: int = 100,
                      seed: int = 42) -> AUCResult:
    """The pooled sample when only a run is known: retrieved relevant vs retrieved non-relevant.

    Unretrieved relevant documents have no score and cannot enter; the record says ``source: run``.
    Queries are visited in sorted id order so that a run read from a file gives the same sample.
    """
    rng = np.random.default_rng(seed)
    pooled_pos: list[np.ndarray] = []
    pooled_neg: list[np.ndarray] = []
    for query_id in sorted(run):
        judged = qrels.get(query_id)
        if not judged or not any(g >= relevance_level for g in judged.values()):
            continue
        scores = run[query_id]
        pos = np.array([s for d, s in scores.items() if judged.get(d, 0) >= relevance_level], dtype=np.float64)
        neg_ids = sorted(d for d in scores if judged.get(d, 0) < relevance_level)
        take = min(negatives_per_query, len(neg_ids))
        chosen = rng.choice(len(neg_ids), size=take, replace=False) if take else np.empty(0, dtype=np.int64)
        pooled_pos.append(pos)
        pooled_neg.append(np.array([scores[neg_ids[i]] for i in chosen], dtype=np.float64))
    return AUCResult({}, _concat(pooled_pos), _concat(pooled_neg), "run")


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.float64)


# ---------------------------------------------------------------------------------------------- plots


def plot_auc(result: AUCResult, folder: str | Path, title: str = "") -> list[Path]:
    """Write ``roc.png`` (pooled ROC curve) and ``score_histogram.png`` (relevant vs non-relevant scores)."""
    from retriever.io import new_figure, save_figure

    folder = Path(folder)
    written = []
    pos, neg = result.pooled_positives, result.pooled_negatives
    fpr, tpr = roc_curve(pos, neg)
    fig = new_figure(5, 5)
    ax = fig.subplots()
    ax.plot(fpr, tpr, label=f"pooled AUC {result.pooled:.4f}")
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
    ax.set_xlabel("false positive rate (non-relevant pairs above threshold)")
    ax.set_ylabel("true positive rate (relevant pairs above threshold)")
    ax.set_title(title or "ROC over pooled (query, document) pairs")
    ax.legend(loc="lower right")
    written.append(save_figure(fig, folder / "roc.png", dpi=100, bbox_inches="tight"))

    fig = new_figure(6, 4)
    ax = fig.subplots()
    bins = np.histogram_bin_edges(np.concatenate([pos, neg]), bins=50)
    ax.hist(neg, bins=bins, alpha=0.6, density=True, label=f"non-relevant ({neg.size} sampled, {result.source})")
    ax.hist(pos, bins=bins, alpha=0.6, density=True, label=f"relevant ({pos.size})")
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title or "score distributions")
    ax.legend()
    written.append(save_figure(fig, folder / "score_histogram.png", dpi=100, bbox_inches="tight"))
    return written


