"""Whole-corpus and pooled AUC: equal to direct pairwise counts and to scipy's Mann-Whitney U."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from eval.auc import corpus_auc, mann_whitney_auc, roc_curve, run_pooled_sample
from retriever.bm25 import BM25Retriever
from retriever.data import Corpus
from retriever.dense import DenseRetriever


class RandomEncoder:
    """A deterministic Encoder: each text's vector is seeded by the text, values rounded so scores tie."""

    def _vector(self, text: str) -> np.ndarray:
        rng = np.random.default_rng(sum(map(ord, text)) * 7919 + len(text))
        return np.round(rng.standard_normal(6), 1).astype(np.float32)

    def encode_queries(self, texts):
        return np.stack([self._vector("q:" + t) for t in texts])

    def encode_documents(self, texts):
        return np.stack([self._vector(t) for t in texts])


def small_corpus(n: int = 40) -> Corpus:
    words = ["vitamin", "sun", "heart", "blood", "sugar", "diet", "fish", "oil", "sleep", "bone"]
    rng = np.random.default_rng(1)
    ids = [f"d{i}" for i in range(n)]
    bodies = [" ".join(rng.choice(words, size=6)) + f" doc{i}" for i in range(n)]
    return Corpus(ids=ids, titles=[""] * n, bodies=bodies)


def case():
    corpus = small_corpus()
    queries = {f"q{i}": f"query {w}" for i, w in enumerate(["vitamin sun", "heart blood", "fish oil", "sleep bone",
                                                             "sugar diet"])}
    qrels = {"q0": {"d1": 2, "d2": 1, "d3": 0}, "q1": {"d4": 1, "d10": 1}, "q2": {"d5": 0},
             "q3": {"d7": 1, "d8": 2, "d9": 1, "d30": 1}, "q4": {"d11": 1}}
    return corpus, queries, qrels


def pairwise(row: np.ndarray, positives: list[int], negatives: list[int]) -> float:
    wins = 0.0
    for p in positives:
        for n in negatives:
            wins += 1.0 if row[p] > row[n] else 0.5 if row[p] == row[n] else 0.0
    return wins / (len(positives) * len(negatives))


