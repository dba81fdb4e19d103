"""Exports: lossless pools round trip, text resolution checked pair by pair, and a real ST trainer step."""

from __future__ import annotations

import json

import pytest

from mining.export import (
    dataset_to_pools,
    export_pools,
    pools_to_dataset,
    pools_to_ntuples,
    pools_to_triplets,
    save_dataset,
)
from retriever.data import Candidate, Corpus, Pool
from retriever.io import HardnegError


@pytest.fixture
def corpus() -> Corpus:
    ids = [f"d{i}" for i in range(8)]
    return Corpus(ids=ids, titles=["T" if i % 2 else "" for i in range(8)], bodies=[f"body {i}" for i in range(8)])


@pytest.fixture
def pools() -> list[Pool]:
    return [
        Pool("q1", "first query", [Candidate("d0", 0.9), Candidate("d1", 0.7)],
             [Candidate("d2", 0.6, 3, "dense"), Candidate("d3", -0.2, 5, "dense"), Candidate("d4", -0.3, 9, "dense")]),
        Pool("q2", "second query", [Candidate("d5", None)], [Candidate("d6", None, 1, "bm25")]),
        Pool("q3", "third query", [Candidate("d7", 1.5)], []),
    ]


def test_pools_round_trip_through_dataset_and_parquet(pools, tmp_path):
    assert dataset_to_pools(pools_to_dataset(pools)) == pools
    import datasets

    path = save_dataset(pools_to_dataset(pools), tmp_path / "pools.parquet")
    assert dataset_to_pools(datasets.load_dataset("parquet", data_files=str(path), split="train")) == pools
    folder = save_dataset(pools_to_dataset(pools), tmp_path / "pools-hf")
    assert dataset_to_pools(datasets.load_from_disk(str(folder))) == pools
    save_dataset(pools_to_dataset(pools[:1]), folder)  # overwriting a folder replaces it whole
    assert dataset_to_pools(datasets.load_from_disk(str(folder))) == pools[:1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pools-hf", "pools.parquet"]  # no staging left behind


def test_triplets_pair_every_positive_with_every_negative(pools, corpus):
    triplets = pools_to_triplets(pools, corpus)
    expected = [(pool.query, corpus.text_of(p.doc_id), corpus.text_of(n.doc_id))
                for pool in pools for p in pool.positives for n in pool.negatives]
    assert list(zip(triplets["anchor"], triplets["positive"], triplets["negative"])) == expected
    assert len(expected) == 2 * 3 + 1 * 1
    assert triplets.column_names == ["anchor", "positive", "negative"]
    assert len(pools_to_triplets(pools, corpus, max_positives=1)) == 3 + 1
    assert triplets["positive"][0] == "body 0" and triplets["negative"][0] == "body 2"
    assert triplets["positive"][3] == "T body 1"  # title and body joined, as hardneg's encoders see them


def test_ntuples_have_fixed_width_and_leave_short_queries_out(pools, corpus):
    ntuples, left_out = pools_to_ntuples(pools, corpus)
    assert ntuples.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
    assert left_out == 2 and len(ntuples) == 2
    assert ntuples[1] == {"anchor": "first query", "positive": "T body 1", "negative_1": "body 2",
                          "negative_2": "T body 3", "negative_3": "body 4"}
    one, left_out = pools_to_ntuples(pools, corpus, 1)
    assert len(one) == 3 and left_out == 1 and one.column_names == ["anchor", "positive", "negative_1"]


def test_bad_requests_are_refused(pools, corpus, tmp_path):
    with pytest.raises(HardnegError, match="not in the corpus"):
        pools_to_triplets([Pool("q", "x", [Candidate("nope", 1.0)], [Candidate("d1", 0.0)])], corpus)
    with pytest.raises(HardnegError, match="unknown export format"):
        export_pools(pools, corpus, tmp_path / "x", "csv")
    with pytest.raises(HardnegError, match="needs the corpus"):
        export_pools(pools, None, tmp_path / "x", "triplets")
    with pytest.raises(HardnegError, match="num_negatives"):
        pools_to_ntuples(pools, corpus, 0)
    with pytest.raises(HardnegError, match="no pool has a negative"):
        pools_to_ntuples(pools[2:], corpus)
    with pytest.raises(HardnegError, match="missing column"):
        dataset_to_pools(pools_to_triplets(pools, corpus))
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_export_pools_summary(pools, corpus, tmp_path):
    result = export_pools(pools, corpus, tmp_path / "nt.parquet", "ntuples", num_negatives=1)
    assert (result.rows, result.queries, result.queries_left_out) == (3, 3, 1)
    assert "1 queries left out" in result.summary()


def test_sentence_transformers_loss_consumes_a_batch(pools, corpus, tiny_model):
    """A real sentence-transformers model and MultipleNegativesRankingLoss on a batch of each export, fed the
    way SentenceTransformerTrainer feeds it (one tokenized feature dict per text column, in column order)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    torch.manual_seed(0)
    transformer = Transformer(str(tiny_model), max_seq_length=32)
    model = SentenceTransformer(modules=[transformer, Pooling(transformer.get_embedding_dimension())], device="cpu")
    loss = MultipleNegativesRankingLoss(model)
    for dataset in (pools_to_triplets(pools, corpus), pools_to_ntuples(pools, corpus, 2)[0]):
        batch = dataset[:4]
        features = [model.tokenize(batch[column]) for column in dataset.column_names]
        model.zero_grad()
        value = loss(features, None)
        value.backward()
        assert value.ndim == 0 and torch.isfinite(value)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_cli_export_writes_each_format_and_refuses_without_a_corpus(tmp_path, demo_train, capsys):
    import datasets

    from hardneg.cli import main
    from mining.filters import TopK
    from mining.mine import mine
    from retriever.data import read_pools

    mine(demo_train, "bm25", depth=10, num_negatives=2, filter=TopK(), output_dir=tmp_path / "pools")
    pools = read_pools(tmp_path / "pools" / "pools.jsonl")
    assert main(["--quiet", "export", "--pools", str(tmp_path / "pools"), "--output", str(tmp_path / "p.parquet")]) == 0
    assert dataset_to_pools(datasets.load_dataset("parquet", data_files=str(tmp_path / "p.parquet"),
                                                  split="train")) == pools
    assert main(["--quiet", "export", "--pools", str(tmp_path / "pools"), "--format", "triplets", "--data",
                 "nfcorpus-demo", "--max-positives", "1", "--output", str(tmp_path / "t")]) == 0
    triplets = datasets.load_from_disk(str(tmp_path / "t"))
    assert len(triplets) == sum(len(p.negatives) for p in pools)
    assert triplets[0]["anchor"] == pools[0].query
    assert triplets[0]["negative"] == demo_train.corpus.text_of(pools[0].negatives[0].doc_id)
    capsys.readouterr()
    assert main(["--quiet", "export", "--pools", str(tmp_path / "pools"), "--format", "ntuples",
                 "--output", str(tmp_path / "n")]) == 2
    assert "needs the corpus" in capsys.readouterr().err and not (tmp_path / "n").exists()


def test_the_output_suffix_picks_the_container_and_train_reads_an_export_back(tmp_path, demo_train, tiny_model,
                                                                              capsys):
    import datasets
    from conftest import small

    from hardneg.cli import main
    from mining.export import load_pools
    from mining.filters import TopK
    from mining.mine import mine
    from retriever.data import read_pools

    data = small(demo_train, queries=24)
    mine(data, "bm25", depth=10, num_negatives=2, filter=TopK(), output_dir=tmp_path / "pools", show_progress=False)
    pools_jsonl = tmp_path / "pools" / "pools.jsonl"
    pools = read_pools(pools_jsonl)
    export = ["--quiet", "export", "--pools", str(tmp_path / "pools")]
    assert main([*export, "--output", str(tmp_path / "copy.jsonl")]) == 0  # pools.jsonl itself, not a folder
    assert (tmp_path / "copy.jsonl").read_bytes() == pools_jsonl.read_bytes()
    triplet_export = [*export, "--format", "triplets", "--data", "nfcorpus-demo"]
    assert main([*triplet_export, "--output", str(tmp_path / "t.jsonl")]) == 0
    triplets = datasets.load_dataset("json", data_files=str(tmp_path / "t.jsonl"), split="train")
    assert triplets.column_names == ["anchor", "positive", "negative"] and len(triplets) > 0
    capsys.readouterr()
    assert main([*export, "--output", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write '.csv' files" in err and ".parquet" in err
    assert not (tmp_path / "x.csv").exists()

    assert main([*export, "--output", str(tmp_path / "folder")]) == 0
    assert main([*export, "--output", str(tmp_path / "p.parquet")]) == 0
    assert load_pools(tmp_path / "folder", data.corpus) == pools == load_pools(tmp_path / "p.parquet", data.corpus)
    train = ["--quiet", "train", "--data", "nfcorpus-demo", "--model", str(tiny_model), "--epochs", "1",
             "--train-batch-size", "8", "--max-length", "32"]
    assert main([*train, "--pools", str(tmp_path / "folder"), "--output", str(tmp_path / "run")]) == 0
    recorded = json.loads((tmp_path / "run" / "training_config.json").read_text())["input_checksums"]
    assert any(name.endswith(".arrow") for name in recorded)
    assert main([*train, "--pools", str(tmp_path / "p.parquet"), "--output", str(tmp_path / "run2")]) == 0
    capsys.readouterr()
    # an export records no scorer: distilling its scores is allowed, and said
    assert main([*train[1:], "--pools", str(tmp_path / "p.parquet"), "--distill-weight", "1",
                 "--output", str(tmp_path / "run5")]) == 0
    assert "does not record what scored its pools" in capsys.readouterr().err
    assert main([*train, "--pools", str(tmp_path / "t.jsonl"), "--output", str(tmp_path / "run3")]) == 2
    assert main([*triplet_export, "--output", str(tmp_path / "tf")]) == 0
    assert main([*train, "--pools", str(tmp_path / "tf"), "--output", str(tmp_path / "run4")]) == 2
    assert "holds texts, not document ids" in capsys.readouterr().err and not (tmp_path / "run4").exists()
