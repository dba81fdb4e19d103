"""BM25 over a corpus, with bm25s (fast, default) or rank-bm25 (the reference implementation).

Both backends see the same tokens: bm25s's tokenizer (lower-case, scikit-learn's ``\\b\\w\\w+\\b``
pattern, English stop-words removed) followed by the Snowball English stemmer, applied to
``title + " " + text``. Defaults are Anserini's ``k1=0.9, b=0.4`` with Lucene's BM25 variant in
bm25s, the setting behind the published "BM25 flat" BEIR figures. rank-bm25 scores with its own
``BM25Okapi`` formula (Robertson IDF with an epsilon floor), so its scores differ in scale but its
rankings should agree closely.

Scores are computed for the whole corpus per query, which gives both the top-k list and the exact
scores of labelled positives that positive-aware mining needs.

Under torchrun (``mine``/``evaluate`` with several processes) every rank builds the index over the whole corpus
(tokenising is a small share of the work) and scores a contiguous share of the queries; the per-query results are
exchanged in query order, so every rank holds what one process computes, and a query's scores never depend on
which rank computed them.
"""

from __future__ import annotations

import os

# bm25s runs a JAX top-k at import when JAX is installed; on a GPU machine that makes JAX take 75 % of the
# GPU's memory before the encoder gets any (and fails outright with several processes per GPU). hardneg
# only asks bm25s for scores, never its top-k, so JAX stays on the CPU unless the user chose otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import bm25s  # noqa: E402
import numpy as np  # noqa: E402
import Stemmer  # noqa: E402
from tqdm.auto import tqdm

from retriever.data import Corpus, Queries, Run, standardized  # noqa: E402
from retriever.io import HardnegError  # noqa: E402
from retriever.ranks import process_group, work_record  # noqa: E402

BACKENDS = ("bm25s", "rank-bm25")


class BM25Retriever:
    kind = "bm25"

    def __init__(self, *, backend: str = "bm25s", k1: float = 0.9, b: float = 0.4,
                 show_progress: bool = True) -> None:
        if backend not in BACKENDS:
            raise HardnegError(f"unknown BM25 backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend, self.k1, self.b = backend, k1, b
        self.show_progress = show_progress
        self.description = f"bm25:{backend}(k1={k1},b={b})"
        self._stemmer = Stemmer.Stemmer("english")
        self._indexed: tuple[Corpus, object] | None = None
        self.shard_queries = 0  # queries this process has scored (its shares under torchrun)

    def tokenize(self, texts: list[str]) -> list[list[str]]:
        return bm25s.tokenize(texts, stopwords="en", stemmer=self._stemmer, return_ids=False,
                              show_progress=False)

    def _index(self, corpus: Corpus):
        if self._indexed is None or self._indexed[0] is not corpus:
            tokens = self.tokenize(corpus.texts())
            if self.backend == "bm25s":
                index = bm25s.BM25(k1=self.k1, b=self.b, method="lucene")
                index.index(tokens, show_progress=False)
            else:
                from rank_bm25 import BM25Okapi

                index = BM25Okapi(tokens, k1=self.k1, b=self.b)
            self._indexed = (corpus, index)
        return self._indexed[1]

    def scores(self, corpus: Corpus, queries: Queries):
        """Yield (query id, scores of every document) for each query."""
        index = self._index(corpus)
        tokenized = self.tokenize(list(queries.values()))
        for query_id, tokens in tqdm(zip(queries, tokenized), total=len(queries), desc="bm25",
                                     unit="query", disable=not self.show_progress):
            if self.backend == "bm25s":
                known = [token for token in tokens if token in index.vocab_dict]
                scores = index.get_scores(known) if known else np.zeros(len(corpus), dtype=np.float32)
            else:
                scores = index.get_scores(tokens)
            yield query_id, np.asarray(scores, dtype=np.float32)

    def search(self, corpus: Corpus, queries: Queries, top_k: int) -> Run:
        """Top documents with a positive score (a document sharing no term with the query is not returned)."""
        return self.search_and_score(corpus, queries, top_k, {})[0]

    def search_and_score(self, corpus: Corpus, queries: Queries, top_k: int,
                         pairs: dict[str, list[str]]) -> tuple[Run, Run]:
        """``search`` and ``score`` from one scoring pass per query (mining needs both; BM25 scores every
        document of the corpus anyway, so the positives' scores come for free)."""
        run: Run = {}
        scored: Run = {}
        local = self._local(queries)
        for query_id, scores in self.scores(corpus, local):
            k = min(top_k, len(scores))
            top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
            top = top[np.lexsort((top, -scores[top]))]
            run[query_id] = {corpus.ids[i]: float(scores[i]) for i in top if scores[i] > 0}
            if query_id in pairs:
                scored[query_id] = {doc_id: float(scores[corpus.position[doc_id]]) for doc_id in pairs[query_id]}
        return _gathered(run), _gathered(scored)

    def score(self, corpus: Corpus, queries: Queries, pairs: dict[str, list[str]]) -> Run:
        wanted = self._local({query_id: queries[query_id] for query_id in pairs})
        return _gathered({query_id: {doc_id: float(scores[corpus.position[doc_id]]) for doc_id in pairs[query_id]}
                          for query_id, scores in self.scores(corpus, wanted)})

    def standardized_scores(self, corpus: Corpus, queries: Queries, pairs: dict[str, list[str]]) -> Run:
        """The listed documents' scores as z-scores over the whole corpus (``StandardizedScorer``): BM25 scores
        every document of the corpus anyway, so each query's mean and deviation come from its full row."""
        wanted = self._local({query_id: queries[query_id] for query_id in pairs})
        found: Run = {}
        for query_id, scores in self.scores(corpus, wanted):
            row = scores.astype(np.float64)
            found[query_id] = standardized({doc_id: row[corpus.position[doc_id]] for doc_id in pairs[query_id]},
                                           float(row.mean()), float(row.std()))
        return _gathered(found)

    def _local(self, queries: Queries) -> Queries:
        """The queries this process scores: all of them, or under torchrun its contiguous share."""
        group = process_group()
        if group is not None:
            queries = dict(list(queries.items())[group.shard(len(queries))])
        self.shard_queries += len(queries)
        return queries

    def shard_record(self) -> dict | None:
        """Under torchrun, per rank the queries it scored in this run (a resumed run counts only what it did)."""
        return work_record(self.description, "queries", self.shard_queries)


def _gathered(part: Run) -> Run:
    """Every rank's share of a run, joined in rank order (= query order, the shares being contiguous)."""
    group = process_group()
    if group is None:
        return part
    joined: Run = {}
    for piece in group.all_gather_objects(part):
        joined.update(piece)
    return joined
