"""Losses: each against a direct cell-by-cell loop written here (values and gradients), masks against brute force."""

from __future__ import annotations

import math

import pytest
import torch

from retriever.io import HardnegError
from retriever.losses import (
    LOSSES,
    LearnableTemperature,
    build_masks,
    combined,
    decoupled_softmax,
    info_nce,
    make_loss,
    mw_loss,
)

# ------------------------------------------------------------------------------ loop references (float64)


def _cells(mask: torch.Tensor, i: int) -> list[int]:
    return [j for j in range(mask.shape[1]) if mask[i, j]]


def loop_info_nce(s, targets, negatives, tau):
    terms = []
    for i in range(s.shape[0]):
        candidates = [j for j in range(s.shape[1]) if targets[i, j] or negatives[i, j]]
        for p in _cells(targets, i):
            denominator = torch.logsumexp(torch.stack([s[i, j] / tau for j in candidates]), dim=0)
            terms.append(-s[i, p] / tau + denominator)
    return torch.stack(terms).mean()


def loop_symmetric(s, targets, negatives, tau):
    return (loop_info_nce(s, targets, negatives, tau) + loop_info_nce(s.T, targets.T, negatives.T, tau)) / 2


def loop_decoupled(s, targets, negatives, tau):
    terms = []
    for i in range(s.shape[0]):
        for p in _cells(targets, i):
            others = [s[i, n] / tau for n in _cells(negatives, i) if not targets[i, n]]
            denominator = torch.logsumexp(torch.stack([s[i, p] / tau, *others]), dim=0)
            terms.append(-s[i, p] / tau + denominator)
    return torch.stack(terms).mean()


def softplus(x):
    return torch.log(1 + torch.exp(x))  # float64 and |x| < 100 here: no overflow, exact gradient at ties


def loop_mw(s, targets, negatives, tau, pairs="query"):
    terms = []
    negative_cells = [(i, j) for i in range(s.shape[0]) for j in _cells(negatives, i) if not targets[i, j]]
    for i in range(s.shape[0]):
        for p in _cells(targets, i):
            for k, n in negative_cells:
                if pairs == "global" or k == i:
                    terms.append(softplus((s[k, n] - s[i, p]) / tau))
    return torch.stack(terms).mean()


def random_batch(seed: int, queries: int = 5, columns: int = 9):
    """Scores with ties, several positives per query, masked (labelled but untargeted) cells, a targetless row."""
    generator = torch.Generator().manual_seed(seed)
    scores = (torch.randn(queries, columns, generator=generator, dtype=torch.float64) * 0.5).round(decimals=1)
    labelled = torch.rand(queries, columns, generator=generator) < 0.3
    targets = labelled & (torch.rand(queries, columns, generator=generator) < 0.7)
    for i in range(queries - 1):                      # every query but the last has at least one target
        if not targets[i].any():
            j = int(torch.randint(columns, (1,), generator=generator))
            targets[i, j] = labelled[i, j] = True
    targets[-1] = False
    negatives = ~labelled
    negatives[1] = False                              # a query whose every other cell is masked
    negatives[1, 0] = not targets[1, 0]
    return scores, targets, negatives


CASES = [
    ("infonce", lambda s, t, n, tau: info_nce(s, t, n, tau), loop_info_nce),
    ("symmetric", lambda s, t, n, tau: info_nce(s, t, n, tau, symmetric=True), loop_symmetric),
    ("decoupled", decoupled_softmax, loop_decoupled),
    ("mw-query", lambda s, t, n, tau: mw_loss(s, t, n, tau, pairs="query"), loop_mw),
    ("mw-global", lambda s, t, n, tau: mw_loss(s, t, n, tau, pairs="global"),
     lambda s, t, n, tau: loop_mw(s, t, n, tau, pairs="global")),
    ("combined", lambda s, t, n, tau: combined(s, t, n, tau, mw_weight=0.3),
     lambda s, t, n, tau: loop_info_nce(s, t, n, tau) + 0.3 * loop_mw(s, t, n, tau)),
]


