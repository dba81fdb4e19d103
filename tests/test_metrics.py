"""Metrics equal pytrec_eval's (ties included), AUC equals its definition, TREC run files round-trip."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytrec_eval

from eval.metrics import (
    auc,
    average_precision_at,
    mean_metrics,
    mrr_at,
    ndcg_at,
    needs_identical_id_filter,
    parse_metric,
    per_query,
    precision_at,
    ranked,
    recall_at,
    without_identical_ids,
)
from eval.runs import read_run, write_run
from retriever.io import DataError

CUTS = (5, 10, 20)


def random_case(seed: int, n_queries: int = 50, n_docs: int = 30, pool: int = 60):
    """Graded qrels (0..3, judged non-relevant included) and a run whose scores tie often.

    Document ids have different lengths ("d7", "d42") so that string order differs from numeric order.
    """
    rng = np.random.default_rng(seed)
    doc_ids = [f"d{j}" for j in range(pool)]
    qrels: dict[str, dict[str, int]] = {}
    run: dict[str, dict[str, float]] = {}
    for i in range(n_queries):
        query_id = f"q{i}"
        judged = rng.choice(pool, size=int(rng.integers(1, 20)), replace=False)
        grades = rng.choice([0, 1, 2, 3], size=judged.size, p=[0.4, 0.3, 0.2, 0.1])
        if i % 10 == 0:
            grades[:] = 0  # judged, but nothing relevant: scores 0, as in trec_eval
        qrels[query_id] = {doc_ids[j]: int(g) for j, g in zip(judged, grades)}
        retrieved = rng.choice(pool, size=n_docs, replace=False)
        levels = int(rng.integers(2, 8))
        run[query_id] = {doc_ids[j]: float(rng.integers(0, levels)) / 4 - 0.5 for j in retrieved}
    return qrels, run


def pytrec(qrels, run, measures, level=1):
    return pytrec_eval.RelevanceEvaluator(qrels, measures, relevance_level=level).evaluate(run)


def truncated(run, k):
    return {query_id: {doc_id: scores[doc_id] for doc_id in ranked(scores)[:k]} for query_id, scores in run.items()}


@pytest.mark.parametrize("level", [1, 2])
@pytest.mark.parametrize("seed", range(6))
def test_every_metric_equals_pytrec_eval(seed, level):
    """nDCG, Recall, P, MAP at several cuts, MAP and MRR on the whole list, MRR@k: equal to 1e-9, ties included."""
    qrels, run = random_case(seed)
    assert set(qrels) <= set(run)
    names = ([f"nDCG@{k}" for k in CUTS] + [f"Recall@{k}" for k in CUTS] + [f"MRR@{k}" for k in CUTS]
             + [f"P@{k}" for k in CUTS] + [f"MAP@{k}" for k in CUTS] + ["MAP", "MRR"])
    ours = per_query(run, qrels, names, relevance_level=level)
    evaluated = set(qrels)  # every judged query, those with nothing of grade >= level too (trec_eval's)
    assert all(set(values) == evaluated for values in ours.values())
    assert 15 < sum(any(g >= level for g in qrels[q].values()) for q in qrels) < 50

    cuts = ",".join(map(str, CUTS))
    reference = pytrec(qrels, run, {f"ndcg_cut.{cuts}", f"recall.{cuts}", f"P.{cuts}", f"map_cut.{cuts}", "map",
                                    "recip_rank"}, level)
    for query_id in evaluated:
        expected = reference[query_id]
        for k in CUTS:
            assert ours[f"nDCG@{k}"][query_id] == pytest.approx(expected[f"ndcg_cut_{k}"], abs=1e-9)
            assert ours[f"Recall@{k}"][query_id] == pytest.approx(expected[f"recall_{k}"], abs=1e-9)
            assert ours[f"P@{k}"][query_id] == pytest.approx(expected[f"P_{k}"], abs=1e-9)
            assert ours[f"MAP@{k}"][query_id] == pytest.approx(expected[f"map_cut_{k}"], abs=1e-9)
        assert ours["MAP"][query_id] == pytest.approx(expected["map"], abs=1e-9)
        assert ours["MRR"][query_id] == pytest.approx(expected["recip_rank"], abs=1e-9)
    for k in CUTS:
        reference = pytrec(qrels, truncated(run, k), {"recip_rank"}, level)
        for query_id in evaluated:
            assert ours[f"MRR@{k}"][query_id] == pytest.approx(reference[query_id]["recip_rank"], abs=1e-9)

    # The means equal BEIR's: pytrec_eval's values averaged over every query it returns.
    means = mean_metrics(run, qrels, ["nDCG@10", "P@5", "Recall@10", "MAP"], relevance_level=level)
    reference = pytrec(qrels, run, {"ndcg_cut.10", "P.5", "recall.10", "map"}, level)
    assert set(reference) == evaluated
    for ours_name, theirs in (("nDCG@10", "ndcg_cut_10"), ("P@5", "P_5"), ("Recall@10", "recall_10"),
                              ("MAP", "map")):
        assert means[ours_name] == pytest.approx(np.mean([reference[q][theirs] for q in reference]), abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_fast_path_equals_the_plain_definitions(seed):
    """per_query reads every metric off one grade vector; the one-metric functions are the plain definitions."""
    qrels, run = random_case(200 + seed, n_docs=40)
    names = ["nDCG@7", "Recall@7", "P@7", "MAP@7", "MRR@7", "MAP", "MRR", "nDCG@40"]
    for level in (1, 3):
        ours = per_query(run, qrels, names, relevance_level=level)
        for query_id, values in ours["nDCG@7"].items():
            judged, ranking = qrels[query_id], ranked(run[query_id])
            assert values == pytest.approx(ndcg_at(ranking, judged, 7), abs=1e-12)
            assert ours["nDCG@40"][query_id] == pytest.approx(ndcg_at(ranking, judged, 40), abs=1e-12)
            assert ours["Recall@7"][query_id] == pytest.approx(recall_at(ranking, judged, 7, level), abs=1e-12)
            assert ours["P@7"][query_id] == pytest.approx(precision_at(ranking, judged, 7, level), abs=1e-12)
            assert ours["MAP@7"][query_id] == pytest.approx(average_precision_at(ranking, judged, 7, level), abs=1e-12)
            assert ours["MAP"][query_id] == pytest.approx(average_precision_at(ranking, judged, None, level), abs=1e-12)
            assert ours["MRR@7"][query_id] == pytest.approx(mrr_at(ranking, judged, 7, level), abs=1e-12)
            assert ours["MRR"][query_id] == pytest.approx(mrr_at(ranking, judged, None, level), abs=1e-12)


def test_ranked_equals_sorting_on_score_then_id():
    rng = np.random.default_rng(5)
    for _ in range(500):
        scores = {f"d{int(j)}": float(rng.integers(0, 4)) / 3 for j in rng.integers(0, 200, size=rng.integers(0, 50))}
        expected = [d for d, _ in sorted(scores.items(), key=lambda item: (item[1], item[0]), reverse=True)]
        assert ranked(scores) == expected


def test_short_run_precision_divides_by_k():
    """P@10 of a run with 3 documents is hits / 10 (trec_eval), not hits / 3."""
    qrels, run = {"q": {"a": 1, "b": 1}}, {"q": {"a": 3.0, "x": 2.0, "b": 1.0}}
    assert per_query(run, qrels, ["P@10"])["P@10"]["q"] == pytest.approx(0.2)
    assert pytrec(qrels, run, {"P.10"})["q"]["P_10"] == pytest.approx(0.2)


def test_identical_ids_option_changes_exactly_the_self_hit():
    """ArguAna-like: the query's own document is in the corpus and scores highest."""
    qrels = {"q1": {"d2": 1}, "q2": {"d9": 1}}
    run = {"q1": {"q1": 0.99, "d2": 0.9, "d3": 0.5}, "q2": {"d8": 0.8, "q2": 0.7, "d9": 0.6}}
    kept = per_query(run, qrels, ["nDCG@10", "MRR@10", "P@1", "Recall@1", "AUC"])
    dropped = per_query(run, qrels, ["nDCG@10", "MRR@10", "P@1", "Recall@1", "AUC"], ignore_identical_ids=True)
    assert kept["MRR@10"] == {"q1": 0.5, "q2": pytest.approx(1 / 3)}
    assert dropped["MRR@10"] == {"q1": 1.0, "q2": 0.5}
    assert kept["P@1"] == {"q1": 0.0, "q2": 0.0} and dropped["P@1"] == {"q1": 1.0, "q2": 0.0}
    assert kept["Recall@1"]["q1"] == 0.0 and dropped["Recall@1"]["q1"] == 1.0
    assert kept["nDCG@10"]["q1"] == pytest.approx(1 / math.log2(3)) and dropped["nDCG@10"]["q1"] == 1.0
    assert dropped["nDCG@10"]["q2"] == pytest.approx(1 / math.log2(3))
    assert kept["AUC"] == {"q1": 0.5, "q2": 0.0} and dropped["AUC"] == {"q1": 1.0, "q2": 0.0}
    # Same as what pytrec_eval gives on the run with the self-hits removed by hand.
    by_hand = {"q1": {"d2": 0.9, "d3": 0.5}, "q2": {"d8": 0.8, "d9": 0.6}}
    reference = pytrec(qrels, by_hand, {"ndcg_cut.10", "recip_rank", "P.1"})
    for q in qrels:
        assert dropped["nDCG@10"][q] == pytest.approx(reference[q]["ndcg_cut_10"], abs=1e-12)
        assert dropped["P@1"][q] == pytest.approx(reference[q]["P_1"], abs=1e-12)
    assert without_identical_ids(run) == by_hand
    assert needs_identical_id_filter("arguana") and needs_identical_id_filter("Quora")
    assert not needs_identical_id_filter("nfcorpus") and not needs_identical_id_filter("scifact")


