"""Mining: labelled positives never come out as negatives, filters see the right scores, output is reproducible."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np
import pytest
from conftest import small

from mining.filters import TopK, TopKPercPos
from mining.mine import META_FILE, POOLS_FILE, mine
from retriever.bm25 import BM25Retriever
from retriever.data import read_pools
from retriever.io import HardnegError


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
    result = mine(small(demo_train, 10, 300), str(tiny_model), depth=20, num_negatives=3)
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


# ---------------------------------------------------------------------------------------- scale: cache, shards


class CountingEncoder(HashingEncoder):
    """The hashing encoder, declaring a cache identity and counting how many documents it encoded."""

    cache_identity = {"model": "hashing-64"}

    def __init__(self):
        self.documents_encoded = 0

    def encode_documents(self, texts):
        self.documents_encoded += len(texts)
        return super().encode_documents(texts)


def test_embedding_cache_hit_skips_encoding_and_gives_identical_pools(demo_train, tmp_path):
    from retriever.dense import DenseRetriever

    data = small(demo_train, 15)
    first, second = CountingEncoder(), CountingEncoder()
    for name, encoder in (("a", first), ("b", second)):
        mine(data, DenseRetriever(encoder, cache_dir=tmp_path / "cache", show_progress=False), depth=20,
             num_negatives=3, output_dir=tmp_path / name)
    assert first.documents_encoded == len(data.corpus)
    assert second.documents_encoded == 0  # the corpus came from the cache
    assert (tmp_path / "a" / POOLS_FILE).read_bytes() == (tmp_path / "b" / POOLS_FILE).read_bytes()
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    # Another corpus (one document dropped) is another key: encoded again, never a stale hit.
    corpus = data.corpus
    other = replace(data, corpus=type(corpus)(corpus.ids[:-1], corpus.titles[:-1], corpus.bodies[:-1]))
    third = CountingEncoder()
    DenseRetriever(third, cache_dir=tmp_path / "cache", show_progress=False).corpus_embeddings(other.corpus)
    assert third.documents_encoded == len(corpus) - 1
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "sidecar", "other-corpus"])
def test_a_damaged_cache_entry_is_encoded_again_never_used(demo_train, tmp_path, damage):
    """A truncated, edited, half-written or mismatched entry is rebuilt with a warning, never read as embeddings."""
    import json

    from retriever.dense import DenseRetriever, corpus_fingerprint

    data = small(demo_train, 10, 50)
    reference = DenseRetriever(CountingEncoder(), cache_dir=tmp_path, show_progress=False)
    expected = np.array(reference.corpus_embeddings(data.corpus))
    path = reference.cache_path(data.corpus)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[-1] ^= 0xFF
        path.write_bytes(bytes(raw))
    elif damage == "sidecar":
        path.with_suffix(".json").unlink()
    else:
        record = json.loads(path.with_suffix(".json").read_text())
        path.with_suffix(".json").write_text(json.dumps(record | {"corpus_sha256": "0" * 64}))
    encoder = CountingEncoder()
    again = DenseRetriever(encoder, cache_dir=tmp_path, show_progress=False)
    with pytest.warns(UserWarning, match="embedding cache entry .* is not usable"):
        rebuilt = again.corpus_embeddings(data.corpus)
    assert encoder.documents_encoded == len(data.corpus) and again.cache_hits == 0
    assert np.array_equal(rebuilt, expected)
    fresh = DenseRetriever(CountingEncoder(), cache_dir=tmp_path, show_progress=False)  # the rebuilt entry is good
    assert np.array_equal(fresh.corpus_embeddings(data.corpus), expected) and fresh.cache_hits == 1
    assert json.loads(path.with_suffix(".json").read_text())["corpus_sha256"] == corpus_fingerprint(data.corpus)


def test_cache_key_follows_model_and_encoding_options(demo_train, tiny_model, tmp_path):
    from retriever.dense import DenseRetriever
    from retriever.encoder import DualEncoder

    corpus = demo_train.corpus
    paths = {DenseRetriever(DualEncoder.load(str(tiny_model), max_length=length), cache_dir=tmp_path)
             .cache_path(corpus) for length in (32, 32, 64)}
    assert len(paths) == 2
    assert DenseRetriever(HashingEncoder(), cache_dir=tmp_path).cache_path(corpus) is None  # unknown identity


class FailingBM25(BM25Retriever):
    """BM25 that fails on its ``fail_at``-th search call: a crash in the middle of a mining run."""

    def __init__(self, fail_at=None):
        super().__init__(show_progress=False)
        self.fail_at, self.calls = fail_at, 0

    def search_and_score(self, corpus, queries, top_k, pairs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return super().search_and_score(corpus, queries, top_k, pairs)


def test_interrupted_mining_resumes_and_gives_the_same_bytes(demo_train, tmp_path):
    data = small(demo_train, 25)
    settings = {"depth": 30, "num_negatives": 4, "sampling": "random", "seed": 3, "shard_size": 10,
                "filter": TopKPercPos(0.95), "anchor": "mean"}
    mine(data, FailingBM25(), output_dir=tmp_path / "whole", **settings)
    with pytest.raises(RuntimeError, match="simulated"):
        mine(data, FailingBM25(fail_at=2), output_dir=tmp_path / "resumed", **settings)
    assert not (tmp_path / "resumed" / POOLS_FILE).exists()  # no half-written pools
    assert sorted(p.name for p in (tmp_path / "resumed" / ".pools-shards").glob("shard-*")) == \
        ["shard-00000.jsonl", "shard-00000.npz"]
    again = FailingBM25()
    result = mine(data, again, output_dir=tmp_path / "resumed", **settings)
    assert again.calls == 2  # shards 2 and 3 only; shard 1 was read back
    for name in (POOLS_FILE, "pools.scores.png"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()
    metas = [json.loads((tmp_path / name / META_FILE).read_text()) for name in ("whole", "resumed")]
    for meta in metas:
        meta.pop("seconds")
    assert metas[0] == metas[1]
    assert result.stats.queries == 25
    assert not (tmp_path / "resumed" / ".pools-shards").exists()


def test_shards_of_other_settings_are_not_reused(demo_train, tmp_path):
    data = small(demo_train, 12)
    with pytest.raises(RuntimeError):
        mine(data, FailingBM25(fail_at=2), output_dir=tmp_path, depth=20, num_negatives=3, shard_size=5)
    source = FailingBM25()
    mine(data, source, output_dir=tmp_path, depth=25, num_negatives=3, shard_size=5)  # depth changed
    assert source.calls == 3
    fresh = tmp_path / "fresh"
    mine(data, FailingBM25(), output_dir=fresh, depth=25, num_negatives=3, shard_size=5)
    assert (tmp_path / POOLS_FILE).read_bytes() == (fresh / POOLS_FILE).read_bytes()


def test_shard_size_does_not_change_the_pools(demo_train, tmp_path):
    data = small(demo_train, 20)
    for name, size in (("one", 1000), ("many", 3)):
        mine(data, "bm25", depth=30, num_negatives=4, shard_size=size, output_dir=tmp_path / name)
    assert (tmp_path / "one" / POOLS_FILE).read_bytes() == (tmp_path / "many" / POOLS_FILE).read_bytes()


def test_report_is_written_and_matches_the_counts(demo_train, tmp_path):
    data = small(demo_train, 20)
    result = mine(data, "bm25", depth=30, num_negatives=4, anchor="mean", output_dir=tmp_path)
    meta = json.loads((tmp_path / META_FILE).read_text())
    report = meta["report"]
    stages = report["candidates_by_stage"]
    assert stages["labelled-positive"] == result.stats.removed_positives
    assert stages["topk-percpos"] == result.stats.removed_by_filter
    assert stages["sampled"] == result.stats.kept_negatives == sum(len(p.negatives) for p in result.pools)
    assert sum(stages.values()) == result.stats.candidates
    assert (tmp_path / "pools.scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("extra, message", [
    (["--index", "IVF"], "unknown faiss index"),
    (["--retriever", "bm25", "--cross-encoder", "./missing-cross-encoder"], "does not exist"),
    (["--depth", "3", "--num-negatives", "5"], "depth"),
    (["--perc", "1.5"], "perc"),
    (["--retriever", "./no/such/model"], "does not exist"),
    (["--shard-size", "0"], "shard_size"),
])
def test_cli_refuses_bad_settings_before_work(extra, message, tmp_path, capsys):
    from hardneg.cli import main

    output = tmp_path / "pools"
    code = main(["--quiet", "mine", "--data", "nfcorpus-demo", "--output", str(output), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("hardneg: error:") and message in err and "\n" not in err
    assert not output.exists()


def test_cli_mines_with_a_fused_source_and_a_teacher(demo_train, tiny_model, tmp_path, capsys):
    from hardneg.cli import main

    data_dir = tmp_path / "data"
    (data_dir / "qrels").mkdir(parents=True)
    sub = small(demo_train, 4)
    keep = {d for q in sub.qrels for d in sub.qrels[q]} | set(sub.corpus.ids[:150])
    with open(data_dir / "corpus.jsonl", "w") as handle:
        for i, doc_id in enumerate(sub.corpus.ids):
            if doc_id in keep:
                handle.write(json.dumps({"_id": doc_id, "title": sub.corpus.titles[i], "text": sub.corpus.bodies[i]})
                             + "\n")
    with open(data_dir / "queries.jsonl", "w") as handle:
        for query_id, text in sub.queries.items():
            handle.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    with open(data_dir / "qrels" / "train.tsv", "w") as handle:
        handle.write("query-id\tcorpus-id\tscore\n")
        for query_id, row in sub.qrels.items():
            for doc_id, grade in row.items():
                handle.write(f"{query_id}\t{doc_id}\t{grade}\n")
    code = main(["--quiet", "mine", "--data", str(data_dir), "--retriever", "bm25", "--retriever", str(tiny_model),
                 "--index", "HNSW32", "--ef-search", "64", "--teacher", str(tiny_model), "--depth", "20",
                 "--num-negatives", "2", "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "out" / META_FILE).read_text())
    assert meta["settings"]["retriever"].startswith("hybrid-rrf(k=60):bm25")
    assert meta["settings"]["rescorer"].startswith("dense:")
    assert list((tmp_path / "cache").glob("*.npy"))


def test_anchor_fallback_fills_short_queries_with_what_the_looser_anchor_keeps(demo_train):
    """Brute force on the pools' own scores: with the fallback, a query keeps its strict survivors and is filled
    in rank order with candidates at or below perc x its mean positive; queries that were not short are unchanged."""
    strict = mine(demo_train, "bm25", depth=50, num_negatives=4, anchor="min", show_progress=False)
    filled = mine(demo_train, "bm25", depth=50, num_negatives=4, anchor="min", anchor_fallback="mean",
                  show_progress=False)
    before = {pool.query_id: pool for pool in strict.pools}
    changed = 0
    for pool in filled.pools:
        old = before[pool.query_id]
        ranks = [n.rank for n in pool.negatives]
        assert ranks == sorted(ranks) and len(ranks) <= 4
        if len(old.negatives) == 4:
            assert pool.negatives == old.negatives
            continue
        assert {n.doc_id for n in old.negatives} <= {n.doc_id for n in pool.negatives}
        if len(pool.negatives) > len(old.negatives):
            changed += 1
            mean = float(np.mean([p.score for p in pool.positives]))
            assert all(n.score <= 0.95 * mean + 1e-6 for n in pool.negatives)
    counts, strict_counts = filled.meta["counts"], strict.meta["counts"]
    assert changed == counts["queries_filled_by_anchor_fallback"] > 0
    assert counts["queries_with_hard_negatives"] > strict_counts["queries_with_hard_negatives"]
    assert "filled up by the mean anchor fallback" in filled.summary()
    with pytest.raises(HardnegError, match="anchor"):
        mine(demo_train, "bm25", anchor_fallback="median")


@pytest.mark.parametrize("anchor, fallback, filter, message", [
    ("max", "min", TopKPercPos(0.95), "'min' is stricter than anchor 'max' .*unset anchor_fallback"),
    ("mean", "min", TopKPercPos(0.95), "'min' is stricter than anchor 'mean' .*choose a looser one \\(max\\)"),
    ("mean", "mean", TopKPercPos(0.95), "'mean' is the anchor itself"),
    ("min", "mean", TopK(), "filter 'topk' compares with none"),
])
def test_an_anchor_fallback_that_could_never_fill_a_query_is_refused(demo_train, anchor, fallback, filter, message):
    """A filter keeps more the higher its anchor (min < mean < max): a fallback no looser than the anchor, or beside
    a filter that compares with no positive, ran and reported '0 filled up' instead of being refused."""
    with pytest.raises(HardnegError, match=message):
        mine(demo_train, "bm25", anchor=anchor, anchor_fallback=fallback, filter=filter, show_progress=False)
    from mining.settings import MineSettings

    with pytest.raises(HardnegError, match=message):
        MineSettings(anchor=anchor, anchor_fallback=fallback,
                     filter="topk" if isinstance(filter, TopK) else "topk-percpos").check()


def test_anchor_names_are_checked_up_front_and_a_looser_fallback_is_accepted():
    from mining.filters import check_anchor_fallback

    for anchor, fallback in (("", None), ("min", ""), ("", "mean")):
        with pytest.raises(HardnegError, match="unknown anchor ''"):
            check_anchor_fallback(anchor, fallback, TopKPercPos(0.95))
    check_anchor_fallback("mean", "max", TopKPercPos(0.95))
    check_anchor_fallback("min", None, TopK())


def test_the_strict_anchor_note_is_given_only_where_a_filter_compares_with_the_positives(demo_train):
    """Most queries come out short in both runs (depth = num_negatives, positives excluded); only TopK-PercPos
    compares with the lowest positive, so only its summary suggests a looser anchor."""
    plain = mine(demo_train, "bm25", depth=10, num_negatives=10, filter=TopK(), show_progress=False)
    anchored = mine(demo_train, "bm25", depth=10, num_negatives=10, filter=TopKPercPos(0.95), show_progress=False)
    assert plain.meta["counts"]["share_short_of_negatives"] > 0.5
    assert "very strict anchor" not in plain.summary() and "very strict anchor" in anchored.summary()

    @dataclass(frozen=True)
    class Mine:  # a filter of the user's own (the Filter protocol), which the summary cannot rebuild by name
        name = "mine"
        needs_anchor = True

        def keep(self, scores, anchor):
            return scores < 0.95 * anchor

    own = mine(demo_train, "bm25", depth=10, num_negatives=10, filter=Mine(), show_progress=False)
    assert "very strict anchor" in own.summary()
    # One positive per query (SciFact's shape): every anchor is that positive, so a looser one is no advice.
    single = replace(demo_train, qrels={q: dict([min(demo_train.relevant(q).items())]) for q in demo_train.qrels})
    one = mine(single, "bm25", depth=10, num_negatives=10, filter=TopKPercPos(0.95), show_progress=False)
    counts = one.meta["counts"]
    assert counts["share_short_of_negatives"] > 0.5
    assert counts["short_queries_with_one_positive"] == counts["queries_short_of_negatives"]
    assert "very strict anchor" not in one.summary() and "have a single positive" in one.summary()


def test_mine_takes_a_loaded_sentence_transformer_as_evaluate_does(demo_train, tiny_model, tmp_path):
    """The same object evaluate() accepts mines the same pools as the model's folder."""
    from sentence_transformers import SentenceTransformer

    from retriever.encoder import DualEncoder

    data = small(demo_train, queries=12, documents=150)
    DualEncoder.load(tiny_model, max_length=48).save(tmp_path / "st")
    by_path = mine(data, str(tmp_path / "st"), depth=20, num_negatives=4, filter=TopK()).pools
    loaded = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    by_object = mine(data, loaded, depth=20, num_negatives=4, filter=TopK()).pools
    assert [[n.doc_id for n in p.negatives] for p in by_object] == [[n.doc_id for n in p.negatives] for p in by_path]
    assert any(p.negatives for p in by_object)
