"""Candidate sources: RRF fusion by hand, the two BM25 backends agree, cross-encoder and teacher rescoring
really change the scores the filters use, and bad source settings are refused before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import small

from mining.filters import TopK, TopKMarginPos, TopKPercPos
from mining.mine import META_FILE, mine
from mining.settings import check_source_settings
from mining.sources import CrossEncoderScorer, Hybrid, Rescored, ScoreFusion, bm25, build_rescorer, build_source, dense
from retriever.bm25 import BM25Retriever
from retriever.data import Corpus
from retriever.encoder import DualEncoder
from retriever.io import HardnegError


class FixedRun:
    """A source with a fixed ranked list (a custom Retriever from the Python API)."""

    def __init__(self, run):
        self.run = run

    def search(self, corpus, queries, top_k):
        return {q: dict(sorted(self.run[q].items(), key=lambda kv: -kv[1])[:top_k]) for q in queries}


def test_reciprocal_rank_fusion_by_hand():
    corpus = Corpus(ids=["a", "b", "c", "d", "e"], titles=[""] * 5, bodies=["x"] * 5)
    first = FixedRun({"q": {"a": 9.0, "b": 8.0, "c": 7.0}})
    second = FixedRun({"q": {"c": 0.9, "d": 0.8, "a": 0.1}})
    fused = Hybrid([first, second], k=60).search(corpus, {"q": "text"}, 10)["q"]
    expected = {"a": 1 / 61 + 1 / 63, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 62}
    assert fused.keys() == expected.keys()
    for doc_id, value in expected.items():
        assert fused[doc_id] == pytest.approx(value, rel=1e-12)
    # a and c tie: corpus order breaks the tie; b and d tie likewise.
    assert list(fused) == ["a", "c", "b", "d"]
    assert list(Hybrid([first, second], k=1).search(corpus, {"q": "t"}, 2)["q"]) == ["a", "c"]


def test_hybrid_of_real_sources_fuses_both(demo_train, tiny_model):
    data = small(demo_train, 5, 300)
    lexical, semantic = bm25(show_progress=False), dense(str(tiny_model), show_progress=False)
    fused = Hybrid([lexical, semantic]).search(data.corpus, data.queries, 20)
    by_bm25 = lexical.search(data.corpus, data.queries, 20)
    by_dense = semantic.search(data.corpus, data.queries, 20)
    for query_id, row in fused.items():
        assert len(row) == 20
        assert set(row) <= set(by_bm25[query_id]) | set(by_dense[query_id])
        both = set(by_bm25[query_id]) & set(by_dense[query_id])
        if both:  # a document found by both sources outranks any found by one source at a lower rank in it
            assert max(row[d] for d in both) >= min(row.values())


def test_bm25_backends_agree_on_top_results(demo_train):
    data = small(demo_train, 30)
    fast = BM25Retriever(backend="bm25s", show_progress=False).search(data.corpus, data.queries, 10)
    reference = BM25Retriever(backend="rank-bm25", show_progress=False).search(data.corpus, data.queries, 10)
    overlaps = [len(set(fast[q]) & set(reference[q])) / max(len(reference[q]), 1) for q in data.queries]
    top1 = np.mean([next(iter(fast[q]), None) == next(iter(reference[q]), None) for q in data.queries])
    assert np.mean(overlaps) >= 0.8
    assert top1 >= 0.8


def test_cross_encoder_scores_drive_the_filter(demo_train, tiny_cross_encoder, tmp_path):
    from sentence_transformers import CrossEncoder

    data = small(demo_train, 6, 300)
    scorer = CrossEncoderScorer(str(tiny_cross_encoder), show_progress=False, max_length=64, precision="fp32")
    plain = mine(data, BM25Retriever(show_progress=False), depth=20, num_negatives=4, filter=TopKMarginPos(0.0),
                 anchor="max")
    rescored = mine(data, BM25Retriever(show_progress=False), depth=20, num_negatives=4,
                    filter=TopKMarginPos(0.0), anchor="max", rescorer=scorer, output_dir=tmp_path)
    reference = CrossEncoder(str(tiny_cross_encoder), max_length=64)  # independent scoring of the same pairs
    candidates = BM25Retriever(show_progress=False).search(data.corpus, data.queries, 20)
    changed = False
    for pool, before in zip(rescored.pools, plain.pools):
        query = data.queries[pool.query_id]
        pairs = [(query, data.corpus.text_of(d)) for d in candidates[pool.query_id]]
        expected = dict(zip(candidates[pool.query_id], reference.predict(pairs, show_progress_bar=False)))
        positive = reference.predict([(query, data.corpus.text_of(p.doc_id)) for p in pool.positives],
                                     show_progress_bar=False)
        assert [p.score for p in pool.positives] == pytest.approx([float(s) for s in positive], abs=1e-5)
        threshold = max(float(s) for s in positive)  # margin 0: nothing may outscore the best positive
        for negative in pool.negatives:
            assert negative.score == pytest.approx(float(expected[negative.doc_id]), abs=1e-5)
            assert negative.score <= threshold + 1e-6
            assert negative.source == "bm25>cross-encoder"
        survivors = sorted((d for d in candidates[pool.query_id] if d not in {p.doc_id for p in pool.positives}
                            and expected[d] <= threshold), key=lambda d: (-expected[d], data.corpus.position[d]))
        assert [n.doc_id for n in pool.negatives] == survivors[:4]
        changed |= [n.doc_id for n in pool.negatives] != [n.doc_id for n in before.negatives]
    assert changed, "cross-encoder rescoring should change which negatives are kept"
    assert any(pool.negatives for pool in rescored.pools)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["settings"]["rescorer"].startswith("cross-encoder:")


def test_a_teacher_scores_instead_of_the_retriever(demo_train, tiny_model, tmp_path):
    data = small(demo_train, 6, 300)
    teacher = DualEncoder.load(str(tiny_model))
    result = mine(data, "bm25", depth=20, num_negatives=3, filter=TopK(), rescorer=str(tiny_model))
    documents = teacher.encode_documents(data.corpus.texts())
    for pool in result.pools:
        query = teacher.encode_queries([data.queries[pool.query_id]])[0]
        for item in pool.positives + pool.negatives:
            assert item.score == pytest.approx(float(documents[data.corpus.position[item.doc_id]] @ query), abs=1e-5)
    assert all(-1.0001 <= n.score <= 1.0001 for pool in result.pools for n in pool.negatives)


def test_provenance_names_every_model_inside_composed_sources(tiny_model):
    from retriever.dense import encoding_record
    from retriever.protocol import components

    lexical, semantic, teacher = bm25(show_progress=False), dense(str(tiny_model)), dense(str(tiny_model))
    composed = Rescored(Hybrid([lexical, semantic]), teacher)
    assert components(composed)[:3] == [lexical, semantic, composed.source]
    assert components(composed)[3:] == [teacher, composed]
    # a BM25 fusion scores with the very retriever that searched: each model is named once
    fused = Rescored(Hybrid([lexical, semantic]), ScoreFusion([(semantic, 1.0), (lexical, 0.3)]))
    assert components(fused) == [lexical, semantic, fused.source, fused.scorer, fused]

    class Ensemble:  # a user's own composite: it says what it is made of, and its models are recorded
        def __init__(self, members):
            self.members = members

        def search(self, corpus, queries, top_k):
            return self.members[0].search(corpus, queries, top_k)

        def parts(self):
            return list(self.members)

    assert len(encoding_record(Ensemble([semantic, teacher]))) == 2
    assert encoding_record(Ensemble([lexical])) == []


def test_hybrid_with_a_positive_aware_filter_needs_a_rescorer(demo_train, tiny_model):
    data = small(demo_train, 4, 300)
    fused = Hybrid([bm25(show_progress=False), dense(str(tiny_model), show_progress=False)])
    with pytest.raises(HardnegError, match="rescore"):
        mine(data, fused, filter=TopKPercPos(0.95))
    result = mine(data, Rescored(fused, str(tiny_model)), depth=20, num_negatives=2, filter=TopKPercPos(0.95))
    assert result.pools and result.meta["settings"]["retriever"].startswith("hybrid-rrf(k=60)")


@pytest.mark.parametrize("kwargs, message", [
    ({"index": "IVF"}, "unknown faiss index"),
    ({"cross_encoder": "./no/such/cross-encoder"}, "does not exist"),
    ({"teacher": "/no/such/teacher"}, "does not exist"),
    ({"cross_encoder": "a", "teacher": "b"}, "not both"),
    ({"index": "HNSW32"}, "only source is BM25"),
    ({"bm25_backend": "lucene"}, "BM25 backend"),
    ({"rrf_k": 0}, "rrf-k"),
    ({"fuse_bm25": 0.3}, "one dense model to fuse BM25 with"),
    ({"fuse_bm25": 0.3, "cross_encoder": "."}, "cross-encoder cannot score every document"),
])
def test_bad_source_settings_are_refused(kwargs, message):
    with pytest.raises(HardnegError, match=message):
        check_source_settings(["bm25"], **kwargs)


def _brute_force_z(rows: np.ndarray) -> np.ndarray:
    """Each query's scores of every document as z-scores, from the full score matrix (the independent reference);
    a query that scores every document alike (BM25 with no known word) gets 0 for all."""
    rows = rows.astype(np.float64)
    deviations = rows.std(axis=1, keepdims=True)
    return (rows - rows.mean(axis=1, keepdims=True)) / np.where(deviations > 0, deviations, np.inf)


def test_standardized_scores_match_z_scores_of_every_document(demo_train, tiny_model):
    """Dense: the z-scores from the corpus moments (q.mu, q^T Sigma q) equal those of the whole score row; BM25: of
    its whole score row."""
    data = small(demo_train, 8, 300)
    pairs = {q: sorted(data.relevant(q))[:3] + data.corpus.ids[:2] for q in data.queries}
    semantic, lexical = dense(str(tiny_model), show_progress=False), bm25(show_progress=False)
    encoder = DualEncoder.load(str(tiny_model))
    full_dense = _brute_force_z(encoder.encode_queries(list(data.queries.values()))
                                @ encoder.encode_documents(data.corpus.texts()).T)
    full_bm25 = _brute_force_z(np.stack([row for _, row in lexical.scores(data.corpus, data.queries)]))
    for scorer, full in ((semantic, full_dense), (lexical, full_bm25)):
        standardized = scorer.standardized_scores(data.corpus, data.queries, pairs)
        for i, query_id in enumerate(data.queries):
            for doc_id in pairs[query_id]:
                assert standardized[query_id][doc_id] == pytest.approx(full[i, data.corpus.position[doc_id]],
                                                                       abs=1e-4)


@pytest.mark.parametrize("blocks", [1, 2, 5, 8, 13])
def test_block_sums_have_the_same_bits_however_the_ranks_split_the_blocks(blocks):
    """Corpus moments add per-block sums on a fixed tree: any split of the blocks into contiguous runs (the ranks'
    shards) gives exactly one process's result, which is the plain sum to rounding."""
    from retriever.dense import _BlockTree

    rng = np.random.default_rng(blocks)
    values = [(rng.normal(size=3) * 10.0 ** rng.integers(-6, 6),) for _ in range(blocks)]

    def summed(bounds):
        parts = []
        for start, end in zip(bounds, bounds[1:]):
            tree = _BlockTree()
            for block in range(start, end):
                tree.add(block, values[block])
            parts.append(tree.nodes())
        return _BlockTree.combine(parts, blocks=blocks)[0]

    one = summed([0, blocks])
    assert one == pytest.approx(np.sum([v[0] for v in values], axis=0), rel=1e-9, abs=1e-12)
    for first in range(blocks + 1):
        for second in range(first, blocks + 1):
            assert summed([0, first, second, blocks]).tobytes() == one.tobytes()