@pytest.mark.parametrize("seed", range(5))
def test_pooled_auc_equals_mann_whitney_u(seed):
    rng = np.random.default_rng(seed)
    positives = np.round(rng.normal(0.5, 1, size=int(rng.integers(1, 300))), 1)  # rounded: many ties
    negatives = np.round(rng.normal(0, 1, size=int(rng.integers(1, 500))), 1)
    u = mannwhitneyu(positives, negatives, alternative="two-sided").statistic
    assert mann_whitney_auc(positives, negatives) == pytest.approx(u / (positives.size * negatives.size), abs=1e-12)
    fpr, tpr = roc_curve(positives, negatives)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == pytest.approx(1) and tpr[-1] == pytest.approx(1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(mann_whitney_auc(positives, negatives), abs=1e-12)


def test_mann_whitney_auc_edge_cases():
    assert mann_whitney_auc([1.0, 2.0], [0.0]) == 1.0
    assert mann_whitney_auc([0.0], [1.0, 2.0]) == 0.0
    assert mann_whitney_auc([1.0], [1.0]) == 0.5
    with pytest.raises(ValueError):
        mann_whitney_auc([], [1.0])


@pytest.mark.parametrize("ignore", [False, True])
def test_dense_corpus_auc_equals_pairwise_count(ignore):
    corpus, queries, qrels = case()
    retriever = DenseRetriever(RandomEncoder(), show_progress=False)
    queries = queries | {"d12": "a query whose id is a document"}
    qrels = qrels | {"d12": {"d13": 1}}
    result = corpus_auc(retriever, corpus, queries, qrels, ignore_identical_ids=ignore, negatives_per_query=15)
    documents = RandomEncoder().encode_documents(corpus.texts())
    assert set(result.per_query) == {"q0", "q1", "q3", "q4", "d12"}  # q2 has nothing relevant
    for query_id, value in result.per_query.items():
        query = RandomEncoder().encode_queries([queries[query_id]])[0]
        # scores are float64 products rounded to float32: the same whatever the BLAS's blocking or threads
        row = (documents.astype(np.float64) @ query.astype(np.float64)).astype(np.float32)
        positives = [corpus.position[d] for d, g in qrels[query_id].items() if g >= 1]
        negatives = [i for i in range(len(corpus)) if i not in positives
                     and not (ignore and corpus.ids[i] == query_id)]
        assert value == pytest.approx(pairwise(row, positives, negatives), abs=1e-12)
    # the same with two queries per chunk (bounded memory) and with relevance level 2
    chunked = corpus_auc(retriever, corpus, queries, qrels, ignore_identical_ids=ignore, chunk_size=2,
                         negatives_per_query=15)
    assert chunked.per_query == pytest.approx(result.per_query, abs=1e-12)
    assert np.array_equal(chunked.pooled_negatives, result.pooled_negatives)  # the same sample and scores
    graded = corpus_auc(retriever, corpus, queries, qrels, relevance_level=2, negatives_per_query=15)
    assert set(graded.per_query) == {"q0", "q3"}
    # the query vectors evaluate passes are those of every query, q2 (nothing relevant) included, in their order
    given = corpus_auc(retriever, corpus, queries, qrels, ignore_identical_ids=ignore, negatives_per_query=15,
                       query_vectors=retriever.query_embeddings(queries))
    assert given.per_query == result.per_query
    assert np.array_equal(given.pooled_negatives, result.pooled_negatives)


class MatrixSource:
    """A custom retriever that only exposes its embeddings (the EmbeddingSource protocol)."""

    def corpus_embeddings(self, corpus):
        return RandomEncoder().encode_documents(corpus.texts())

    def query_embeddings(self, queries):
        return RandomEncoder().encode_queries(list(queries.values()))


def test_a_custom_embedding_source_gets_the_same_auc_as_hardnegs_retriever():
    corpus, queries, qrels = case()
    ours = corpus_auc(DenseRetriever(RandomEncoder(), show_progress=False), corpus, queries, qrels, seed=5)
    theirs = corpus_auc(MatrixSource(), corpus, queries, qrels, seed=5)
    assert ours.per_query == theirs.per_query
    assert np.array_equal(ours.pooled_positives, theirs.pooled_positives)
    assert np.array_equal(ours.pooled_negatives, theirs.pooled_negatives)


def test_pooled_sample_is_seeded_and_never_relevant():
    corpus, queries, qrels = case()
    retriever = DenseRetriever(RandomEncoder(), show_progress=False)
    one = corpus_auc(retriever, corpus, queries, qrels, negatives_per_query=10, seed=3)
    two = corpus_auc(retriever, corpus, queries, qrels, negatives_per_query=10, seed=3)
    other = corpus_auc(retriever, corpus, queries, qrels, negatives_per_query=10, seed=4)
    assert np.array_equal(one.pooled_negatives, two.pooled_negatives)
    assert not np.array_equal(one.pooled_negatives, other.pooled_negatives)
    relevant_pairs = sum(1 for q in ("q0", "q1", "q3", "q4") for g in qrels[q].values() if g >= 1)
    assert one.pooled_positives.size == relevant_pairs and one.pooled_negatives.size == 4 * 10
    assert one.source == "corpus"
    u = mannwhitneyu(one.pooled_positives, one.pooled_negatives).statistic
    assert one.pooled == pytest.approx(u / (one.pooled_positives.size * one.pooled_negatives.size), abs=1e-12)
    # every sampled negative score is the score of a non-relevant document of its query
    documents = RandomEncoder().encode_documents(corpus.texts())
    offset = 0
    for query_id in ("q0", "q1", "q3", "q4"):
        row = (documents @ RandomEncoder().encode_queries([queries[query_id]])[0]).astype(np.float64)
        allowed = np.array([row[i] for i, d in enumerate(corpus.ids) if qrels[query_id].get(d, 0) < 1])
        for value in one.pooled_negatives[offset:offset + 10]:
            assert np.abs(allowed - value).min() < 1e-5  # float32 products summed in another order
        offset += 10


def test_bm25_corpus_auc_equals_pairwise_count():
    corpus, queries, qrels = case()
    bm25 = BM25Retriever(show_progress=False)
    result = corpus_auc(bm25, corpus, queries, qrels, negatives_per_query=5)
    rows = dict(bm25.scores(corpus, queries))
    for query_id, value in result.per_query.items():
        positives = [corpus.position[d] for d, g in qrels[query_id].items() if g >= 1]
        negatives = [i for i in range(len(corpus)) if i not in positives]
        assert value == pytest.approx(pairwise(rows[query_id], positives, negatives), abs=1e-12)


def test_run_pooled_sample():
    qrels = {"q1": {"a": 1, "b": 2, "c": 0}, "q2": {"x": 1}, "q3": {"z": 0}}
    run = {"q1": {"a": 3.0, "b": 1.0, "c": 2.0, "u": 0.5}, "q2": {"y": 1.0}, "q3": {"z": 1.0}}
    result = run_pooled_sample(run, qrels, negatives_per_query=10)
    assert sorted(result.pooled_positives.tolist()) == [1.0, 3.0]  # q2's x was not retrieved: no score
    assert sorted(result.pooled_negatives.tolist()) == [0.5, 1.0, 2.0]  # c, u of q1; y of q2; q3 not evaluated
    assert result.pooled == pytest.approx(pairwise(np.array([3.0, 1.0, 2.0, 0.5, 1.0]), [0, 1], [2, 3, 4]))
    assert result.source == "run"
