"""Each filter against a brute-force re-implementation written from the paper's definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mining.filters import TopK, TopKAbs, TopKMarginPos, TopKPercPos, anchor_score, make_filter
from retriever.io import HardnegError

scores_st = st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=1, max_size=40)
positives_st = st.lists(st.floats(-50, 50, allow_nan=False, width=32), min_size=1, max_size=6)


def brute_anchor(positives: list[float], how: str) -> float:
    if how == "min":
        best = positives[0]
        for p in positives:
            best = p if p < best else best
        return best
    if how == "max":
        best = positives[0]
        for p in positives:
            best = p if p > best else best
        return best
    return math.fsum(positives) / len(positives)


@settings(max_examples=200, deadline=None)
@given(scores=scores_st, positives=positives_st, perc=st.floats(0.01, 1.0), how=st.sampled_from(["min", "mean", "max"]))
def test_percpos_matches_brute_force(scores, positives, perc, how):
    anchor = brute_anchor(positives, how)
    # NV-Retriever: drop a candidate scoring above perc of the positive; for a negative anchor the distance
    # |anchor| * (1 - perc) is taken downwards, so the threshold stays below the anchor.
    threshold = anchor * perc if anchor >= 0 else anchor * (2 - perc)
    got = TopKPercPos(perc).keep(np.array(scores, dtype=np.float64), anchor_score(positives, how))
    for score, kept in zip(scores, got):
        if abs(score - threshold) > 1e-6 * max(1.0, abs(threshold)):  # on-threshold cases depend on rounding
            assert kept == (score <= threshold), (score, threshold)


@settings(max_examples=100, deadline=None)
@given(scores=scores_st, positives=positives_st, margin=st.floats(0, 10))
def test_marginpos_matches_brute_force(scores, positives, margin):
    anchor = brute_anchor(positives, "min")
    got = TopKMarginPos(margin).keep(np.array(scores, dtype=np.float64), anchor)
    assert list(got) == [s <= anchor - margin for s in scores]


@settings(max_examples=100, deadline=None)
@given(scores=scores_st, ceiling=st.floats(-50, 50), floor=st.one_of(st.none(), st.floats(-50, 0)))
def test_abs_matches_brute_force(scores, ceiling, floor):
    got = TopKAbs(ceiling, floor).keep(np.array(scores, dtype=np.float64), 0.0)
    assert list(got) == [s <= ceiling and (floor is None or s >= floor) for s in scores]


def test_percpos_is_sign_safe():
    flt = TopKPercPos(0.95)
    assert flt.threshold(10.0) == pytest.approx(9.5)
    assert flt.threshold(-10.0) == pytest.approx(-10.5)  # below the anchor, unlike -10 * 0.95 = -9.5
    kept = flt.keep(np.array([-9.6, -10.4, -10.6]), -10.0)
    assert kept.tolist() == [False, False, True]


def test_naive_topk_keeps_all():
    assert TopK().keep(np.array([1e9, -1e9]), 0.0).all()


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.01])
def test_percpos_refuses_out_of_range(bad):
    with pytest.raises(HardnegError, match="perc"):
        TopKPercPos(bad)


def test_make_filter_refuses_unknown_names_and_parameters():
    with pytest.raises(HardnegError, match="unknown filter"):
        make_filter("topk-magic")
    with pytest.raises(HardnegError, match="topk-marginpos"):
        make_filter("topk-marginpos", perc=0.9)
    with pytest.raises(HardnegError, match="anchor"):
        anchor_score([1.0], "median")
