"""A teacher from precomputed embeddings: the table gives what the model gives (search, scores, the z-scores a
fusion adds), mining and in-batch distillation run on it, and a table that cannot serve the data is refused with
the file and the missing id before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import small

from hardneg.cli import main
from retriever.data import Corpus
from retriever.dense import DenseRetriever
from retriever.embedding_table import (
    EmbeddingTable,
    PrecomputedRetriever,
    encode_embedding_table,
    write_embedding_table,
)
from retriever.factory import as_retriever
from retriever.io import DataError, HardnegError

REPO = Path(__file__).resolve().parents[1]


def _table(folder: Path, documents: Corpus, queries: dict[str, str], dim: int = 4, seed: int = 0,
           **changes) -> Path:
    """A table of random vectors for ``documents`` and ``queries``; ``changes`` replace write_embedding_table's
    arguments."""
    rng = np.random.default_rng(seed)
    arguments = {"name": "random", "corpus_ids": documents.ids,
                 "corpus_vectors": rng.normal(size=(len(documents), dim)),
                 "query_ids": list(queries), "query_vectors": rng.normal(size=(len(queries), dim))} | changes
    return write_embedding_table(folder, **arguments)


def test_the_table_scores_as_the_model_it_was_computed_with(demo_train, tiny_model, tmp_path):
    data = small(demo_train, queries=20, documents=200)
    model = DenseRetriever(as_retriever(str(tiny_model), show_progress=False).encoder, show_progress=False)
    folder = encode_embedding_table(model, data.corpus, data.queries, tmp_path / "table", name="tiny")
    table = as_retriever(str(folder))
    assert isinstance(table, PrecomputedRetriever) and table.description == "embeddings:tiny"

    # search: the same documents in the same order, the same scores
    expected, got = model.search(data.corpus, data.queries, 10), table.search(data.corpus, data.queries, 10)
    assert got.keys() == expected.keys()
    for query_id in expected:
        assert list(got[query_id]) == list(expected[query_id])
        assert list(got[query_id].values()) == pytest.approx(list(expected[query_id].values()), abs=1e-6)
    # scores of chosen pairs, and their z-scores over the whole corpus (what score fusion adds) against a
    # brute-force standardisation of every document's score
    pairs = {query_id: sorted(data.relevant(query_id))[:3] + data.corpus.ids[:2] for query_id in data.queries}
    scored = table.score(data.corpus, data.queries, pairs)
    z = table.standardized_scores(data.corpus, data.queries, pairs)
    documents = model.corpus_embeddings(data.corpus).astype(np.float64)
    for i, query_id in enumerate(data.queries):
        everything = documents @ model.query_embeddings(data.queries)[i].astype(np.float64)
        for doc_id in pairs[query_id]:
            raw = everything[data.corpus.position[doc_id]]
            assert scored[query_id][doc_id] == pytest.approx(raw, abs=1e-5)
            assert z[query_id][doc_id] == pytest.approx((raw - everything.mean()) / everything.std(), abs=1e-4)
    # float16 storage: half the bytes, the same scores to about 1e-3 of their spread
    half = encode_embedding_table(model, data.corpus, data.queries, tmp_path / "half", name="tiny", dtype="float16")
    assert (half / "corpus.npy").stat().st_size < 0.6 * (folder / "corpus.npy").stat().st_size
    rough = as_retriever(str(half)).score(data.corpus, data.queries, pairs)
    spread = np.std([value for row in scored.values() for value in row.values()])
    for query_id, row in scored.items():
        assert list(rough[query_id].values()) == pytest.approx(list(row.values()), abs=1e-2 * spread)


def test_mining_and_in_batch_distillation_run_on_a_table(tiny_model, tmp_path, capsys):
    """`hardneg encode` writes the teacher's table once; `hardneg mine --teacher TABLE --fuse-bm25` gives the pools
    the model itself gives, and `hardneg train --distill-scope batch` rebuilds the table teacher from them."""
    teacher = tmp_path / "teacher"
    assert main(["--quiet", "encode", "--model", str(tiny_model), "--data", "nfcorpus-demo", "--split", "train",
                 "--max-length", "32", "--output", str(teacher)]) == 0, capsys.readouterr().err
    manifest = json.loads((teacher / "embeddings.json").read_text())
    assert manifest["corpus"]["count"] == 2000 and manifest["queries"]["count"] == 400
    mine = ["--quiet", "mine", "--data", "nfcorpus-demo", "--retriever", "bm25", "--fuse-bm25", "0.3",
            "--filter", "topk-marginpos", "--margin", "0", "--depth", "30", "--num-negatives", "3",
            "--max-length", "32", "--no-encode-cache"]
    assert main([*mine, "--teacher", str(teacher), "--output", str(tmp_path / "table-pools")]) == 0
    assert main([*mine, "--teacher", str(tiny_model), "--output", str(tmp_path / "model-pools")]) == 0
    from_table = [json.loads(line) for line in (tmp_path / "table-pools" / "pools.jsonl").open()]
    from_model = [json.loads(line) for line in (tmp_path / "model-pools" / "pools.jsonl").open()]
    assert [p["query_id"] for p in from_table] == [p["query_id"] for p in from_model]
    same = sum([n["doc_id"] for n in a["negatives"]] == [n["doc_id"] for n in b["negatives"]]
               for a, b in zip(from_table, from_model))
    assert same >= 0.98 * len(from_model)  # only near-ties (scores equal to float noise) may swap
    assert sum(bool(p["negatives"]) for p in from_model) >= 50  # not vacuous: about 110 of 400 keep negatives
    for a, b in zip(from_table, from_model):
        for x, y in zip(a["positives"], b["positives"]):
            assert x["doc_id"] == y["doc_id"] and x["score"] == pytest.approx(y["score"], abs=1e-4)
    meta = json.loads((tmp_path / "table-pools" / "pools.meta.json").read_text())
    assert "embeddings:" in meta["settings"]["rescorer"]

    assert main(["--quiet", "train", "--pools", str(tmp_path / "table-pools"), "--data", "nfcorpus-demo",
                 "--model", str(tiny_model), "--output", str(tmp_path / "run"), "--max-steps", "2",
                 "--batch-size", "8", "--max-length", "32", "--distill-weight", "1", "--distill-scope", "batch",
                 "--teacher-temperature", "1"]) == 0, capsys.readouterr().err
    trained = json.loads((tmp_path / "run" / "training_config.json").read_text())
    assert trained["summary"]["steps"] == 2  # the pools name the table as their teacher: training rebuilt it


def test_a_table_missing_a_query_or_document_is_refused_before_mining(demo_train, tmp_path):
    from mining.mine import mine
    from mining.sources import build_rescorer, build_source

    data = small(demo_train, queries=10, documents=50)
    some = dict(list(data.queries.items())[:5])
    folder = _table(tmp_path / "t", data.corpus, some)
    rescorer = build_rescorer(teacher=str(folder), show_progress=False)
    with pytest.raises(DataError, match=r"embeddings\.json: field 'queries': 5 of the 10 queries asked for have no "
                                        r"embedding \(first: "):
        mine(data, build_source(["bm25"], show_progress=False), rescorer=rescorer, output_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "pools.jsonl").exists()

    fewer = Corpus(data.corpus.ids[1:], data.corpus.titles[1:], data.corpus.bodies[1:])
    folder = _table(tmp_path / "u", fewer, data.queries)
    with pytest.raises(DataError, match=rf"field 'corpus': 1 of the {len(data.corpus)} documents asked for have no "
                                        rf"embedding \(first: '{data.corpus.ids[0]}'\)"):
        mine(data, build_source(["bm25"], show_progress=False), rescorer=build_rescorer(teacher=str(folder)))

    # text hashes tie each vector to its text: an edited document, or another dataset's query under the same id,
    # is refused; the same documents in another order, or a superset, are not
    texts = [data.corpus.text(i) for i in range(len(data.corpus))]
    folder = _table(tmp_path / "v", data.corpus, data.queries, corpus_texts=["changed"] + texts[1:],
                    query_texts=list(data.queries.values()))
    with pytest.raises(DataError, match=rf"field 'corpus': 1 of the {len(data.corpus)} documents asked for have "
                                        rf"other texts .* \(first: '{data.corpus.ids[0]}'\)"):
        PrecomputedRetriever(folder).check(data.corpus, data.queries)
    folder = _table(tmp_path / "w", data.corpus, data.queries, corpus_texts=texts,
                    query_texts=["another dataset's query"] + list(data.queries.values())[1:])
    with pytest.raises(DataError, match="field 'queries': 1 of the 10 queries asked for have other texts"):
        PrecomputedRetriever(folder).check(data.corpus, data.queries)
    order = list(reversed(range(len(data.corpus))))
    folder = _table(tmp_path / "x", Corpus([data.corpus.ids[i] for i in order], [data.corpus.titles[i] for i in order],
                                           [data.corpus.bodies[i] for i in order]),
                    data.queries, corpus_texts=[texts[i] for i in order], query_texts=list(data.queries.values()))
    table = PrecomputedRetriever(folder)
    table.check(data.corpus, data.queries)
    fewer = Corpus(data.corpus.ids[1:], data.corpus.titles[1:], data.corpus.bodies[1:])
    table.check(fewer, some)  # the table holds more than this data: fine
    vectors = np.load(folder / "corpus.npy")
    assert np.array_equal(table.corpus_embeddings(fewer), vectors[order][1:])  # gathered in the corpus's order


def test_a_folder_of_other_files_is_never_replaced(demo_train, tmp_path, capsys):
    data = small(demo_train, queries=5, documents=20)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("mine")
    with pytest.raises(HardnegError, match="exists and is not an embedding table"):
        _table(tmp_path / "out", data.corpus, data.queries)
    assert main(["--quiet", "encode", "--model", "nowhere/model", "--data", "nfcorpus-demo",
                 "--output", str(tmp_path / "out")]) == 2
    assert "exists and is not an embedding table" in capsys.readouterr().err
    assert (tmp_path / "out" / "precious.txt").read_text() == "mine"
    first = _table(tmp_path / "table", data.corpus, data.queries, seed=1)
    _table(first, data.corpus, data.queries, seed=2)  # a table is replaced by the new one
    assert np.load(first / "corpus.npy").shape == (len(data.corpus), 4)
    with pytest.raises(ValueError, match=r"queries: the vector of '\S+' \(row 0\) holds NaN or infinity"):
        _table(tmp_path / "nan", data.corpus, data.queries,
               query_vectors=np.vstack([[np.nan] * 4, np.ones((len(data.queries) - 1, 4))]))
    assert PrecomputedRetriever(first).query_embeddings({}).shape == (0, 4)


def test_bad_tables_are_refused_with_the_file_and_line(demo_train, tmp_path, capsys):
    from mining.settings import check_source_settings

    data = small(demo_train, queries=5, documents=20)
    folder = _table(tmp_path / "t", data.corpus, data.queries)
    ids = (folder / "corpus_ids.txt").read_text().splitlines()
    (folder / "corpus_ids.txt").write_text("\n".join(ids[:3] + [ids[1]] + ids[4:]) + "\n")
    with pytest.raises(HardnegError, match=rf"^teacher: \S+corpus_ids\.txt:4: id '{ids[1]}' repeats line 2$"):
        check_source_settings(["bm25"], teacher=str(folder))
    (folder / "corpus_ids.txt").write_text("\n".join(ids[:2] + [""] + ids[3:]) + "\n")
    with pytest.raises(DataError, match=r"corpus_ids\.txt:3: id '' is empty"):
        EmbeddingTable(folder)
    (folder / "corpus_ids.txt").write_text("\r\n".join(ids) + "\r\n")  # CRLF line ends are read
    assert EmbeddingTable(folder).ids["corpus"] == ids
    (folder / "corpus_ids.txt").write_text("\n".join(ids[:-1]) + "\n")
    with pytest.raises(DataError, match=rf"corpus_ids\.txt: {len(ids) - 1} ids for {len(ids)} rows"):
        EmbeddingTable(folder)
    manifest = json.loads((folder / "embeddings.json").read_text())
    (folder / "embeddings.json").write_text(json.dumps(manifest | {"version": 9}))
    with pytest.raises(DataError, match="field 'version'"):
        as_retriever(str(folder))
    (folder / "embeddings.json").write_text("{")
    with pytest.raises(DataError, match="embeddings.json: not readable JSON"):
        as_retriever(str(folder))
    with pytest.raises(ValueError, match="differ in dimension"):
        _table(tmp_path / "w", data.corpus, data.queries, query_vectors=np.zeros((len(data.queries), 3)))
    with pytest.raises(ValueError, match="id 'a b' contains SPACE"):
        _table(tmp_path / "w", data.corpus, data.queries, query_ids=["a b", *list(data.queries)[1:]])
    with pytest.raises(ValueError, match="ids repeat"):
        _table(tmp_path / "w", data.corpus, data.queries, corpus_ids=[data.corpus.ids[0]] * len(data.corpus))
    assert not (tmp_path / "w").exists()
    assert main(["--quiet", "encode", "--model", "bm25", "--data", "nfcorpus-demo", "--output",
                 str(tmp_path / "x")]) == 2
    assert "--model bm25: not a dense model" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_float16_tables_load_as_float32(demo_train, tmp_path):
    data = small(demo_train, queries=5, documents=20)
    folder = _table(tmp_path / "t", data.corpus, data.queries,
                    corpus_vectors=np.ones((len(data.corpus), 4), dtype=np.float16),
                    query_vectors=np.full((len(data.queries), 4), 0.5, dtype=np.float16))
    assert json.loads((folder / "embeddings.json").read_text())["corpus"]["dtype"] == "float16"
    scored = as_retriever(str(folder)).score(data.corpus, data.queries, {q: data.corpus.ids[:2] for q in data.queries})
    assert all(value == 2.0 for row in scored.values() for value in row.values())

