"""``evaluate`` end to end: the evaluation folder, options recorded, custom retrievers, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import pytrec_eval

from eval.evaluate import evaluate
from eval.runs import read_run, write_run
from hardneg.cli import main
from retriever.data import BUNDLED_DIR, Corpus, Dataset, Queries, Run, load_beir
from retriever.encoding import autocast, resolve_precision
from retriever.io import DataError, HardnegError

METRICS = ("nDCG@10", "Recall@100", "MRR@10", "MAP@100", "P@10", "AUC", "AUC-corpus", "AUC-pooled")


@pytest.fixture(scope="module")
def bm25_evaluation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval")
    dataset = load_beir("nfcorpus-demo", "test")
    record = evaluate(dataset, "bm25", metrics=METRICS, depth=200, output_dir=folder)
    return dataset, record, folder


def test_evaluation_folder(bm25_evaluation):
    dataset, record, folder = bm25_evaluation
    for name in ("metrics.json", "per_query.json", "run.trec", "report.md", "roc.png", "score_histogram.png"):
        assert (folder / name).is_file(), name
    stored = json.loads((folder / "metrics.json").read_text())
    assert stored["split"] == "test" and stored["queries"] == 80 and stored["depth"] == 200
    assert stored["options"]["ignore_identical_ids"] is False and stored["options"]["relevance_level"] == 1
    assert stored["auc_pooled"]["source"] == "corpus" and stored["auc_pooled"]["negatives"] == 80 * 100
    assert set(stored["input_checksums"]) == {str(p) for p in dataset.files}
    per_query = json.loads((folder / "per_query.json").read_text())["per_query"]
    for name in METRICS[:-1]:
        assert stored["metrics"][name] == pytest.approx(np.mean(list(per_query[name].values())), abs=1e-12)
    assert len(per_query["nDCG@10"]) == 80
    # The numbers are trec_eval's, recomputed from run.trec by pytrec_eval.
    run = read_run(folder / "run.trec", dataset.queries)
    assert len(run) < len(dataset.queries)  # some queries share no term with any document
    assert all(len(docs) <= 200 for docs in run.values())
    measured = pytrec_eval.RelevanceEvaluator(dataset.qrels, {"ndcg_cut.10", "map_cut.100", "P.10"}).evaluate(run)
    for ours, theirs in (("nDCG@10", "ndcg_cut_10"), ("MAP@100", "map_cut_100"), ("P@10", "P_10")):
        # a query BM25 returns nothing for is missing from pytrec_eval's output; it counts 0 in the mean
        expected = np.mean([measured.get(q, {}).get(theirs, 0.0) for q in dataset.qrels])
        assert stored["metrics"][ours] == pytest.approx(expected, abs=1e-6)
    report = (folder / "report.md").read_text()
    assert "| nDCG@10 | " + f"{stored['metrics']['nDCG@10']:.4f}" in report
    assert (folder / "roc.png").read_bytes()[:4] == b"\x89PNG"


def test_run_file_evaluation_equals_retriever_evaluation(bm25_evaluation, tmp_path, capsys):
    dataset, record, folder = bm25_evaluation
    code = main(["--quiet", "evaluate", "--data", "nfcorpus-demo", "--run-file", str(folder / "run.trec"),
                 "--metrics", "nDCG@10,MAP@100,P@10,AUC,AUC-pooled", "--depth", "200", "--output", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    stored = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("nDCG@10", "MAP@100", "P@10", "AUC"):
        assert stored["metrics"][name] == pytest.approx(record["metrics"][name], abs=1e-6)
    assert stored["auc_pooled"]["source"] == "run"


class SearchOnly:
    """A custom Retriever: only ``search``. Scores = number of query words in the document."""

    description = "word-overlap"

    def search(self, corpus: Corpus, queries: Queries, top_k: int) -> Run:
        documents = [set(corpus.text(i).lower().split()) for i in range(len(corpus))]
        run = {}
        for query_id, text in queries.items():
            words = set(text.lower().split())
            scores = {doc_id: float(len(words & documents[i])) for i, doc_id in enumerate(corpus.ids)}
            best = sorted(scores, key=scores.get, reverse=True)[:top_k]
            run[query_id] = {doc_id: scores[doc_id] for doc_id in best}
        return run


def test_custom_retriever(tmp_path):
    dataset = load_beir("nfcorpus-demo", "test")
    record = evaluate(dataset, SearchOnly(), metrics=("nDCG@10", "AUC-pooled"), depth=50, output_dir=tmp_path)
    assert record["retriever"] == "word-overlap" and 0 < record["metrics"]["nDCG@10"] < 1
    assert record["auc_pooled"]["source"] == "run"
    with pytest.raises(HardnegError, match="AUC-corpus needs a retriever that scores every document"):
        evaluate(dataset, SearchOnly(), metrics=("AUC-corpus",), depth=50, output_dir=tmp_path / "no")
    assert not (tmp_path / "no").exists()


def make_arguana_like(folder: Path, *, queries_are_documents: bool = True) -> Path:
    """Queries that are also corpus documents (same id, same text), as in ArguAna; or, with
    ``queries_are_documents=False``, queries whose ids merely collide with document ids (as SciFact's "3")."""
    folder.mkdir(parents=True)
    docs = [("a1", "cats are better pets than dogs"), ("a2", "dogs are loyal pets"), ("a3", "pets need care"),
            ("a4", "cats sleep most of the day")]
    queries = docs[:2] if queries_are_documents else [("a1", "dogs loyal"), ("a2", "cats better than dogs")]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "title": "", "text": t}) + "\n"
                                                 for i, t in docs))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": i, "text": t}) + "\n" for i, t in queries))
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\na1\ta2\t1\na2\ta1\t1\n")
    return folder