@pytest.mark.parametrize("name,loss,reference", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradients_equal_the_loop(name, loss, reference, seed):
    scores, targets, negatives = random_batch(seed)
    assert (targets.sum(dim=1) > 1).any(), "the case must have queries with several positives"
    scores_a = scores.clone().requires_grad_(True)
    scores_b = scores.clone().requires_grad_(True)
    tau_a = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    tau_b = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    value = loss(scores_a, targets, negatives, tau_a)
    expected = reference(scores_b, targets, negatives, tau_b)
    value.backward()
    expected.backward()
    # the losses compute in float32; the references in float64
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(scores_a.grad, scores_b.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tau_a.grad, tau_b.grad, atol=1e-4, rtol=1e-4)
    assert tau_a.grad.abs() > 0


def test_a_float_temperature_gives_the_same_loss():
    scores, targets, negatives = random_batch(3)
    for loss in (info_nce, decoupled_softmax, mw_loss):
        assert loss(scores, targets, negatives, 0.07).item() == pytest.approx(
            loss(scores, targets, negatives, torch.tensor(0.07)).item(), rel=1e-6)


def test_global_mw_in_blocks_matches_one_block(monkeypatch):
    import retriever.losses as losses

    scores, targets, negatives = random_batch(4, queries=12, columns=30)
    scores = scores.float()
    whole = mw_loss(scores.requires_grad_(True), targets, negatives, 0.05, pairs="global")
    (whole_grad,) = torch.autograd.grad(whole, scores)
    monkeypatch.setattr(losses, "_GLOBAL_BLOCK", 3)
    blocked = mw_loss(scores, targets, negatives, 0.05, pairs="global")
    (blocked_grad,) = torch.autograd.grad(blocked, scores)
    assert blocked.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(blocked_grad, whole_grad)


def test_decoupled_equals_infonce_with_one_positive_per_query():
    torch.manual_seed(0)
    scores = torch.randn(6, 14)
    targets = torch.zeros(6, 14, dtype=torch.bool)
    targets[torch.arange(6), torch.tensor([0, 3, 2, 7, 4, 13])] = True
    negatives = torch.rand(6, 14) < 0.8
    negatives &= ~targets
    a = info_nce(scores.requires_grad_(True), targets, negatives, 0.05)
    (grad_a,) = torch.autograd.grad(a, scores)
    b = decoupled_softmax(scores, targets, negatives, 0.05)
    (grad_b,) = torch.autograd.grad(b, scores)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_a, grad_b, atol=1e-5, rtol=1e-4)  # float32 cancellation near p=1
    # ... but not with several: the other positives leave the denominator
    targets[0, 5] = True
    negatives[0, 5] = False
    assert not torch.isclose(info_nce(scores, targets, negatives, 0.05),
                             decoupled_softmax(scores, targets, negatives, 0.05))


def test_masked_cells_neither_pull_nor_push():
    scores, targets, negatives = random_batch(5)
    scores = scores.float().requires_grad_(True)
    for name in LOSSES:
        loss = make_loss(name, temperature=0.1)(scores, targets, negatives)
        (grad,) = torch.autograd.grad(loss, scores)
        masked = ~(targets | negatives)
        assert masked.any() and torch.all(grad[masked] == 0), name
        assert torch.all(grad[-1] == 0), f"{name}: a query with no target still has a gradient"
        assert torch.isfinite(grad).all()


def test_no_target_cell_gives_zero_loss_and_no_nan():
    scores = torch.randn(3, 4, requires_grad=True)
    none = torch.zeros(3, 4, dtype=torch.bool)
    for name in LOSSES:
        loss = make_loss(name)(scores, none, ~none)
        loss.backward()
        assert loss.item() == 0 and torch.isfinite(scores.grad).all()


def test_build_masks_equals_brute_force_with_duplicates():
    positive_ids = [{"d1", "d3"}, {"d3"}, {"d1", "d7"}, set()]
    column_ids = ["d1", "d3", "d1", "d2", "d9", "d1", "d4", "d3"]
    target_columns = [[0, 1], [7], [2], []]
    targets, negatives = build_masks(positive_ids, column_ids, target_columns)
    for i, positives in enumerate(positive_ids):
        for j, doc in enumerate(column_ids):
            assert targets[i, j] == (j in target_columns[i])
            assert negatives[i, j] == (doc not in positives)
    assert not negatives[0, 5] and not negatives[0, 7] and negatives[1, 0]   # copies of d1 and d3 are masked
    assert negatives[3].all()


def test_build_masks_refuses_a_target_that_is_not_a_positive():
    with pytest.raises(HardnegError, match="not one of its labelled positives"):
        build_masks([{"d1"}], ["d1", "d2"], [[1]])
    with pytest.raises(HardnegError, match="column 5"):
        build_masks([{"d1"}], ["d1", "d2"], [[5]])


def test_make_loss_refuses_unknown_names_and_parameters():
    with pytest.raises(HardnegError, match="infonce, mw, decoupled, combined"):
        make_loss("triplet")
    with pytest.raises(HardnegError, match="'symmetric'"):
        make_loss("decoupled", symmetric=True)
    with pytest.raises(HardnegError, match="pairs"):
        make_loss("mw", pairs="batch")
    with pytest.raises(HardnegError, match="temperature"):
        make_loss("infonce", temperature=0)


def test_learnable_temperature_is_trained():
    scores, targets, negatives = random_batch(6)
    scores = scores.float()
    loss_fn = make_loss("infonce", temperature=0.05, learn_temperature=True, symmetric=True)
    parameters = list(loss_fn.parameters())
    assert len(parameters) == 1 and isinstance(loss_fn.learnable, LearnableTemperature)
    assert loss_fn.temperature.item() == pytest.approx(0.05)
    loss_fn(scores, targets, negatives).backward()
    # d loss / d log(tau) = tau * d loss / d tau, checked by a central difference
    eps = 1e-3
    plus = info_nce(scores, targets, negatives, 0.05 * math.exp(eps), symmetric=True)
    minus = info_nce(scores, targets, negatives, 0.05 * math.exp(-eps), symmetric=True)
    assert parameters[0].grad.item() == pytest.approx((plus - minus).item() / (2 * eps), rel=1e-3)
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    optimizer.step()
    assert loss_fn.temperature.item() != pytest.approx(0.05)
