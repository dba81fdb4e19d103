"""AUC beyond the retrieved list: per query against the whole corpus, and pooled across queries.

Why two more AUCs. The per-query AUC of :mod:`eval.metrics` compares relevant documents with the
*retrieved* non-relevant ones, which says how well the top of the list is ordered. The MW-loss
argument for AUC as a calibration diagnostic is about something else: does one threshold on the
score separate relevant from non-relevant pairs, for every query at once?

* ``AUC-corpus`` (per query, then averaged): relevant documents vs *every* other document of the
  corpus, scored exactly (dense: all inner products; BM25: all BM25 scores). The score matrix is
  produced a chunk of queries at a time, never as a whole Q x N array; under torchrun each rank scores its
  own shard of the corpus (dense) or of the queries (BM25), and only counts and sampled scores cross ranks.
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
    """Whether :func:`corpus_auc` can score the whole corpus with this retriever (dense, or BM25)."""
    return isinstance(source, (EmbeddingSource, CorpusScorer))


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


_AUC_ROWS = 16_384  # corpus rows scored at once (a float64 copy of 50 MB at 384 dimensions)


@dataclass
class _Judged:
    """One evaluated query: the corpus positions of its relevant documents (qrels order), how many relevant ones
    the corpus lacks, and its own position when it is to be left out of the negatives (-1: none)."""

    positives: np.ndarray
    missing: int
    identical: int

    def negatives(self, total: int) -> int:
        left_out = self.identical >= 0 and self.identical not in set(self.positives.tolist())
        return total - self.positives.size - int(left_out)

    def negative_positions(self, total: int) -> np.ndarray:
        mask = np.ones(total, dtype=bool)
        mask[self.positives] = False
        if self.identical >= 0:
            mask[self.identical] = False
        return np.flatnonzero(mask)


def _wins(negatives: np.ndarray, positives: np.ndarray) -> tuple[int, int]:
    """(pairs a positive wins, pairs tied) of ``positives`` against ``negatives``."""
    negatives = np.sort(negatives.astype(np.float64))
    positives = positives.astype(np.float64)
    below = np.searchsorted(negatives, positives, side="left")
    tied = np.searchsorted(negatives, positives, side="right") - below
    return int(below.sum()), int(tied.sum())


def _full_row_counts(source: CorpusScorer, corpus: Corpus, queries: Queries, judged: dict[str, _Judged],
                     sample: int, rng: np.random.Generator
                     ) -> Iterator[tuple[str, np.ndarray, int, int, np.ndarray]]:
    """Per query from whole score rows (BM25): (id, positive scores, wins, ties, sampled negative scores).

    Under torchrun each rank scores a contiguous share of the queries (a query's row depends on that query alone)
    and the small per-query results are exchanged in query order. Every rank draws the sampled negatives of every
    query, in query order, so the sample is the one one process draws, whatever the number of ranks."""
    from retriever.ranks import process_group

    total = len(corpus)
    ids = list(queries)
    chosen = [rng.choice(candidates, size=min(sample, candidates.size), replace=False)
              for candidates in (judged[q].negative_positions(total) for q in ids)]
    group = process_group()
    share = group.shard(len(ids)) if group else slice(0, len(ids))
    drawn = dict(zip(ids[share], chosen[share]))

    def counted(query_id: str, row: np.ndarray) -> tuple[str, np.ndarray, int, int, np.ndarray]:
        row = np.asarray(row)
        query = judged[query_id]
        candidates = query.negative_positions(total)
        wins, ties = _wins(row[candidates], row[query.positives]) if query.positives.size else (0, 0)
        return (query_id, row[query.positives].astype(np.float64), wins, ties,
                row[drawn[query_id]].astype(np.float64))

    rows = (counted(query_id, row) for query_id, row in source.scores(corpus, {q: queries[q] for q in ids[share]}))
    if group is None:
        yield from rows  # one process: streamed, a query at a time
        return
    for part in group.all_gather_objects(list(rows)):
        yield from part


def _dense_counts(source: object, corpus: Corpus, vectors: np.ndarray, judged: dict[str, _Judged], sample: int,
                  rng: np.random.Generator, chunk_size: int | None
                  ) -> Iterator[tuple[str, np.ndarray, int, int, np.ndarray]]:
    """The same from inner products, over the rows this process holds (hardneg's dense retriever: its shard under
    torchrun, memory-mapped from the cache or not), a chunk of queries at a time.

    Each rank scores the queries against its own rows only; what crosses ranks is small: the positives' and the
    sampled negatives' scores (held by the rank whose rows they are) and each query's win and tie counts, which
    add up over disjoint rows to the one-process counts. The whole embedding matrix is never gathered.

    The inner products are taken in float64 and rounded to float32: a float32 matrix product rounds differently
    with the BLAS's blocking and thread count, which differ between one process and N, and a document's score
    would then move by an ulp, turning its ties (duplicate documents) into wins or losses from run to run. The
    float64 products of float32 embeddings are within far less than a float32 ulp of exact, so the rounded
    scores come out the same whatever the split."""
    from retriever.dense import DenseRetriever
    from retriever.embedding_cache import Rows, release
    from retriever.ranks import process_group

    if isinstance(source, DenseRetriever):
        pieces, group = source.local_rows(corpus), process_group()
    else:
        pieces, group = [Rows(0, np.asarray(source.corpus_embeddings(corpus), dtype=np.float32))], None
    first = pieces[0].start if pieces else 0
    held = sum(len(piece.array) for piece in pieces)
    if any(a.end != b.start for a, b in zip(pieces, pieces[1:])):
        raise RuntimeError("AUC: the rows of this process are not contiguous")
    total = len(corpus)
    ids = list(judged)
    chunk = chunk_size or max(1, (64 << 20) // (4 * max(held, 1)))
    for begin in range(0, len(ids), chunk):
        batch = ids[begin:begin + chunk]
        queries = np.ascontiguousarray(vectors[begin:begin + chunk], dtype=np.float64)
        scores = np.empty((len(batch), held), dtype=np.float32)
        for piece in pieces:
            for row in range(0, len(piece.array), _AUC_ROWS):
                block = np.asarray(piece.array[row:row + _AUC_ROWS], dtype=np.float64)
                at = piece.start - first + row
                scores[:, at:at + len(block)] = queries @ block.T
                release(piece.array)
        sampled = [rng.choice(candidates, size=min(sample, candidates.size), replace=False)
                   for candidates in (judged[q].negative_positions(total) for q in batch)]

        def held_scores(positions: np.ndarray, row: np.ndarray) -> dict[int, float]:
            local = positions[(positions >= first) & (positions < first + held)]
            return dict(zip(local.tolist(), row[local - first].tolist()))

        known = [(held_scores(judged[q].positives, row), held_scores(chosen, row))
                 for q, row, chosen in zip(batch, scores, sampled)]
        if group:
            parts = group.all_gather_objects(known)
            known = [({k: v for part in parts for k, v in part[i][0].items()},
                      {k: v for part in parts for k, v in part[i][1].items()}) for i in range(len(batch))]
        positive_scores = [np.array([found[p] for p in judged[q].positives.tolist()], dtype=np.float32)
                           for q, (found, _) in zip(batch, known)]
        counts = []
        for q, row, positives in zip(batch, scores, positive_scores):
            query = judged[q]
            mask = np.ones(held, dtype=bool)
            for position in (*query.positives.tolist(), query.identical):
                if first <= position < first + held:
                    mask[position - first] = False
            counts.append(_wins(row[mask], positives) if positives.size else (0, 0))
        if group:
            counts = [tuple(map(sum, zip(*column))) for column in zip(*group.all_gather_objects(counts))]
        for q, positives, (wins, ties), (_, negatives), chosen in zip(batch, positive_scores, counts, known, sampled):
            yield (q, positives.astype(np.float64), int(wins), int(ties),
                   np.array([negatives[p] for p in chosen.tolist()], dtype=np.float64))


def corpus_auc(source: object, corpus: Corpus, queries: Queries, qrels: Qrels, *, relevance_level: int = 1,
               ignore_identical_ids: bool = False, negatives_per_query: int = 100, seed: int = 42,
               query_vectors: np.ndarray | None = None, chunk_size: int | None = None,
               show_progress: bool = False) -> AUCResult:
    """Whole-corpus per-query AUC and the pooled sample, from exact scores of every document.

    Positives are the documents judged with grade >= ``relevance_level``; negatives every other
    corpus document (judged non-relevant or unjudged). A relevant document missing from the corpus has no
    score and loses every pair, as an unretrieved one does in ``AUC`` (BEIR/MTEB keep such judgements); the
    pooled sample holds the scored ones only. The pooled negatives are drawn per query with
    ``numpy.random.default_rng(seed)``, in query order, so the same seed gives the same sample, whatever
    the number of processes. ``query_vectors``, when given, are the embeddings of ``queries`` in their order.
    """
    rng = np.random.default_rng(seed)
    judged: dict[str, _Judged] = {}
    for query_id in queries:
        relevant = [d for d, g in qrels.get(query_id, {}).items() if g >= relevance_level]
        if relevant:
            present = [corpus.position[d] for d in relevant if d in corpus.position]
            identical = corpus.position.get(query_id, -1) if ignore_identical_ids else -1
            judged[query_id] = _Judged(np.array(present, dtype=np.int64), len(relevant) - len(present), identical)
    total = len(corpus)
    if isinstance(source, EmbeddingSource):
        if query_vectors is None:
            vectors = np.asarray(source.query_embeddings({q: queries[q] for q in judged}), dtype=np.float32)
        else:
            order = {query_id: row for row, query_id in enumerate(queries)}
            vectors = np.asarray(query_vectors, dtype=np.float32)[[order[q] for q in judged]]
        rows = _dense_counts(source, corpus, vectors, judged, negatives_per_query, rng, chunk_size)
    elif isinstance(source, CorpusScorer):
        rows = _full_row_counts(source, corpus, {q: queries[q] for q in judged}, judged, negatives_per_query, rng)
    else:
        raise TypeError(f"{type(source).__name__} cannot score the whole corpus")
    per_query: dict[str, float] = {}
    pooled_pos: list[np.ndarray] = []
    pooled_neg: list[np.ndarray] = []
    for query_id, positives, wins, ties, sampled in tqdm(rows, total=len(judged), desc="AUC (whole corpus)",
                                                         unit="query", disable=not show_progress):
        query = judged[query_id]
        negatives = query.negatives(total)
        if negatives > 0:
            value = (wins + 0.5 * ties) / (positives.size * negatives) if positives.size else 0.0
            per_query[query_id] = value * positives.size / (positives.size + query.missing)
        pooled_pos.append(positives)
        pooled_neg.append(sampled)
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