def test_score_fusion_drives_the_filter_and_is_recorded(demo_train, tiny_model, tmp_path):
    """Pools mined with ``fuse_bm25``: every score is z(dense) + W z(BM25) of the whole rows, the filter compares
    those, and the pools name the fused scorer (so distillation may read them)."""
    data = small(demo_train, 6, 300)
    source = dense(str(tiny_model), show_progress=False)
    fusion = build_rescorer(fuse_bm25=0.5, source=source, show_progress=False)
    assert isinstance(fusion, ScoreFusion) and fusion.parts()[0] is source
    result = mine(data, source, depth=30, num_negatives=4, filter=TopKMarginPos(0.0), anchor="mean",
                  rescorer=fusion, output_dir=tmp_path)
    encoder = DualEncoder.load(str(tiny_model))
    fused = (_brute_force_z(encoder.encode_queries(list(data.queries.values()))
                            @ encoder.encode_documents(data.corpus.texts()).T)
             + 0.5 * _brute_force_z(np.stack([row for _, row in bm25().scores(data.corpus, data.queries)])))
    rows = {query_id: fused[i] for i, query_id in enumerate(data.queries)}
    for pool in result.pools:
        row = rows[pool.query_id]
        for item in pool.positives + pool.negatives:
            assert item.score == pytest.approx(row[data.corpus.position[item.doc_id]], abs=1e-4)
        anchor = np.mean([p.score for p in pool.positives])
        assert all(n.score <= anchor + 1e-6 for n in pool.negatives)
    assert any(pool.negatives for pool in result.pools)
    meta = json.loads((tmp_path / META_FILE).read_text())
    assert meta["settings"]["rescorer"].startswith("fused-z(1*dense:")