@pytest.mark.parametrize("name, copies, default", [("arguana", True, True), ("my-debates", True, True),
                                                    ("arguana-ids-collide", False, True), ("scifact", False, False),
                                                    ("known-item", True, False)])
def test_identical_ids_default_by_name_or_by_data(tmp_path, name, copies, default):
    """On for ArguAna/Quora by name, and for any folder whose queries are its documents (a copy under another
    name would otherwise lose every query's rank-1 hit to its own copy); ids that only collide leave it off, and
    so does a known-item set, where each query's own document is judged its answer."""
    folder = make_arguana_like(tmp_path / name, queries_are_documents=copies)
    if name == "known-item":
        (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\na1\ta1\t1\na2\ta2\t1\n")
    dataset = load_beir(folder, "test")
    record = evaluate(dataset, SearchOnly(), metrics=("MRR@4", "P@1"), depth=4)
    assert record["options"]["ignore_identical_ids"] is default
    reason = record["options"]["ignore_identical_ids_reason"]
    assert ("BEIR/MTEB practice" in reason) == name.startswith("arguana")
    assert ("2 of the 2 queries are corpus documents themselves" in reason) == (name == "my-debates")
    if copies and default:  # the query's own text matches itself best: kept, the relevant one would be second
        assert record["metrics"]["P@1"] == 1.0
        forced = evaluate(dataset, SearchOnly(), metrics=("P@1",), depth=4, ignore_identical_ids=False)
        assert forced["metrics"]["P@1"] == 0.0 and forced["options"]["ignore_identical_ids_reason"] == "given"


def test_a_query_judged_only_non_relevant_counts_zero_as_in_beir(tmp_path):
    """BEIR averages pytrec_eval's values over every judged query: one with only grade-0 judgements scores 0 and
    stays in the mean (and in the count written beside it)."""
    folder = make_arguana_like(tmp_path / "graded", queries_are_documents=False)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\na1\ta2\t1\na2\ta1\t0\n")
    record = evaluate(load_beir(folder, "test"), SearchOnly(), metrics=("nDCG@4", "P@1"), depth=4,
                      output_dir=tmp_path / "out")
    assert record["queries"] == 2 and record["queries_without_relevant"] == 1
    assert record["metrics"]["P@1"] == 0.5  # a1 finds a2 first; a2 has nothing to find
    assert "with no document of grade >= 1 (0 on the binary metrics; nDCG keeps graded gains): 1" in \
        (tmp_path / "out" / "report.md").read_text()
    # At level 2 a query judged only grade 1 has no relevant document: 0 on P@1, but nDCG keeps its graded gain,
    # as trec_eval does
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\na1\ta2\t2\na2\ta1\t1\n")
    level2 = evaluate(load_beir(folder, "test"), SearchOnly(), metrics=("nDCG@4", "P@1"), depth=4,
                      relevance_level=2)
    assert level2["queries"] == 2 and level2["queries_without_relevant"] == 1
    assert level2["per_query"]["P@1"] == {"a1": 1.0, "a2": 0.0}
    assert level2["per_query"]["nDCG@4"] == {"a1": 1.0, "a2": 1.0}


# ----------------------------------------------------------------------------------------- bad input


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hardneg: error:"), err
    return err


def test_run_file_with_unknown_query_ids(bm25_evaluation, tmp_path, capsys):
    _, _, folder = bm25_evaluation
    lines = (folder / "run.trec").read_text().splitlines()
    lines.insert(3, "NOT-A-QUERY Q0 MED-10 1 9.5 bm25")
    bad = tmp_path / "bad.trec"
    bad.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["--quiet", "evaluate", "--data", "nfcorpus-demo", "--run-file", str(bad), "--output", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "bad.trec:4:" in err and "field 'qid'" in err and "NOT-A-QUERY" in err
    assert not out.exists()
    with pytest.raises(DataError) as info:
        read_run(bad, load_beir("nfcorpus-demo", "test").queries)
    assert info.value.line == 4 and info.value.field == "qid"
    # dropping such lines is an explicit choice
    assert main(["--quiet", "evaluate", "--data", "nfcorpus-demo", "--run-file", str(bad), "--extra-run-queries",
                 "ignore", "--metrics", "nDCG@10", "--output", str(out)]) == 0
    assert (out / "metrics.json").is_file()


def test_qrels_with_non_integer_grade(tmp_path, capsys):
    folder = tmp_path / "data"
    shutil.copytree(BUNDLED_DIR / "nfcorpus-demo", folder)
    lines = (folder / "qrels" / "test.tsv").read_text().splitlines()
    lines[7] = "\t".join(lines[7].split("\t")[:2] + ["1.5"])
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["--quiet", "evaluate", "--data", str(folder), "--retriever", "bm25", "--output", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "test.tsv:8:" in err and "field 'score'" in err and "'1.5'" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    (["--metrics", "nDCG@10,bpref"], "unknown metric 'bpref'"),
    (["--metrics", "AUC-corpus", "--run-file", "{run}"], "AUC-corpus needs document scores"),
    (["--metrics", "nDCG@10", "--relevance-level", "0"], "relevance_level: must be >= 1"),
    (["--metrics", "Recall@100", "--depth", "10"], "deeper than the run depth"),
])
def test_bad_options(argv, expected, bm25_evaluation, tmp_path, capsys):
    _, _, folder = bm25_evaluation
    argv = [a.replace("{run}", str(folder / "run.trec")) for a in argv]
    if "--run-file" not in argv:
        argv += ["--retriever", "bm25"]
    out = tmp_path / "out"
    assert main(["--quiet", "evaluate", "--data", "nfcorpus-demo", *argv, "--output", str(out)]) == 2
    assert expected in _one_line_error(capsys)
    assert not out.exists()


def test_write_then_read_run_keeps_only_split_queries(tmp_path):
    run = {"q1": {"d1": 1.0}, "q2": {"d2": 0.5}}
    write_run(tmp_path / "r.trec", run)
    assert read_run(tmp_path / "r.trec", {"q1"}, extra_queries="ignore") == {"q1": {"d1": 1.0}}
    with pytest.raises(DataError, match="no line of the run names a query"):
        read_run(tmp_path / "r.trec", {"q9"}, extra_queries="ignore")


def test_sentence_transformers_object(tiny_model):
    """A loaded SentenceTransformer is evaluated as an Encoder: same numbers as its own vectors searched exactly."""
    from sentence_transformers import SentenceTransformer

    full = load_beir("nfcorpus-demo", "test")
    keep = sorted({d for judged in list(full.qrels.values())[:8] for d in judged} | set(full.corpus.ids[:50]))
    corpus = Corpus(ids=keep, titles=[full.corpus.titles[full.corpus.position[d]] for d in keep],
                    bodies=[full.corpus.bodies[full.corpus.position[d]] for d in keep])
    qrels = dict(list(full.qrels.items())[:8])
    dataset = Dataset("demo-subset", "test", corpus, {q: full.queries[q] for q in qrels}, qrels, full.files)
    model = SentenceTransformer(str(tiny_model), device="cpu")
    record = evaluate(dataset, model, metrics=("nDCG@10", "Recall@100", "AUC-corpus"), depth=100)
    precision = record["encoding"][0]["precision"]  # auto: what this machine runs natively
    assert record["encoding"][0]["requested"] == "auto" and precision == resolve_precision("auto", "cpu")
    with autocast(precision, "cpu"):
        documents = model.encode(dataset.corpus.texts(), batch_size=64, convert_to_numpy=True)
        queries = model.encode(list(dataset.queries.values()), batch_size=64, convert_to_numpy=True)

    class Fixed:
        def encode_queries(self, texts):
            return queries

        def encode_documents(self, texts):
            return documents

    expected = evaluate(dataset, Fixed(), metrics=("nDCG@10", "Recall@100", "AUC-corpus"), depth=100)
    for name in ("nDCG@10", "Recall@100", "AUC-corpus"):
        assert record["metrics"][name] == pytest.approx(expected["metrics"][name], abs=1e-6)
    assert record["metrics"]["nDCG@10"] > 0
