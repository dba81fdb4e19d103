"""Readers of corpora, queries, qrels and pools: formats users have, and errors that say where."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from retriever.data import (
    Candidate,
    Pool,
    load_beir,
    load_corpus,
    load_msmarco,
    load_qrels,
    load_queries,
    pools_scorer,
    read_pools,
    read_pools_meta,
    write_pools,
)
from retriever.io import DataError, atomic_write

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CORPUS = [
    {"_id": "d1", "title": "Vitamin D", "text": "Sunlight makes vitamin D."},
    {"_id": "d2", "title": "", "text": "No title here."},
    {"_id": "d3", "text": "Title key absent."},
    {"_id": "d4", "title": "Only a title", "text": ""},
]
QUERIES = [
    {"_id": "q1", "text": "vitamin d sunlight"},
    {"_id": "q2", "text": "untitled documents"},
    {"_id": "q3", "text": "a query without judgements"},
]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def make_beir(folder: Path, qrels_lines: list[str], *, newline: str = "\n", gz: bool = False,
              header: bool = True, split: str = "test") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(folder / "corpus.jsonl.gz", "wt", encoding="utf-8") as handle:
            handle.write(_jsonl(CORPUS))
    else:
        (folder / "corpus.jsonl").write_text(_jsonl(CORPUS), encoding="utf-8")
    (folder / "queries.jsonl").write_text(_jsonl(QUERIES), encoding="utf-8")
    (folder / "qrels").mkdir(exist_ok=True)
    lines = (["query-id\tcorpus-id\tscore"] if header else []) + qrels_lines
    (folder / "qrels" / f"{split}.tsv").write_bytes("".join(line + newline for line in lines).encode())
    return folder


GOOD_QRELS = ["q1\td1\t2", "q1\td2\t0", "q2\td2\t1", "q2\td4\t1"]


# ----------------------------------------------------------------------------------------- BEIR folders


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("gz", [False, True], ids=["jsonl", "jsonl.gz"])
def test_load_beir_folder(tmp_path, newline, gz):
    folder = make_beir(tmp_path / "tiny", GOOD_QRELS, newline=newline, gz=gz)
    data = load_beir(folder, "test")
    assert data.name == "tiny" and data.split == "test"
    assert data.corpus.ids == ["d1", "d2", "d3", "d4"]
    assert data.corpus.text(0) == "Vitamin D Sunlight makes vitamin D."
    assert data.corpus.text(1) == "No title here."
    assert data.corpus.text_of("d3") == "Title key absent."
    assert data.corpus.text_of("d4") == "Only a title"
    assert "d2" in data.corpus and "zz" not in data.corpus
    # q3 has no qrels row, so it is not part of the split.
    assert data.queries == {"q1": "vitamin d sunlight", "q2": "untitled documents"}
    assert data.qrels == {"q1": {"d1": 2, "d2": 0}, "q2": {"d2": 1, "d4": 1}}
    assert all(type(grade) is int for judged in data.qrels.values() for grade in judged.values())
    assert all("\r" not in key for judged in data.qrels.values() for key in judged)
    assert data.skipped_qrels == 0
    assert data.relevant("q1") == {"d1": 2}
    assert [p.name for p in data.files] == ["corpus.jsonl.gz" if gz else "corpus.jsonl", "queries.jsonl", "test.tsv"]
    assert all(value.startswith("sha256:") for value in data.checksums().values())


def test_load_beir_without_header_line(tmp_path):
    data = load_beir(make_beir(tmp_path / "tiny", GOOD_QRELS, header=False), "test")
    assert data.qrels == {"q1": {"d1": 2, "d2": 0}, "q2": {"d2": 1, "d4": 1}}


def test_unknown_split_and_missing_folder(tmp_path):
    folder = make_beir(tmp_path / "tiny", GOOD_QRELS)
    with pytest.raises(DataError, match="dev") as info:
        load_beir(folder, "dev")
    assert "test" in str(info.value)  # lists the available splits
    with pytest.raises(DataError, match="not found"):
        load_beir(tmp_path / "nowhere", "test")


def test_unknown_queries_are_dropped_and_unknown_documents_kept_unretrievable(tmp_path):
    """BEIR/MTEB's rule: a judged document missing from the corpus stays in the qrels (it can never be retrieved,
    so it costs recall and nDCG) and its query counts; mining never takes it as a positive."""
    rows = GOOD_QRELS + ["qX\td1\t1", "qX\td2\t2",  # unknown query: no text to search with, dropped
                         "q1\tdX\t1",  # unknown document
                         "q3\tdY\t1"]  # known query, but its only row has an unknown document
    data = load_beir(make_beir(tmp_path / "tiny", rows), "test")
    assert (data.skipped_qrels, data.unretrievable_qrels, data.duplicate_qrels) == (2, 2, 0)
    assert data.qrels == {"q1": {"d1": 2, "d2": 0, "dX": 1}, "q2": {"d2": 1, "d4": 1}, "q3": {"dY": 1}}
    assert set(data.queries) == {"q1", "q2", "q3"}
    assert data.relevant("q1") == {"d1": 2} and data.relevant("q3") == {}
    assert data.qrels_counts() == {"skipped_qrels_rows": 2, "unretrievable_qrels_rows": 2, "duplicate_qrels_rows": 0}


def test_qrels_with_no_known_row_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no qrels row refers to a known query and document"):
        load_beir(make_beir(tmp_path / "tiny", ["qX\td1\t1", "q1\tdX\t1"]), "test")


def test_bundled_demo_dataset():
    test = load_beir("nfcorpus-demo", "test")
    train = load_beir("nfcorpus-demo", "train")
    assert len(test.corpus) == 2000 and len(train.corpus) == 2000
    assert len(test.queries) == 80
    assert len(train.queries) == 400
    assert set(test.queries) == set(test.qrels)
    assert all(doc_id in test.corpus for judged in test.qrels.values() for doc_id in judged)


# -------------------------------------------------------------------------------------------- MS MARCO


def test_msmarco_files_tsv_and_trec_qrels(tmp_path):
    (tmp_path / "collection.tsv").write_text("0\tThe first passage.\n1\tSecond\tpassage with a tab.\n"
                                             "2\tThird passage.", encoding="utf-8")
    (tmp_path / "queries.dev.tsv").write_text("100\twhat is first\n200\tsecond?\n", encoding="utf-8")
    (tmp_path / "qrels.dev.tsv").write_text("100\t0\t0\t1\n200\t0\t1\t1\n200\t0\t2\t0\n", encoding="utf-8")
    (tmp_path / "qrels.dev.trec").write_text("100 0 0 1\n200 0 1 1\n200 0 2 0\n", encoding="utf-8")

    corpus = load_corpus(tmp_path / "collection.tsv")
    assert corpus.ids == ["0", "1", "2"]
    assert corpus.text(0) == "The first passage."
    assert corpus.text(1) == "Second\tpassage with a tab."
    assert corpus.text(2) == "Third passage."  # no final newline
    assert load_queries(tmp_path / "queries.dev.tsv") == {"100": "what is first", "200": "second?"}
    expected = {"100": {"0": 1}, "200": {"1": 1, "2": 0}}
    assert load_qrels(tmp_path / "qrels.dev.tsv") == expected
    assert load_qrels(tmp_path / "qrels.dev.trec") == expected

    data = load_msmarco(tmp_path / "collection.tsv", tmp_path / "queries.dev.tsv", tmp_path / "qrels.dev.trec")
    assert data.name == "msmarco" and data.split == "dev"
    assert data.qrels == expected and data.skipped_qrels == 0
    assert set(data.queries) == {"100", "200"}


@pytest.fixture(scope="module")
def msmarco_folder() -> Path:
    folder = SHARED_DATA / "msmarco"
    if not folder.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    return folder


def test_real_msmarco_collection_head(msmarco_folder):
    path = msmarco_folder / "collection.head101.tsv"
    assert not path.read_bytes().endswith(b"\n")
    corpus = load_corpus(path)
    assert len(corpus) == 101
    assert corpus.ids[:3] == ["0", "1", "2"] and corpus.ids[-1] == "100"
    assert all(corpus.text(i) for i in range(len(corpus)))


def test_real_trec_qrels_dl19(msmarco_folder):
    qrels = load_qrels(msmarco_folder / "anserini" / "qrels.dl19-passage.txt")
    assert len(qrels) == 43
    assert sum(len(judged) for judged in qrels.values()) == 9260
    assert qrels["19335"]["1017759"] == 0
    assert {grade for judged in qrels.values() for grade in judged.values()} <= {0, 1, 2, 3}
    topics = load_queries(msmarco_folder / "anserini" / "topics.dl19-passage.txt")
    assert set(topics) == set(qrels)


def test_real_dl19_topics_and_graded_qrels_with_the_sample_corpus(msmarco_folder):
    """TREC DL 2019: anserini topics (qid<TAB>query, .txt) and graded TREC qrels over the 5,000-passage sample."""
    data = load_msmarco(msmarco_folder / "beir-sample" / "corpus.jsonl",
                        msmarco_folder / "anserini" / "topics.dl19-passage.txt",
                        msmarco_folder / "anserini" / "qrels.dl19-passage.txt", split="dl19")
    assert data.split == "dl19" and len(data.queries) == 43
    assert sum(len(judged) for judged in data.qrels.values()) == 9260  # every judgement kept
    assert data.unretrievable_qrels == 9260 - 4102  # judged non-relevant passages outside the sample, counted
    assert data.skipped_qrels == 0
    assert {grade for doc_ids in [data.relevant(q) for q in data.queries] for grade in doc_ids.values()} == {1, 2, 3}
    assert {grade for judged in data.qrels.values() for doc_id, grade in judged.items()
            if doc_id not in data.corpus} == {0}  # every judged-relevant passage is in the sample


def test_real_dev_small_trec_qrels(msmarco_folder):
    qrels = load_qrels(msmarco_folder / "anserini" / "qrels.msmarco-passage.dev-subset.txt")
    assert len(qrels) == 6980 and sum(len(judged) for judged in qrels.values()) == 7437
    queries = load_queries(msmarco_folder / "anserini" / "topics.msmarco-passage.dev-subset.txt")
    assert set(queries) == set(qrels)
    # the 101-passage head of the collection holds none of the judged passages: a clear error, not 0 queries
    with pytest.raises(DataError, match="no qrels row refers to a known query and document"):
        load_msmarco(msmarco_folder / "collection.head101.tsv",
                     msmarco_folder / "anserini" / "topics.msmarco-passage.dev-subset.txt",
                     msmarco_folder / "anserini" / "qrels.msmarco-passage.dev-subset.txt")


# ----------------------------------------------------------------------------------------- real NFCorpus


def test_real_nfcorpus(nfcorpus_folder):
    test = load_beir(nfcorpus_folder, "test")
    assert len(test.corpus) == 3633
    assert len(test.queries) == 323
    assert test.skipped_qrels == 0
    assert sum(len(judged) for judged in test.qrels.values()) == 12334
    train = load_beir(nfcorpus_folder, "train")
    assert len(train.queries) == 2590


# -------------------------------------------------------------------------------------------- bad input


def _error(call, *args) -> DataError:
    with pytest.raises(DataError) as info:
        call(*args)
    return info.value


def _assert_located(err: DataError, name: str, line: int | None, field: str | None) -> None:
    assert Path(err.path).name == name
    assert err.line == line
    assert err.field == field
    text = str(err)
    assert name in text
    if line is not None:
        assert f"{name}:{line}:" in text
    if field is not None:
        assert f"field '{field}'" in text


def test_malformed_json_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl(CORPUS[:2]) + '{"_id": "d3", "text": \n' + _jsonl(CORPUS[3:]), encoding="utf-8")
    err = _error(load_corpus, path)
    _assert_located(err, "corpus.jsonl", 3, None)
    assert "malformed JSON" in str(err)


def test_json_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl(CORPUS[:1]) + '["d2", "text"]\n', encoding="utf-8")
    _assert_located(_error(load_corpus, path), "corpus.jsonl", 2, None)


def test_corpus_line_missing_id(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl(CORPUS[:1] + [{"title": "t", "text": "no id"}]), encoding="utf-8")
    err = _error(load_corpus, path)
    _assert_located(err, "corpus.jsonl", 2, "_id")
    assert "missing" in str(err)


def test_duplicate_doc_id(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl(CORPUS + [{"_id": "d2", "text": "again"}]), encoding="utf-8")
    err = _error(load_corpus, path)
    _assert_located(err, "corpus.jsonl", 5, "_id")
    assert "duplicate" in str(err) and "'d2'" in str(err)


def test_duplicate_msmarco_passage_id(tmp_path):
    path = tmp_path / "collection.tsv"
    path.write_text("0\ta\n1\tb\n0\tc\n", encoding="utf-8")
    _assert_located(_error(load_corpus, path), "collection.tsv", 3, "_id")


@pytest.mark.parametrize("content", ["", "\n\n"], ids=["zero-bytes", "blank-lines"])
def test_empty_corpus(tmp_path, content):
    path = tmp_path / "corpus.jsonl"
    path.write_text(content, encoding="utf-8")
    err = _error(load_corpus, path)
    _assert_located(err, "corpus.jsonl", None, None)
    assert "empty" in str(err)


def test_document_with_neither_title_nor_text(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl(CORPUS[:2] + [{"_id": "d9", "title": " ", "text": ""}]), encoding="utf-8")
    err = _error(load_corpus, path)
    _assert_located(err, "corpus.jsonl", 3, "text")
    assert "'d9'" in str(err) and "neither title nor text" in str(err)


def test_document_text_of_wrong_type(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(_jsonl([{"_id": "d1", "text": ["a", "list"]}]), encoding="utf-8")
    _assert_located(_error(load_corpus, path), "corpus.jsonl", 1, "text")


def test_qrels_with_two_columns(tmp_path):
    path = tmp_path / "test.tsv"
    path.write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\n", encoding="utf-8")
    err = _error(load_qrels, path)
    _assert_located(err, "test.tsv", 3, "columns")
    assert "found 2" in str(err)


def test_qrels_with_two_columns_throughout(tmp_path):
    path = tmp_path / "test.tsv"
    path.write_text("q1\td1\nq1\td2\n", encoding="utf-8")
    _assert_located(_error(load_qrels, path), "test.tsv", 1, "columns")


@pytest.mark.parametrize("grade", ["high", "1.5", ""])
def test_qrels_non_integer_grade(tmp_path, grade):
    path = tmp_path / "test.tsv"
    path.write_bytes(f"query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq1\td2\t{grade}\r\n".encode())
    err = _error(load_qrels, path)
    _assert_located(err, "test.tsv", 3, "score")
    assert "not an integer" in str(err)


def test_invalid_utf8_in_queries(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_bytes(_jsonl(QUERIES[:2]).encode() + b'{"_id": "q3", "text": "caf\xe9 \xff"}\n')
    err = _error(load_queries, path)
    _assert_located(err, "queries.jsonl", 3, None)
    assert "UTF-8" in str(err)


def test_invalid_utf8_late_in_a_large_gz_file(tmp_path):
    path = tmp_path / "corpus.jsonl.gz"
    rows = [{"_id": f"d{i}", "text": "padding " * 20} for i in range(500)]
    with gzip.open(path, "wb") as handle:
        handle.write(_jsonl(rows).encode() + b'{"_id": "bad", "text": "\xc3("}\n')
    _assert_located(_error(load_corpus, path), "corpus.jsonl.gz", 501, None)


def test_missing_file(tmp_path):
    err = _error(load_queries, tmp_path / "queries.jsonl")
    assert "queries.jsonl" in str(err) and "not found" in str(err)


# ------------------------------------------------------------------------------------------------ pools


def _pools() -> list[Pool]:
    return [
        Pool("q1", "vitamin d sunlight", [Candidate("d1", 12.5)],
             [Candidate("d2", 9.25, rank=1, source="bm25"), Candidate("d3", 8.0, rank=3, source="dense")]),
        Pool("q2", "café ünïcode query", [Candidate("d2", 0.1), Candidate("d4", 0.3)], []),
    ]


def test_pools_round_trip(tmp_path):
    path = tmp_path / "out" / "pools.jsonl"
    assert write_pools(path, _pools()) == 2
    assert read_pools(path) == _pools()
    corpus = load_corpus(make_beir(tmp_path / "tiny", GOOD_QRELS) / "corpus.jsonl")
    assert read_pools(path, corpus) == _pools()
    assert [p.name for p in path.parent.iterdir()] == ["pools.jsonl"]


def test_read_pools_doc_not_in_corpus(tmp_path):
    path = tmp_path / "pools.jsonl"
    pools = _pools()
    pools[1].negatives.append(Candidate("d-missing", 0.0, rank=7, source="bm25"))
    write_pools(path, pools)
    corpus = load_corpus(make_beir(tmp_path / "tiny", GOOD_QRELS) / "corpus.jsonl")
    err = _error(read_pools, path, corpus)
    _assert_located(err, "pools.jsonl", 2, "negatives")
    assert "'d-missing'" in str(err)
    assert len(read_pools(path)) == 2  # without a corpus there is nothing to check against


def test_read_pools_without_positive(tmp_path):
    path = tmp_path / "pools.jsonl"
    pools = _pools()
    pools[1].positives = []
    write_pools(path, pools)
    err = _error(read_pools, path)
    _assert_located(err, "pools.jsonl", 2, "positives")
    assert "'q2'" in str(err)


def test_read_pools_bad_entries(tmp_path):
    path = tmp_path / "pools.jsonl"
    path.write_text(json.dumps({"query_id": "q1", "query": "x", "positives": [{"score": 1}], "negatives": []}) + "\n",
                    encoding="utf-8")
    _assert_located(_error(read_pools, path), "pools.jsonl", 1, "positives")
    path.write_text(json.dumps({"query_id": "q1", "query": "x", "positives": [{"doc_id": "d1"}]}) + "\n",
                    encoding="utf-8")
    _assert_located(_error(read_pools, path), "pools.jsonl", 1, "negatives")
    path.write_text("\n", encoding="utf-8")
    assert "no pools" in str(_error(read_pools, path))


@pytest.mark.parametrize("key, value", [("settings", ["x"]), ("config", "mine"), ("corpus", "x"), ("counts", 3)])
def test_a_pools_meta_edited_into_other_types_is_refused_with_its_field(tmp_path, key, value):
    """Read by training (the corpus check, the teacher that scored the pools, the model card) and re-mining: a
    section of another type was an AttributeError traceback, one of them after training had finished."""
    path = tmp_path / "pools.jsonl"
    write_pools(path, _pools())
    (tmp_path / "pools.meta.json").write_text(json.dumps({"dataset": "tiny", key: value}), encoding="utf-8")
    for read in (read_pools_meta, pools_scorer):
        err = _error(read, path)
        assert str(err).startswith(f"{tmp_path / 'pools.meta.json'}: field '{key}': expected a JSON object"), err
    corpus = load_corpus(make_beir(tmp_path / "tiny", GOOD_QRELS) / "corpus.jsonl")
    assert "expected a JSON object" in str(_error(read_pools, path, corpus))


# ------------------------------------------------------------------------------------------ atomic_write


def test_atomic_write_failure_creates_nothing(tmp_path):
    target = tmp_path / "result.json"
    with pytest.raises(RuntimeError), atomic_write(target) as handle:
        handle.write("half a file")
        raise RuntimeError("crash")
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_write_failure_keeps_old_content(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old", encoding="utf-8")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as handle:
        handle.write("new but incomplete")
        raise KeyboardInterrupt
    assert target.read_text(encoding="utf-8") == "old"
    assert os.listdir(tmp_path) == ["result.json"]


def test_atomic_write_success_replaces(tmp_path):
    target = tmp_path / "sub" / "result.bin"
    with atomic_write(target, "wb") as handle:
        handle.write(b"\x00\x01")
    with atomic_write(target, "wb") as handle:
        handle.write(b"\x02")
    assert target.read_bytes() == b"\x02"
    assert os.listdir(target.parent) == ["result.bin"]


def test_atomic_outputs_get_the_users_umask(tmp_path):
    import os

    from retriever.io import atomic_directory, atomic_write

    old = os.umask(0o027)
    try:
        with atomic_write(tmp_path / "file.txt") as handle:
            handle.write("x")
        with atomic_directory(tmp_path / "folder") as staging:
            (staging / "inside.txt").write_text("y")
            (staging / "sub").mkdir(mode=0o700)
            os.close(os.open(staging / "sub" / "weights.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))
    finally:
        os.umask(old)
    assert (tmp_path / "file.txt").stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o750    # not mkdtemp's 0700
    # files a library wrote 0600 (transformers' save_pretrained writes model.safetensors so) get the umask too
    assert (tmp_path / "folder" / "sub").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "folder" / "sub" / "weights.safetensors").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "folder" / "inside.txt").stat().st_mode & 0o777 == 0o640