def test_rescored_scores_candidates_and_positives_in_one_call(demo_train, tiny_model):
    data = small(demo_train, 4, 300)

    class Counting:
        calls = 0

        def __init__(self, inner):
            self.inner = inner

        def score(self, corpus, queries, pairs):
            Counting.calls += 1
            return self.inner.score(corpus, queries, pairs)

    teacher = dense(str(tiny_model), show_progress=False)
    rescored = Rescored(bm25(show_progress=False), Counting(teacher))
    wanted = {q: sorted(data.relevant(q)) for q in data.queries}
    run, positives = rescored.search_and_score(data.corpus, data.queries, 10, wanted)
    assert Counting.calls == 1
    assert positives == teacher.score(data.corpus, data.queries, wanted)
    searched = bm25(show_progress=False).search(data.corpus, data.queries, 10)
    assert run == teacher.score(data.corpus, data.queries, {q: list(searched[q]) for q in data.queries})


def test_score_fusion_refuses_what_cannot_be_standardized(tiny_cross_encoder):
    with pytest.raises(HardnegError, match="cannot standardise"):
        ScoreFusion([(CrossEncoderScorer(str(tiny_cross_encoder), show_progress=False), 1.0), (bm25(), 0.3)])
    with pytest.raises(HardnegError, match="one dense model"):
        build_rescorer(fuse_bm25=0.3, source=bm25())


def test_nprobe_needs_an_ivf_index():
    with pytest.raises(HardnegError, match="IVF"):
        check_source_settings(["some-model"], index="HNSW32", nprobe=4)
    check_source_settings(["some-model"], index="IVF64,Flat", nprobe=4)


def test_build_source_fuses_several_specs(tiny_model):
    assert isinstance(build_source(["bm25"]), BM25Retriever)
    assert build_source(["bm25:rank-bm25"]).backend == "rank-bm25"
    fused = build_source(["bm25", str(tiny_model)], index="HNSW32", rrf_k=10, show_progress=False)
    assert isinstance(fused, Hybrid) and fused.k == 10
    assert fused.sources[1].index_spec == "HNSW32"


@pytest.mark.parametrize("preset, expected", [(None, "cpu"), ("cuda", "cuda")])
def test_bm25_keeps_jax_off_the_gpu_unless_asked(preset, expected):
    """bm25s runs a JAX top-k at import; on a GPU that would take 75 % of its memory before training starts."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | ({"JAX_PLATFORMS": preset} if preset else {})
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    code = "import retriever.bm25, os; print(os.environ['JAX_PLATFORMS'])"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == expected
