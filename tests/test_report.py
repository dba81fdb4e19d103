"""MiningReport against bookkeeping recomputed by hand from the same per-query inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mining.report import HISTOGRAM_FILE, MiningReport, ScoreSample
from retriever.io import HardnegError


def _random_queries(rng: np.random.Generator, n_queries: int, stages: int, num_negatives: int):
    for q in range(n_queries):
        n = int(rng.integers(0, 30))
        scores = rng.normal(size=n) * 5
        is_positive = rng.random(n) < 0.1
        removed_by = np.where(rng.random(n) < 0.5, rng.integers(1, stages + 1, size=n), 0)
        survivors = np.flatnonzero(~is_positive & (removed_by == 0))
        sampled = np.zeros(n, dtype=bool)
        sampled[survivors[:num_negatives]] = True
        positives = list(rng.normal(size=int(rng.integers(1, 4))) * 5)
        yield f"q{q}", float(np.mean(positives)), positives, scores, is_positive, removed_by, sampled


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n_queries=st.integers(1, 40), num_negatives=st.integers(1, 6))
def test_counts_and_quantiles_match_brute_force(seed, n_queries, num_negatives):
    rng = np.random.default_rng(seed)
    report = MiningReport(["topk-shifted", "topk-percpos"], num_negatives)
    queries = list(_random_queries(rng, n_queries, 2, num_negatives))
    expected = {"labelled-positive": 0, "topk-shifted": 0, "topk-percpos": 0, "not-sampled": 0, "sampled": 0}
    removed, kept, positives, short = [], [], [], []
    for qid, anchor, pos, scores, is_pos, removed_by, sampled in queries:
        report.add_query(qid, anchor=anchor, positive_scores=pos, candidate_scores=scores, is_positive=is_pos,
                         removed_by=removed_by, sampled=sampled)
        written = 0
        for score, p, r, s in zip(scores, is_pos, removed_by, sampled):
            if p:
                expected["labelled-positive"] += 1
            elif r == 1:
                expected["topk-shifted"] += 1
                removed.append(score)
            elif r == 2:
                expected["topk-percpos"] += 1
                removed.append(score)
            elif s:
                expected["sampled"] += 1
                kept.append(score)
                written += 1
            else:
                expected["not-sampled"] += 1
        positives.extend(pos)
        if written < num_negatives:
            short.append(qid)
    out = json.loads(json.dumps(report.to_json()))  # must be JSON-serialisable
    assert out["candidates_by_stage"] == expected
    assert out["candidates"] == sum(len(q[3]) for q in queries)
    assert out["short_of_negatives"]["queries"] == len(short)
    assert out["short_of_negatives"]["query_ids"] == short[:100]
    assert out["short_of_negatives"]["share"] == pytest.approx(len(short) / n_queries, abs=1e-6)
    for group, values in (("removed", removed), ("sampled", kept), ("positive", positives)):
        summary = out["score_quantiles"][group]
        assert summary["count"] == len(values)
        if values:
            values32 = np.asarray(values, dtype=np.float32).astype(np.float64)
            assert summary["p0"] == pytest.approx(min(values32), abs=1e-5)
            assert summary["p100"] == pytest.approx(max(values32), abs=1e-5)
            assert summary["p50"] == pytest.approx(float(np.median(values32)), abs=1e-5)
            assert summary["exact"] is True


def test_reservoir_bounds_memory_and_keeps_exact_extremes():
    rng = np.random.default_rng(0)
    sample = ScoreSample(limit=1000, rng=np.random.default_rng(1))
    data = rng.uniform(-1, 1, size=200_000)
    for chunk in np.array_split(data, 400):
        sample.add(chunk)
    assert sample.count == 200_000 and not sample.exact
    assert sample.values().size == 1000
    summary = sample.summary()
    assert summary["p0"] == pytest.approx(data.min(), abs=1e-6)
    assert summary["p100"] == pytest.approx(data.max(), abs=1e-6)
    assert summary["mean"] == pytest.approx(data.mean(), abs=1e-4)
    # A uniform sample of 1000 from U(-1, 1): quartiles within a few standard errors.
    assert summary["p25"] == pytest.approx(-0.5, abs=0.1)
    assert summary["p50"] == pytest.approx(0.0, abs=0.1)
    assert summary["p75"] == pytest.approx(0.5, abs=0.1)


def test_histogram_png_is_written_atomically(tmp_path):
    import matplotlib

    matplotlib.use("svg")  # a user's own backend (a notebook's inline one, say) is left as it is
    report = MiningReport(["topk-percpos"], 2)
    report.add_query("q1", anchor=1.0, positive_scores=[1.0, 0.8], candidate_scores=[0.99, 0.9, 0.5, 0.4],
                     is_positive=[False, True, False, False], removed_by=[1, 0, 0, 0],
                     sampled=[False, False, True, True])
    path = report.write_histogram(tmp_path / HISTOGRAM_FILE)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [HISTOGRAM_FILE]
    assert report.removed_counts() == {"labelled-positive": 1, "topk-percpos": 1, "not-sampled": 0, "sampled": 2}
    assert matplotlib.get_backend() == "svg"


def test_empty_report_still_writes(tmp_path):
    report = MiningReport(["topk"], 1)
    report.write_histogram(tmp_path / "x.png")
    assert report.to_json()["score_quantiles"]["sampled"] == {"count": 0}


def test_repeated_stage_names_are_counted_apart():
    report = MiningReport(["topk-abs", "topk-abs"], 1)
    assert report.stages == ["labelled-positive", "topk-abs", "topk-abs#2", "not-sampled", "sampled"]


def test_inconsistent_input_is_refused():
    report = MiningReport(["topk-percpos"], 1)
    with pytest.raises(HardnegError, match="differ in length"):
        report.add_query("q", anchor=0.0, positive_scores=[1.0], candidate_scores=[1.0, 2.0], is_positive=[False],
                         removed_by=[0], sampled=[False])
    with pytest.raises(HardnegError, match="sampled candidate"):
        report.add_query("q", anchor=0.0, positive_scores=[1.0], candidate_scores=[1.0], is_positive=[False],
                         removed_by=[1], sampled=[True])
    with pytest.raises(HardnegError, match="filter stage"):
        report.add_query("q", anchor=0.0, positive_scores=[1.0], candidate_scores=[1.0], is_positive=[False],
                         removed_by=[2], sampled=[False])
    with pytest.raises(HardnegError, match="NaN"):
        report.add_query("q", anchor=0.0, positive_scores=[float("nan")], candidate_scores=[1.0],
                         is_positive=[False], removed_by=[0], sampled=[True])