def test_tie_order_is_trec_evals():
    scores = {f"d{j}": 1.0 for j in (0, 1, 2, 3, 9, 10, 11)} | {"top": 2.0, "low": -1.0}
    # score descending, then document id descending as strings ("d9" > "d11" > "d10" > "d3")
    assert ranked(scores) == ["top", "d9", "d3", "d2", "d11", "d10", "d1", "d0", "low"]

    # Only the tie-break decides: every candidate for the top 5 shares one score.
    run = {"q": {f"d{j}": 0.5 for j in range(8)}}
    qrels = {"q": {"d1": 3, "d2": 1, "d6": 2, "d0": 0}}
    reference = pytrec(qrels, run, {"ndcg_cut.5", "recall.5", "recip_rank"})["q"]
    ours = per_query(run, qrels, ["nDCG@5", "Recall@5", "MRR@5"])
    assert ranked(run["q"])[:5] == ["d7", "d6", "d5", "d4", "d3"]
    assert ours["nDCG@5"]["q"] == pytest.approx(reference["ndcg_cut_5"], abs=1e-9)
    assert ours["Recall@5"]["q"] == pytest.approx(reference["recall_5"], abs=1e-9) == pytest.approx(1 / 3)
    assert ours["MRR@5"]["q"] == pytest.approx(reference["recip_rank"], abs=1e-9) == pytest.approx(1 / 2)
    ideal = 3 + 2 / math.log2(3) + 1 / math.log2(4)
    assert ours["nDCG@5"]["q"] == pytest.approx((2 / math.log2(3)) / ideal)
    # Ascending id order would have put d1 (grade 3) and d2 first: a different number.
    ascending = (0 + 3 / math.log2(3) + 1 / math.log2(4)) / ideal
    assert abs(ours["nDCG@5"]["q"] - ascending) > 0.1


