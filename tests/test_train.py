"""Training: the loss equals a direct implementation, positives are never negatives, runs are reproducible."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from mining.mine import mine
from retriever.data import Dataset
from retriever.encoder import DualEncoder
from retriever.io import HardnegError
from retriever.losses import false_negative_mask, info_nce
from retriever.train import TRAIN_CONFIG, TRAIN_LOG, Example, TrainConfig, batch_tensors, epoch_examples, train


def test_info_nce_equals_a_loop_implementation():
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    docs = torch.nn.functional.normalize(torch.randn(10, 8), dim=-1)
    labels = torch.tensor([0, 1, 2, 3])
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[0, 5] = mask[2, 1] = mask[3, 9] = True
    expected = 0.0
    for i in range(4):
        logits = [float(queries[i] @ docs[j]) / 0.05 for j in range(10) if not mask[i, j]]
        positive = float(queries[i] @ docs[labels[i]]) / 0.05
        expected += -(positive - math.log(sum(math.exp(x) for x in logits)))
    assert info_nce(queries, docs, labels, mask, 0.05).item() == pytest.approx(expected / 4, rel=1e-5)


def test_labelled_positives_are_never_negatives():
    batch = [Example("q0", "d1", ["d2", "d9"], {"d1", "d3"}),
             Example("q1", "d3", ["d1"], {"d3"}),
             Example("q2", "d1", ["d4"], {"d1"})]  # the same document twice in the batch
    _, doc_ids, labels, mask = batch_tensors(batch)
    assert doc_ids == ["d1", "d3", "d1", "d2", "d9", "d1", "d4"]
    expected = torch.zeros(3, 7, dtype=torch.bool)
    for i, example in enumerate(batch):
        for j, doc_id in enumerate(doc_ids):
            expected[i, j] = j != labels[i] and doc_id in example.positive_ids
    assert torch.equal(mask, expected)
    assert mask[0, 1] and mask[0, 2] and mask[0, 5]  # d3 (its other positive) and both copies of d1
    assert not mask[1, 0] and mask[2, 0]
    assert torch.equal(mask, false_negative_mask([e.positive_ids for e in batch], doc_ids, labels.tolist()))


def test_epochs_are_seeded_and_differ(demo_train):
    pools = mine(_small(demo_train), "bm25", depth=20, num_negatives=4).pools
    config = TrainConfig(positives_per_query=2, negatives_per_query=2, seed=3)
    first, again = epoch_examples(pools, config, 0), epoch_examples(pools, config, 0)
    assert [(e.query, e.positive, e.negatives) for e in first] == [(e.query, e.positive, e.negatives) for e in again]
    assert [e.positive for e in first] != [e.positive for e in epoch_examples(pools, config, 1)]
    assert len(first) == sum(min(2, len(p.positives)) for p in pools)
    for example in first:
        assert example.positive in example.positive_ids and not set(example.negatives) & example.positive_ids


def _small(dataset: Dataset, queries: int = 24) -> Dataset:
    keep = sorted(dataset.qrels)[:queries]
    return replace(dataset, qrels={q: dataset.qrels[q] for q in keep}, queries={q: dataset.queries[q] for q in keep})


def test_training_learns_saves_and_is_reproducible(demo_train, tiny_model, tmp_path):
    data = _small(demo_train)
    pools = mine(data, "bm25", depth=20, num_negatives=4).pools
    config = TrainConfig(model=str(tiny_model), epochs=6, batch_size=8, learning_rate=2e-3, warmup_ratio=0.1,
                         positives_per_query=2, negatives_per_query=2, max_length=64, seed=1)
    summary = train(pools, data.corpus, config, tmp_path / "a", show_progress=False)
    log = [json.loads(line) for line in (tmp_path / "a" / TRAIN_LOG).read_text().splitlines()]
    assert len(log) == summary["steps"] == 6 * math.ceil(48 / 8)
    first_epoch = np.mean([r["loss"] for r in log if r["epoch"] == 0])
    last_epoch = np.mean([r["loss"] for r in log if r["epoch"] == 5])
    assert last_epoch < first_epoch * 0.9, (first_epoch, last_epoch)
    assert log[0]["lr"] < max(r["lr"] for r in log)  # warm-up
    saved = json.loads((tmp_path / "a" / TRAIN_CONFIG).read_text())
    assert saved["config"]["seed"] == 1 and saved["library_versions"]["torch"]
    SentenceTransformer(str(tmp_path / "a"), device="cpu")  # loads

    train(pools, data.corpus, config, tmp_path / "b", show_progress=False)
    texts = [data.corpus.text(i) for i in range(20)]
    a = DualEncoder.load(tmp_path / "a").encode(texts)
    b = DualEncoder.load(tmp_path / "b").encode(texts)
    assert np.array_equal(a, b)
    assert not np.allclose(a, DualEncoder.load(tiny_model, max_length=64).encode(texts), atol=1e-3)


@pytest.mark.parametrize("field, value", [("batch_size", 0), ("learning_rate", -1.0), ("warmup_ratio", 1.5),
                                          ("negatives_per_query", -1), ("temperature", 0.0)])
def test_invalid_settings_are_refused(field, value):
    with pytest.raises(HardnegError, match=field):
        replace(TrainConfig(), **{field: value}).check()


def test_pools_must_match_the_corpus(demo_train, demo_test, tmp_path):
    pools = mine(_small(demo_train, 4), "bm25", depth=10, num_negatives=2).pools
    other = replace(demo_test.corpus, ids=demo_test.corpus.ids[:5], titles=demo_test.corpus.titles[:5],
                    bodies=demo_test.corpus.bodies[:5])
    with pytest.raises(HardnegError, match="not in the corpus"):
        train(pools, other, TrainConfig(), tmp_path / "m", show_progress=False)
    assert not (tmp_path / "m").exists()
