"""Mining: labelled positives never come out as negatives, filters see the right scores, output is reproducible."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from mining.filters import TopK, TopKPercPos
from mining.mine import META_FILE, POOLS_FILE, mine
from retriever.bm25 import BM25Retriever
from retriever.data import Dataset, read_pools
from retriever.io import HardnegError


def small(dataset: Dataset, queries: int = 60) -> Dataset:
    keep = sorted(dataset.qrels)[:queries]
    return replace(dataset, qrels={q: dataset.qrels[q] for q in keep}, queries={q: dataset.queries[q] for q in keep})


def test_bm25_pools_follow_the_filter_exactly(demo_train, tmp_path):
    data = small(demo_train)
    result = mine(data, BM25Retriever(show_progress=False), depth=50, num_negatives=5,
                  filter=TopKPercPos(0.95), output_dir=tmp_path)
    # Brute force: score every document with an independent BM25 pass and redo the selection by hand.
    bm25 = BM25Retriever(show_progress=False)
    all_scores = dict(bm25.scores(data.corpus, data.queries))
    pools = {pool.query_id: pool for pool in read_pools(tmp_path / POOLS_FILE, data.corpus)}
    assert set(pools) == set(data.queries)
    removed = 0
    for query_id, scores in all_scores.items():
        positives = set(data.relevant(query_id))
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:50]
        ranked = [(rank, data.corpus.ids[i], float(scores[i])) for rank, i in enumerate(order, 1) if scores[i] > 0]
        anchor = min(float(scores[data.corpus.position[d]]) for d in positives)
        threshold = anchor - abs(anchor) * 0.05
        candidates = [c for c in ranked if c[1] not in positives]
        survivors = [c for c in candidates if c[2] <= threshold]
        removed += len(candidates) - len(survivors)
        pool = pools[query_id]
        assert [n.doc_id for n in pool.negatives] == [c[1] for c in survivors[:5]]
        assert [n.rank for n in pool.negatives] == [c[0] for c in survivors[:5]]
        assert not {n.doc_id for n in pool.negatives} & positives
        assert {p.doc_id for p in pool.positives} == positives
        assert min(p.score for p in pool.positives) == pytest.approx(anchor, abs=1e-5)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["counts"]["removed_by_filter"] == removed == result.stats.removed_by_filter
    assert meta["settings"]["filter"] == {"name": "topk-percpos", "perc": 0.95}
    assert meta["input_checksums"] and meta["library_versions"]["bm25s"]


def test_naive_topk_removes_only_positives(demo_train):
    data = small(demo_train, 20)
    result = mine(data, "bm25", depth=30, num_negatives=30, filter=TopK())
    assert result.stats.removed_by_filter == 0
    assert result.stats.kept_negatives == result.stats.candidates - result.stats.removed_positives > 0
    for pool in result.pools:
        assert not {n.doc_id for n in pool.negatives} & {p.doc_id for p in pool.positives}


def test_same_seed_same_bytes_and_seed_matters(demo_train, tmp_path):
    data = small(demo_train, 40)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        mine(data, "bm25", depth=60, num_negatives=4, filter=TopK(), sampling="random", seed=seed,
             output_dir=tmp_path / name)
    a, b, c = ((tmp_path / name / POOLS_FILE).read_bytes() for name in "abc")
    assert a == b
    assert a != c
    meta_a, meta_b = (json.loads((tmp_path / n / META_FILE).read_text()) for n in "ab")
    meta_a.pop("seconds"), meta_b.pop("seconds")
    assert meta_a == meta_b


def test_short_queries_are_reported_not_padded(demo_train):
    data = small(demo_train, 30)
    result = mine(data, "bm25", depth=5, num_negatives=5, filter=TopKPercPos(0.5))
    short = set(result.stats.queries_short)
    assert short, "a 5-deep pool at 50% of the positive score should leave some queries short"
    for pool in result.pools:
        assert len(pool.negatives) <= 5
        assert (len(pool.negatives) < 5) == (pool.query_id in short)
    assert result.meta["counts"]["share_short_of_negatives"] == pytest.approx(len(short) / len(result.pools))
    summary = result.summary()
    assert f"{len(short)} queries short of negatives" in summary
    assert ("note:" in summary) == (len(short) / len(result.pools) > 0.5)


class HashingEncoder:
    """A custom model from the Python API: bag of hashed words, no torch."""

    def _embed(self, texts):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                out[row, hash(word) % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    def encode_queries(self, texts):
        return self._embed(texts)

    def encode_documents(self, texts):
        return self._embed(texts)


def test_any_encoder_can_mine(demo_train):
    result = mine(small(demo_train, 10), HashingEncoder(), depth=20, num_negatives=3, filter=TopK())
    assert [len(pool.negatives) for pool in result.pools] == [3] * 10
    assert all(n.source == "dense" for pool in result.pools for n in pool.negatives)
    percpos = mine(small(demo_train, 10), HashingEncoder(), depth=20, num_negatives=3)
    assert percpos.stats.removed_by_filter > 0  # the encoder can score positives, so the filter ran


def test_dense_mining_with_a_real_model(demo_train, tiny_model):
    result = mine(small(demo_train, 10), str(tiny_model), depth=20, num_negatives=3)
    pool = result.pools[0]
    assert all(-1.0001 <= p.score <= 1.0001 for p in pool.positives)  # cosine scale
    threshold = TopKPercPos(0.95).threshold(min(p.score for p in pool.positives))
    assert all(n.score <= threshold + 1e-6 for n in pool.negatives)


class SearchOnly:
    def search(self, corpus, queries, top_k):
        return {q: {corpus.ids[0]: 1.0} for q in queries}


@pytest.mark.parametrize("kwargs, message", [
    ({"depth": 3, "num_negatives": 5}, "depth"),
    ({"num_negatives": 0}, "num_negatives"),
    ({"sampling": "best"}, "sampling"),
    ({"anchor": "median"}, "anchor"),
])
def test_bad_settings_are_refused_before_work(demo_train, kwargs, message, tmp_path):
    with pytest.raises(HardnegError, match=message):
        mine(demo_train, "a/model/path/that/does/not/exist", output_dir=tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_positive_aware_filter_needs_scores(demo_train):
    with pytest.raises(HardnegError, match="score"):
        mine(small(demo_train, 5), SearchOnly(), filter=TopKPercPos(0.95))
    assert mine(small(demo_train, 5), SearchOnly(), filter=TopK(), num_negatives=1).pools