def test_query_missing_from_run_scores_zero_and_counts():
    qrels = {"q1": {"a": 1, "b": 0}, "q2": {"c": 2}, "q3": {"d": 0}}  # q3: judged, nothing relevant
    run = {"q1": {"a": 2.0, "b": 1.0, "x": 0.5}, "q3": {"d": 1.0, "e": 0.5}}
    values = per_query(run, qrels, ["nDCG@10", "Recall@10", "MRR@10", "MAP", "AUC"])
    assert values["nDCG@10"] == {"q1": 1.0, "q2": 0.0, "q3": 0.0}
    assert values["Recall@10"] == {"q1": 1.0, "q2": 0.0, "q3": 0.0}
    assert values["MRR@10"] == {"q1": 1.0, "q2": 0.0, "q3": 0.0}
    assert values["MAP"] == {"q1": 1.0, "q2": 0.0, "q3": 0.0}
    assert values["AUC"] == {"q1": 1.0}  # q2 retrieved no negative, q3 has no positive: AUC undefined, left out
    means = mean_metrics(run, qrels, ["nDCG@10", "Recall@10", "MRR@10", "AUC"])
    assert means == {"nDCG@10": pytest.approx(1 / 3), "Recall@10": pytest.approx(1 / 3),
                     "MRR@10": pytest.approx(1 / 3), "AUC": 1.0}
    # pytrec_eval (trec_eval) scores q3 0 too, and BEIR divides by the 2 queries pytrec_eval returns here
    reference = pytrec(qrels, run, {"ndcg_cut.10", "recip_rank"})
    assert set(reference) == {"q1", "q3"} and reference["q3"]["ndcg_cut_10"] == 0.0
    assert mean_metrics({}, qrels, ["nDCG@10", "AUC"]) == {"nDCG@10": 0.0, "AUC": 0.0}


