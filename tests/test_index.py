"""The faiss index layer: approximate indexes find what exact search finds, deep searches past a k limit are
exact, and bad index strings are refused before any data is touched. References are numpy brute force."""

from __future__ import annotations

import numpy as np
import pytest

from retriever.index import VectorIndex, check_index_spec, exact_search
from retriever.io import HardnegError


def vectors(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(documents: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries.astype(np.float64) @ documents.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def test_flat_is_exact():
    documents, queries = vectors(3000), vectors(40, seed=1)
    scores, positions = exact_search(documents, queries, 50)
    ref_scores, ref_positions = brute_force(documents, queries, 50)
    assert (positions == ref_positions).all()
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("spec, options, minimum", [
    ("IVF32,Flat", {"nprobe": 16}, 0.85),
    ("IVF32,Flat", {"nprobe": 32}, 0.999),  # every list visited: exact
    ("HNSW32", {"ef_search": 128}, 0.95),
])
def test_approximate_indexes_find_the_true_neighbours(spec, options, minimum):
    documents, queries = vectors(4000), vectors(60, seed=1)
    _, truth = brute_force(documents, queries, 10)
    _, found = VectorIndex(documents, spec, **options).search(queries, 10)
    assert recall(found, truth) >= minimum


def test_fewer_probes_trade_recall_for_speed():
    documents, queries = vectors(4000), vectors(60, seed=1)
    _, truth = brute_force(documents, queries, 10)
    low = recall(VectorIndex(documents, "IVF64,Flat", nprobe=1).search(queries, 10)[1], truth)
    high = recall(VectorIndex(documents, "IVF64,Flat", nprobe=16).search(queries, 10)[1], truth)
    assert low < high


@pytest.mark.parametrize("k_limit, shard_size, re_searched", [
    (64, None, "none"),   # automatic shards sized with 4x headroom: the merge alone is exact
    (50, 700, "some"),    # shards that fill their k_limit list for some queries: those are searched again
    (100, 3000, "all"),   # two shards of 100 cannot make 300: every query is searched again
])
def test_depth_past_the_k_limit_is_exact(k_limit, shard_size, re_searched):
    """faiss-gpu caps k at 2048; the same code path runs here with a small cap and must give exact results."""
    documents = vectors(5000)
    # Clustered queries so that some shards hold more than k_limit of a query's top k (the re-search path).
    queries = np.vstack([vectors(20, seed=1), documents[:20] + 0.01]).astype(np.float32)
    index = VectorIndex(documents, k_limit=k_limit, shard_size=shard_size)
    scores, positions = index.search(queries, 300, chunk_size=16)
    assert index.re_searched == {"none": 0, "all": len(queries)}.get(re_searched, index.re_searched)
    assert re_searched != "some" or 0 < index.re_searched < len(queries)
    ref_scores, ref_positions = brute_force(documents, queries, 300)
    assert scores.shape == (40, 300)
    assert (positions == ref_positions).all()
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_depth_beyond_the_corpus_returns_everything():
    documents = vectors(30)
    scores, positions = VectorIndex(documents, k_limit=8).search(vectors(3, seed=2), 100)
    assert positions.shape == (3, 30)
    assert sorted(positions[0]) == list(range(30))


@pytest.mark.parametrize("spec", ["Flat", "IVF256,Flat", "HNSW32", "IVF1024,PQ16", "OPQ16,IVF64,PQ16"])
def test_valid_index_strings_pass(spec):
    check_index_spec(spec)


@pytest.mark.parametrize("spec", ["IVF", "Foo", "HNSW32,Foo", "", "IVF256,Flatt"])
def test_unknown_index_strings_are_refused(spec):
    with pytest.raises(HardnegError, match="index"):
        check_index_spec(spec)


def test_search_knobs_must_match_the_index():
    with pytest.raises(HardnegError, match="nprobe"):
        VectorIndex(vectors(100), "Flat", nprobe=4)
    with pytest.raises(HardnegError, match="ef_search"):
        VectorIndex(vectors(100), "IVF4,Flat", ef_search=4)
