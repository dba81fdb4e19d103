"""The row-range embedding cache and the chunked exact search, against brute force (in one process)."""

from __future__ import annotations

import numpy as np
import pytest

from retriever.data import Corpus
from retriever.embedding_cache import (
    BLOCK_MIN,
    EmbeddingCache,
    Rows,
    block_size,
    collect,
    encode_in_blocks,
    exact_top_k,
    shard_rows,
)


def _corpus(n: int) -> Corpus:
    return Corpus([f"d{i}" for i in range(n)], [""] * n, [f"text {i}" for i in range(n)])


def _embed(texts: list[str]) -> np.ndarray:
    """Row i of a fixed random matrix for text ``"text i"``, whatever the batch it comes in."""
    rows = [int(text.split()[1]) for text in texts]
    return np.stack([np.random.default_rng(row).standard_normal(8).astype(np.float32) for row in rows])


@pytest.mark.parametrize("total", [1, 1023, 1024, 1025, 5000, 300_000, 40_000_000])
def test_shards_are_whole_blocks_that_cover_the_rows_once(total):
    size = block_size(total)
    assert size >= BLOCK_MIN
    for world in (1, 2, 3, 8):
        ranges = [shard_rows(total, rank, world) for rank in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        for (_, end), (start, _) in zip(ranges, ranges[1:]):
            assert end == start  # contiguous, in rank order
        for start, end in ranges:
            assert start % size == 0 or start == total
            assert end % size == 0 or end == total
        sizes = [end - start for start, end in ranges]
        assert max(sizes) - min(sizes) < 2 * size  # balanced to a block (and the short last one)


def test_exact_top_k_over_chunks_and_pieces_is_brute_force_with_ties_in_position_order():
    rng = np.random.default_rng(0)
    documents = rng.standard_normal((1000, 16)).astype(np.float32)
    documents[900:950] = documents[10:60]  # equal scores far apart: the lower position must win
    queries = rng.standard_normal((30, 16)).astype(np.float32)
    pieces = [Rows(0, documents[:333]), Rows(333, documents[333:700]), Rows(700, documents[700:])]
    scores, positions = exact_top_k(pieces, queries, 120, chunk_rows=64)
    full = queries @ documents.T
    for row in range(len(queries)):
        order = sorted(range(len(documents)), key=lambda i: (-full[row, i], i))[:120]
        assert positions[row].tolist() == order
        np.testing.assert_allclose(scores[row], full[row, order], rtol=1e-5, atol=1e-5)
    deep_scores, deep_positions = exact_top_k(pieces, queries, 5000)  # deeper than the corpus: all of it
    assert deep_positions.shape == (30, 1000) and (deep_positions >= 0).all()


def test_entries_from_any_world_size_cover_a_later_run_and_only_gaps_are_encoded(tmp_path):
    corpus = _corpus(3000)
    cache = EmbeddingCache(tmp_path / "key.npy", corpus, {"model": "test"})
    expected = _embed(corpus.texts())
    for rank in range(3):  # what three ranks write
        start, end = shard_rows(len(corpus), rank, 3)
        cache.write(start, end, encode_in_blocks(_embed, corpus.text, len(corpus), start, end))
    pieces, gaps = cache.rows(0, len(corpus))  # one process reads them all
    assert gaps == []
    assert np.array_equal(np.concatenate([p.array for p in pieces]), expected)
    start, end = shard_rows(len(corpus), 1, 2)  # the second of two ranks: parts of two entries
    pieces, gaps = cache.rows(start, end)
    assert gaps == [] and pieces[0].start == start and pieces[-1].end == end
    assert np.array_equal(np.concatenate([p.array for p in pieces]), expected[start:end])

    middle = shard_rows(len(corpus), 1, 3)
    (tmp_path / f"key.rows-{middle[0]}-{middle[1]}.npy").unlink()  # a rank that never finished
    pieces, gaps = cache.rows(0, len(corpus))
    assert gaps == [middle]
    last = shard_rows(len(corpus), 2, 3)
    path = tmp_path / f"key.rows-{last[0]}-{last[1]}.npy"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="not usable: its checksum"):
        pieces, gaps = cache.rows(0, len(corpus))
    assert gaps == [(middle[0], len(corpus))]  # a damaged entry is a gap, never embeddings
    assert [p.start for p in pieces] == [0]


def test_blocks_must_be_whole():
    corpus = _corpus(3000)
    with pytest.raises(ValueError, match="not whole encoding blocks"):
        list(encode_in_blocks(_embed, corpus.text, len(corpus), 5, 1024))


def test_collect_fills_one_array_in_order_and_refuses_a_short_range():
    chunks = [np.full((n, 4), i, dtype=np.float32) for i, n in enumerate([3, 1, 2])]
    rows = collect(10, 16, iter(chunks))
    assert rows.start == 10
    np.testing.assert_array_equal(rows.array, np.concatenate(chunks))
    with pytest.raises(RuntimeError, match="5 rows encoded for range 10-16"):
        collect(10, 16, iter(chunks[:1] + chunks[2:]))