# ------------------------------------------------------------------------------------------------- AUC


def brute_force_auc(scores, judged):
    relevant = [d for d, g in judged.items() if g >= 1]
    negatives = [d for d in scores if judged.get(d, 0) < 1]
    if not relevant or not negatives:
        return None
    wins = 0.0
    for pos in relevant:
        for neg in negatives:
            if pos not in scores:
                continue  # unretrieved relevant: loses to every retrieved negative
            if scores[pos] > scores[neg]:
                wins += 1
            elif scores[pos] == scores[neg]:
                wins += 0.5
    return wins / (len(relevant) * len(negatives))


@pytest.mark.parametrize("seed", range(4))
def test_auc_equals_brute_force(seed):
    qrels, run = random_case(100 + seed)
    defined = 0
    for query_id, judged in qrels.items():
        expected = brute_force_auc(run[query_id], judged)
        value = auc(run[query_id], judged)
        if expected is None:
            assert value is None
        else:
            defined += 1
            assert value == pytest.approx(expected, abs=1e-12)
    assert defined > 30
    ours = per_query(run, qrels, ["AUC"])["AUC"]
    assert ours == {q: pytest.approx(brute_force_auc(run[q], j), abs=1e-12)
                    for q, j in qrels.items() if brute_force_auc(run[q], j) is not None}


def test_auc_edge_cases():
    judged = {"a": 1, "b": 2, "n": 0}
    assert auc({"a": 3.0, "b": 2.0}, judged) is None  # only relevant documents retrieved
    assert auc({"a": 3.0, "x": 1.0}, {"n": 0}) is None  # nothing relevant
    assert auc({}, judged) is None
    assert auc({"a": 3.0, "b": 2.0, "n": 1.0, "x": 0.0}, judged) == 1.0  # perfect ranking
    assert auc({"a": 0.0, "b": -1.0, "n": 1.0, "x": 2.0}, judged) == 0.0
    assert auc({"a": 1.0, "b": 1.0, "n": 1.0}, judged) == 0.5  # all tied
    assert auc({"a": 3.0, "n": 1.0, "x": 0.0}, judged) == 0.5  # b unretrieved loses to both negatives


# ----------------------------------------------------------------------------------------- parse_metric


