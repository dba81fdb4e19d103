"""Training on several datasets: ids kept apart, every batch from one dataset, random negatives from the
query's own corpus, and the CLI's --pools/--data pairs end to end."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest
from conftest import SHARED_DATA
from conftest import small as _small

from hardneg.cli import main
from mining.mine import mine
from retriever.data import load_beir
from retriever.io import HardnegError
from retriever.mixture import SEPARATOR, group_document_ids, mix
from retriever.train import MODEL_DIR, TRAIN_CONFIG, TRAIN_LOG, TrainConfig, batches_per_epoch, epoch_batches, train

MSMARCO_SAMPLE = SHARED_DATA / "msmarco" / "beir-sample"


@pytest.fixture(scope="module")
def two(demo_train):
    if not MSMARCO_SAMPLE.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    nfcorpus = _small(demo_train, queries=30, documents=200)
    msmarco = _small(load_beir(MSMARCO_SAMPLE, "test"), queries=20, documents=200)
    parts = {name: (mine(data, "bm25", depth=20, num_negatives=3, show_progress=False).pools, data.corpus)
             for name, data in (("nfcorpus", nfcorpus), ("msmarco", msmarco))}
    return parts


def _config(**changes) -> TrainConfig:
    base = TrainConfig(model="unused", epochs=2, batch_size=8, positives_per_query=1, negatives_per_query=2, seed=3)
    return replace(base, **changes)


def test_mix_keeps_the_ids_of_two_datasets_apart_and_the_texts_as_they_were(two):
    pools, corpus, groups = mix(two)
    assert len(corpus) == sum(len(c) for _, c in two.values()) and len(set(corpus.ids)) == len(corpus)
    assert Counter(groups) == {name: len(p) for name, (p, _) in two.items()}
    for pool, group in zip(pools, groups):
        original_pools, original_corpus = two[group]
        name, query_id = pool.query_id.split(SEPARATOR, 1)
        original = next(p for p in original_pools if p.query_id == query_id)
        assert name == group and pool.query == original.query
        for mixed, plain in zip(pool.positives + pool.negatives, original.positives + original.negatives):
            assert mixed.doc_id == f"{group}{SEPARATOR}{plain.doc_id}" and mixed.score == plain.score
            assert corpus.text_of(mixed.doc_id) == original_corpus.text_of(plain.doc_id)
    single = {"nfcorpus": two["nfcorpus"]}
    assert mix(single)[0] is two["nfcorpus"][0]  # one dataset: nothing renamed
    with pytest.raises(HardnegError, match="free of"):
        mix({"a::b": two["nfcorpus"], "c": two["msmarco"]})


def test_every_batch_comes_from_one_dataset_and_random_negatives_from_its_corpus(two):
    pools, corpus, groups = mix(two)
    config = _config(random_negatives=2)
    by_group = group_document_ids(corpus, groups)
    group_of = {pool.query_id: group for pool, group in zip(pools, groups)}
    for epoch in (0, 1):
        batches = epoch_batches(pools, config, epoch, by_group, groups)
        assert len(batches) == batches_per_epoch(len(pools), config.batch_size, groups)
        assert sorted(e.query_id for b in batches for e in b) == sorted(p.query_id for p in pools)  # each once
        for batch in batches:
            (group,) = {group_of[e.query_id] for e in batch}
            for example in batch:
                assert all(d.startswith(group + SEPARATOR) for d in example.positives + example.negatives)
        assert batches == epoch_batches(pools, config, epoch, by_group, groups)  # seeded: resume is exact
    first = [[e.query_id for e in b] for b in epoch_batches(pools, config, 0, by_group, groups)]
    second = [[e.query_id for e in b] for b in epoch_batches(pools, config, 1, by_group, groups)]
    assert first != second
    plain = two["nfcorpus"][0]  # one group gives exactly the batches of no groups
    assert epoch_batches(plain, _config(), 0, None, ["nfcorpus"] * len(plain)) == epoch_batches(plain, _config(), 0)


def test_train_on_two_datasets_batches_by_dataset(two, tiny_model, tmp_path):
    pools, corpus, groups = mix(two)
    config = _config(model=str(tiny_model), max_length=32, learning_rate=1e-3)
    summary = train(pools, corpus, config, tmp_path / "run", show_progress=False, groups=groups).summary
    assert summary["steps"] == 2 * batches_per_epoch(len(pools), 8, groups)
    assert summary["datasets"] == {"nfcorpus": len(two["nfcorpus"][0]), "msmarco": len(two["msmarco"][0])}
    with pytest.raises(HardnegError, match="re-mining"):
        train(pools, corpus, replace(config, epochs=2, remine_every=1), tmp_path / "x", show_progress=False,
              groups=groups, remine=lambda model, r: pools)


def test_the_cli_trains_on_pools_and_data_pairs_and_the_card_names_both(demo_train, tiny_model, tmp_path, capsys):
    if not MSMARCO_SAMPLE.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    mine(_small(demo_train, queries=30), "bm25", depth=20, num_negatives=3, output_dir=tmp_path / "a",
         show_progress=False)
    mine(_small(load_beir(MSMARCO_SAMPLE, "test"), queries=20), "bm25", depth=20, num_negatives=3,
         output_dir=tmp_path / "b", show_progress=False)
    common = ["train", "--model", str(tiny_model), "--epochs", "2", "--train-batch-size", "8", "--max-length", "32"]
    pairs = ["--pools", str(tmp_path / "a"), "--data", "nfcorpus-demo", "--pools", str(tmp_path / "b"),
             "--data", str(MSMARCO_SAMPLE)]
    assert main([*common, *pairs, "--dev-fraction", "0.2", "--output", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "training on nfcorpus-demo (24 queries), beir-sample (16 queries); each batch from one dataset" in err
    record = json.loads((tmp_path / "run" / TRAIN_CONFIG).read_text())
    assert record["summary"]["datasets"] == {"nfcorpus-demo": 24, "beir-sample": 16}
    assert record["summary"]["dev_metric"] == "mean nDCG@10"
    assert [m["dataset"] for m in record["mining"]] == ["nfcorpus-demo", "beir-sample"]
    log = [json.loads(line) for line in (tmp_path / "run" / TRAIN_LOG).read_text().splitlines()]
    assert sum("dev" in r for r in log) == 2
    card = (tmp_path / "run" / MODEL_DIR / "README.md").read_text()
    assert "- **nfcorpus-demo**" in card and "- **beir-sample**" in card and "each batch drawn from one" in card
    assert main([*common, "--pools", str(tmp_path / "a"), "--pools", str(tmp_path / "b"), "--data",
                 "nfcorpus-demo", "--output", str(tmp_path / "bad")]) == 2
    assert "one --data per --pools" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*common, *pairs, "--remine-every", "1", "--output", str(tmp_path / "bad")]) == 2
    assert "re-mines one dataset" in capsys.readouterr().err
