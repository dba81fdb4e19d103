"""Each filter against a brute-force re-implementation written from the paper's definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mining.filters import (
    FilterChain,
    RankWindow,
    TopK,
    TopKAbs,
    TopKMarginPos,
    TopKPercPos,
    TopKShifted,
    anchor_score,
    as_chain,
    describe_filter,
    make_filter,
)
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
    if floor is not None and floor > ceiling:
        with pytest.raises(HardnegError, match="above max_score"):
            TopKAbs(ceiling, floor)
        return
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


# --- rank windows, shifts and chains ---------------------------------------------------------------------


def brute_keep(spec: dict, scores: list[float], anchor: float) -> list[bool]:
    """Each filter's definition, one candidate at a time (rank = 1-based position, best first)."""
    out = []
    for rank, s in enumerate(scores, start=1):
        name = spec["name"]
        if name == "topk":
            ok = True
        elif name == "topk-shifted":
            ok = rank > spec["shift"]
        elif name == "rank-window":
            ok = rank >= spec["min_rank"] and (spec["max_rank"] is None or rank <= spec["max_rank"])
        elif name == "topk-abs":
            ok = s <= spec["max_score"] and (spec["min_score"] is None or s >= spec["min_score"])
        elif name == "topk-marginpos":
            ok = s <= anchor - spec["margin"]
        else:  # topk-percpos, written as the paper's anchor * perc with the sign fix
            ok = s <= (anchor * spec["perc"] if anchor >= 0 else anchor * (2 - spec["perc"]))
        out.append(ok)
    return out


stage_st = st.one_of(
    st.just({"name": "topk"}),
    st.builds(lambda n: {"name": "topk-shifted", "shift": n}, st.integers(0, 45)),
    st.builds(lambda lo, span: {"name": "rank-window", "min_rank": lo, "max_rank": None if span is None else lo + span},
              st.integers(1, 45), st.one_of(st.none(), st.integers(0, 45))),
    st.builds(lambda hi, lo: {"name": "topk-abs", "max_score": hi, "min_score": None if lo is None else hi - lo},
              st.floats(-50, 50), st.one_of(st.none(), st.floats(0, 60))),
    st.builds(lambda m: {"name": "topk-marginpos", "margin": m}, st.floats(0, 10)),
    st.builds(lambda p: {"name": "topk-percpos", "perc": p}, st.sampled_from([0.5, 0.9, 0.95, 1.0])),
)


@settings(max_examples=300, deadline=None)
@given(scores=scores_st, positives=positives_st, stages=st.lists(stage_st, min_size=1, max_size=4),
       how=st.sampled_from(["min", "mean", "max"]))
def test_chain_matches_brute_force(scores, positives, stages, how):
    """Random score lists (negative scores included), several positives, random chains of every filter."""
    scores = sorted(scores, reverse=True)  # filters see candidates best first
    anchor = brute_anchor(positives, how)
    chain = make_filter("chain", stages=[dict(s) for s in stages])
    removed = chain.removed_by(np.array(scores, dtype=np.float64), anchor_score(positives, how))
    masks = [brute_keep(spec, scores, anchor) for spec in stages]
    thresholds = [anchor - spec["margin"] if spec["name"] == "topk-marginpos" else
                  anchor - abs(anchor) * (1 - spec["perc"]) for spec in stages
                  if spec["name"] in ("topk-marginpos", "topk-percpos")]
    near = [any(abs(s - t) < 1e-6 * max(1.0, abs(t)) for t in thresholds) for s in scores]
    for i, score in enumerate(scores):
        if near[i]:
            continue  # exactly on a threshold: float rounding of the anchor decides
        first = next((n for n, mask in enumerate(masks, start=1) if not mask[i]), 0)
        assert removed[i] == first, (score, anchor, stages)
    assert chain.keep(np.array(scores), anchor_score(positives, how)).tolist() == (removed == 0).tolist()


@settings(max_examples=100, deadline=None)
@given(stages=st.lists(stage_st, min_size=1, max_size=3))
def test_describe_filter_round_trips(stages):
    chain = make_filter("chain", stages=[dict(s) for s in stages])
    assert make_filter(**describe_filter(chain)) == chain
    for stage in chain.stages:
        assert make_filter(**describe_filter(stage)) == stage


def test_rank_window_and_shift_by_hand():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert TopKShifted(2).keep(scores, 0.0).tolist() == [False, False, True, True, True]
    assert TopKShifted(0).keep(scores, 0.0).all()
    assert RankWindow(2, 4).keep(scores, 0.0).tolist() == [False, True, True, True, False]
    assert RankWindow(3).keep(scores, 0.0).tolist() == [False, False, True, True, True]


def test_chain_charges_the_first_rejecting_stage():
    chain = FilterChain((TopKShifted(1), TopKPercPos(0.9), TopKAbs(max_score=0.5)))
    scores = np.array([0.99, 0.95, 0.85, 0.6, 0.4])
    # rank 1 -> shift; 0.95 > 0.9 -> percpos; 0.85 <= 0.9 but > 0.5 -> abs; 0.6 -> abs; 0.4 kept.
    assert chain.removed_by(scores, 1.0).tolist() == [1, 2, 3, 3, 0]
    assert chain.stage_names == ["topk-shifted", "topk-percpos", "topk-abs"]
    assert chain.needs_anchor
    assert not FilterChain((TopKShifted(1), RankWindow(1, 3))).needs_anchor
    assert as_chain(TopK()).stages == (TopK(),)
    assert as_chain(chain) is chain


@pytest.mark.parametrize(("name", "params", "match"), [
    ("topk-percpos", {"perc": 0.0}, "perc"),
    ("topk-percpos", {"perc": float("nan")}, "perc"),
    ("topk-shifted", {"shift": -1}, "shift"),
    ("topk-shifted", {"shift": 1.5}, "integer"),
    ("rank-window", {"min_rank": 0}, "min_rank"),
    ("rank-window", {"min_rank": 5, "max_rank": 4}, "above max_rank"),
    ("topk-abs", {"max_score": 1.0, "min_score": 2.0}, "above max_score"),
    ("topk-abs", {"max_score": "high"}, "finite number"),
    ("topk-marginpos", {"margin": -0.1}, "margin"),
    ("chain", {"stages": []}, "non-empty"),
    ("chain", {"stages": [{"perc": 0.9}]}, "'name'"),
    ("chain", {"stages": [{"name": "chain", "stages": [{"name": "topk"}]}]}, "cannot itself"),
    ("chain", {"stages": [{"name": "topk-percpos", "perc": 2}]}, "perc"),
    ("chain", {"stages": [{"name": "topk"}], "extra": 1}, "unknown parameter"),
])
def test_bad_parameters_are_refused(name, params, match):
    with pytest.raises(HardnegError, match=match):
        make_filter(name, **params)


def test_anchor_needs_a_positive():
    with pytest.raises(HardnegError, match="no positive"):
        anchor_score([], "min")