def test_parse_metric():
    assert parse_metric("MAP@10") == ("map", 10) and parse_metric("MAP") == ("map", None)
    assert parse_metric("P@5") == ("p", 5) and parse_metric("precision@5") == ("p", 5)
    assert parse_metric("MRR") == ("mrr", None)
    assert parse_metric("AUC-corpus") == ("auc-corpus", None) and parse_metric("auc-pooled") == ("auc-pooled", None)
    assert parse_metric("nDCG@10") == ("ndcg", 10)
    assert parse_metric("recall@100") == ("recall", 100)
    assert parse_metric("MRR@1") == ("mrr", 1)
    assert parse_metric("AUC") == ("auc", None)


@pytest.mark.parametrize("name", ["MAP@0", "P@", "P", "", "ndcg10", "bpref", "nDCG@", "nDCG", "Recall@0", "MRR@-1",
                                  "MRR@ten", "nDCG@1.5", "AUC@10"])
def test_parse_metric_rejects(name):
    with pytest.raises(ValueError):
        parse_metric(name)
    with pytest.raises(ValueError):
        per_query({}, {"q": {"d": 1}}, [name])


# ---------------------------------------------------------------------------------------- TREC run files


def test_run_round_trip(tmp_path):
    _, run = random_case(7, n_queries=12, n_docs=25)
    run["q3"] = {doc_id: round(score * 1.2345678 + 0.3333333, 6) for doc_id, score in run["q3"].items()}
    path = tmp_path / "runs" / "test.trec"
    write_run(path, run, tag="my system")
    back = read_run(path)
    assert back.keys() == run.keys()
    for query_id, scores in run.items():
        assert back[query_id].keys() == scores.keys()
        for doc_id, score in scores.items():
            assert back[query_id][doc_id] == score  # exact: the file scores the same as the run

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == sum(len(scores) for scores in run.values())
    by_query: dict[str, list[list[str]]] = {}
    for line in lines:
        fields = line.split()
        assert len(fields) == 6 and fields[1] == "Q0" and fields[5] == "my_system"
        by_query.setdefault(fields[0], []).append(fields)
    assert list(by_query) == sorted(run)
    for query_id, rows in by_query.items():
        assert [int(row[3]) for row in rows] == list(range(1, len(rows) + 1))
        assert [row[2] for row in rows] == ranked(run[query_id])
    # Re-ranking what was read back gives the same order, so metrics on the file equal metrics on the run.
    assert all(ranked(back[q]) == ranked(run[q]) for q in run)


def test_run_file_keeps_near_ties_apart(tmp_path):
    """Scores closer than 1e-6 must stay ordered in the file, or trec_eval breaks them by document id."""
    qrels = {"q": {"a": 1}}
    run = {"q": {"a": 0.5 + 4e-8, "z": 0.5, "b": 0.1}}  # 'a' first; rounded to 6 decimals 'z' would win the tie
    path = tmp_path / "near.trec"
    write_run(path, run)
    assert mean_metrics(read_run(path), qrels, ["MRR@10"]) == mean_metrics(run, qrels, ["MRR@10"]) == {"MRR@10": 1.0}


def test_read_run_five_fields(tmp_path):
    path = tmp_path / "bad.trec"
    path.write_text("q1 Q0 d1 1 2.5 tag\nq1 Q0 d2 2 1.5\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_run(path)
    assert info.value.line == 2 and info.value.field == "columns"
    assert "bad.trec:2:" in str(info.value) and "field 'columns'" in str(info.value) and "found 5" in str(info.value)


def test_read_run_non_numeric_score(tmp_path):
    path = tmp_path / "bad.trec"
    path.write_text("q1 Q0 d1 1 2.5 tag\n\nq1 Q0 d2 2 high tag\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_run(path)
    assert info.value.line == 3 and info.value.field == "score"
    assert "bad.trec:3:" in str(info.value) and "'high'" in str(info.value)


def test_read_run_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_run(tmp_path / "absent.trec")
    (tmp_path / "empty.trec").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        read_run(tmp_path / "empty.trec")
