"""Contrastive losses over one shared (queries x candidates) score matrix with boolean masks.

Every loss here reads the same three tensors, so the trainer builds the batch once and any objective
(and gradient caching, and cross-device gathering) works with all of them:

- ``scores[Q, C]`` — raw similarities ``q_i . d_j`` of every query of the step against every candidate
  column (the batch's positives and hard negatives, possibly gathered from other ranks). Computed in
  float32 inside the losses even when the encoders ran under bf16/fp16 autocast.
- ``targets[Q, C]`` — the positive cells trained on this step. A query may have several (NFCorpus train
  queries have ~43 relevant documents); a query with none contributes nothing.
- ``negatives[Q, C]`` — the cells allowed as negatives: every column whose *document* is not a labelled
  positive of that query, compared by document id, so a second copy of a positive elsewhere in the
  batch, or another query's positive that is also relevant to this one, is neither pulled nor pushed.

:func:`build_masks` makes both masks from document ids. The losses (``tau`` = temperature):

- ``infonce``: for each target cell (i, p), ``-s_ip/tau + logsumexp_{j in targets_i u negatives_i} s_ij/tau``
  (the multi-positive softmax: a query's positives share one denominator); mean over target cells.
  ``symmetric=True`` averages it with the same loss on the transposed matrix (document -> query, over the
  columns that are some query's target), as sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``.
- ``mw``: the Mann-Whitney / AUC loss, mean of ``softplus((s_n - s_p)/tau)`` over (positive, negative)
  pairs, either of the same query (``pairs="query"``) or each positive cell against every negative cell of
  the batch (``pairs="global"``, computed in blocks so memory is O(block x negatives), not O(T x N)).
- ``decoupled``: decoupled softmax; each target cell's denominator is itself plus that query's negatives
  only (its other positives are not competitors). With one positive per query it equals ``infonce``.
- ``combined``: ``infonce + mw_weight * mw``.

Distillation reads two more tensors, ``teacher[Q, C]`` (the teacher's score of each cell) and ``scored[Q, C]``
(the cells the teacher scored: each query's own sampled positives and mined negatives, as recorded in pools
mined with ``--teacher`` or ``--cross-encoder``):

- ``kd`` (``form="kl"``): ``KL(softmax(t_i / tau_t) || softmax(s_i / tau))`` over each query's scored cells,
  mean over the queries with at least two (the soft-label distillation of RocketQAv2 / LG-ANNA-Embedding);
- ``kd`` (``form="margin-mse"``): MarginMSE (Hofstaetter et al.), mean over each query's (positive, negative)
  scored pairs of ``((s_p - s_n) / tau - (t_p - t_n) / tau_t)^2``.

:class:`DistilledLoss` adds ``weight x kd`` to any contrastive loss (``--distill-weight``) or is ``kd`` alone.

Python API (all functional forms take ``temperature`` as a float or a 0-d tensor, e.g. a learnable one)::

    targets, negatives = build_masks(positive_ids, column_ids, target_columns)
    loss_fn = make_loss("infonce", temperature=0.05, learn_temperature=True, symmetric=False)
    loss = loss_fn(query_emb @ doc_emb.T, targets, negatives)     # an nn.Module; put
    optimizer = AdamW([*model.parameters(), *loss_fn.parameters()])  # its log-temperature in the optimizer

    info_nce(scores, targets, negatives, temperature, symmetric=False)
    mw_loss(scores, targets, negatives, temperature, pairs="query")
    decoupled_softmax(scores, targets, negatives, temperature)
    combined(scores, targets, negatives, temperature, mw_weight=1.0, pairs="query", symmetric=False)

``make_loss(name, **params)`` refuses an unknown loss name or parameter with a :class:`HardnegError`
listing the choices; ``LOSSES`` maps each name to its module class.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from retriever.io import HardnegError
from retriever.train_settings import DISTILL_FORMS

Temperature = float | torch.Tensor
MW_PAIRS = ("query", "global")
_GLOBAL_BLOCK = 256  # target cells per block in the batch-global MW loss


# ----------------------------------------------------------------------------------------------- masks

def build_masks(positive_ids: list[set[str]], column_ids: list[str],
                target_columns: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, negatives)`` boolean ``[Q, C]`` masks from document ids.

    ``positive_ids[i]`` are all labelled positives of query ``i`` (not only those in the batch),
    ``column_ids[j]`` the document id of column ``j``, ``target_columns[i]`` the columns trained as
    query ``i``'s positives on this step. A target column must hold one of the query's labelled
    positives (else the labels and the batch disagree, which is a bug upstream, so it is refused).
    Cost is O(C + sum of positives), not O(Q x C) Python work, so it stays cheap for large batches.
    """
    if len(positive_ids) != len(target_columns):
        raise HardnegError(f"build_masks: {len(positive_ids)} queries' positives but {len(target_columns)} "
                           "target lists")
    num_queries, num_columns = len(positive_ids), len(column_ids)
    columns_of: dict[str, list[int]] = {}
    for j, doc_id in enumerate(column_ids):
        columns_of.setdefault(doc_id, []).append(j)
    targets = torch.zeros(num_queries, num_columns, dtype=torch.bool)
    positive_cells = torch.zeros(num_queries, num_columns, dtype=torch.bool)
    for i, positives in enumerate(positive_ids):
        for doc_id in positives:
            for j in columns_of.get(doc_id, ()):
                positive_cells[i, j] = True
        for j in target_columns[i]:
            if not 0 <= j < num_columns:
                raise HardnegError(f"build_masks: query {i} targets column {j}, but there are {num_columns}")
            if column_ids[j] not in positives:
                raise HardnegError(f"build_masks: query {i} targets column {j} (document {column_ids[j]!r}), "
                                   "which is not one of its labelled positives")
            targets[i, j] = True
    return targets, ~positive_cells


def _check(scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> None:
    if scores.dim() != 2 or targets.shape != scores.shape or negatives.shape != scores.shape:
        raise HardnegError(f"loss: scores {tuple(scores.shape)}, targets {tuple(targets.shape)} and negatives "
                           f"{tuple(negatives.shape)} must be the same [queries, candidates] shape")
    if targets.dtype != torch.bool or negatives.dtype != torch.bool:
        raise HardnegError("loss: targets and negatives must be boolean masks")


def _masked_logsumexp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row-wise logsumexp over the masked cells; ``-inf`` (with a zero, not NaN, gradient) for empty rows."""
    filled = logits.masked_fill(~mask, float("-inf"))
    nonempty = mask.any(dim=1)
    safe = torch.where(nonempty.unsqueeze(1), filled, torch.zeros_like(filled))
    result = torch.logsumexp(safe, dim=1)
    return torch.where(nonempty, result, torch.full_like(result, float("-inf")))


# ---------------------------------------------------------------------------------------------- losses

def _softmax_over(logits: torch.Tensor, targets: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Sum over target cells of ``-logit + logsumexp(row's candidate cells)``, and the number of cells."""
    rows = targets.any(dim=1)
    logits, targets, candidates = logits[rows], targets[rows], candidates[rows]
    denominators = _masked_logsumexp(logits, candidates | targets)
    return (denominators.unsqueeze(1) - logits)[targets].sum(), targets.sum()


def info_nce(scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, temperature: Temperature,
             symmetric: bool = False) -> torch.Tensor:
    """Multi-positive InfoNCE, mean over target cells; ``symmetric`` averages in the document->query term."""
    _check(scores, targets, negatives)
    logits = scores.float() / temperature
    negatives = negatives & ~targets
    total, count = _softmax_over(logits, targets, negatives)
    loss = total / count.clamp(min=1)
    if symmetric:
        total_t, count_t = _softmax_over(logits.T, targets.T, negatives.T)
        loss = (loss + total_t / count_t.clamp(min=1)) / 2
    return loss


def decoupled_softmax(scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                      temperature: Temperature) -> torch.Tensor:
    """Each target cell against its query's negatives only: ``softplus(logsumexp(neg_i) - s_ip/tau)``, averaged."""
    _check(scores, targets, negatives)
    logits = scores.float() / temperature
    negative_lse = _masked_logsumexp(logits, negatives & ~targets)   # [Q], -inf where no negatives
    rows, cols = targets.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return logits.sum() * 0.0
    # -s/t + log(exp(s/t) + sum_n exp(s_n/t)) = softplus(lse_n - s/t); softplus(-inf) = 0 with zero gradient.
    return F.softplus(negative_lse[rows] - logits[rows, cols]).mean()


class _GlobalPairs(torch.autograd.Function):
    """mean_{p, n} softplus((neg_n - pos_p) / tau), in blocks of positives, with the analytic gradient.

    Materialising the [T, N] pair matrix for autograd (T positives, N negative cells of the whole batch)
    would cost ~4 tensors of T*N floats: 0.5 GB for 256 queries x 512 columns. Blocked, it is O(block*N).
    """

    @staticmethod
    def forward(ctx, positives: torch.Tensor, negatives: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
        total = positives.new_zeros(())
        for start in range(0, positives.numel(), _GLOBAL_BLOCK):
            block = positives[start:start + _GLOBAL_BLOCK]
            total += F.softplus((negatives.unsqueeze(0) - block.unsqueeze(1)) / temperature).sum()
        ctx.save_for_backward(positives, negatives, temperature)
        return total / (positives.numel() * negatives.numel())

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        positives, negatives, temperature = ctx.saved_tensors
        scale = grad_output / (positives.numel() * negatives.numel())
        grad_positives = torch.empty_like(positives)
        grad_negatives = torch.zeros_like(negatives)
        grad_temperature = positives.new_zeros(())
        for start in range(0, positives.numel(), _GLOBAL_BLOCK):
            block = positives[start:start + _GLOBAL_BLOCK]
            x = (negatives.unsqueeze(0) - block.unsqueeze(1)) / temperature
            sig = torch.sigmoid(x)
            grad_positives[start:start + _GLOBAL_BLOCK] = -sig.sum(dim=1) / temperature
            grad_negatives += sig.sum(dim=0) / temperature
            grad_temperature -= (sig * x).sum() / temperature
        return grad_positives * scale, grad_negatives * scale, grad_temperature * scale


def mw_loss(scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, temperature: Temperature,
            pairs: str = "query") -> torch.Tensor:
    """Mann-Whitney (AUC) loss: mean ``softplus((s_n - s_p)/tau)`` over positive-negative pairs.

    ``pairs="query"`` pairs each target cell with its own query's negative cells; ``"global"`` pairs it
    with every negative cell of the batch (whichever query it belongs to), i.e. a batch-level AUC.
    """
    _check(scores, targets, negatives)
    if pairs not in MW_PAIRS:
        raise HardnegError(f"mw loss: pairs must be one of {', '.join(MW_PAIRS)}, got {pairs!r}")
    scores = scores.float()
    negatives = negatives & ~targets
    if pairs == "global":
        positive_scores, negative_scores = scores[targets], scores[negatives]
        if positive_scores.numel() == 0 or negative_scores.numel() == 0:
            return scores.sum() * 0.0
        tau = (temperature.to(scores.dtype) if isinstance(temperature, torch.Tensor)
               else torch.tensor(float(temperature), dtype=scores.dtype, device=scores.device))
        return _GlobalPairs.apply(positive_scores, negative_scores, tau)
    rows, cols = targets.nonzero(as_tuple=True)
    pair_mask = negatives[rows]                                   # [T, C]: the negatives of each cell's query
    count = pair_mask.sum()
    if count == 0:
        return scores.sum() * 0.0
    differences = (scores[rows] - scores[rows, cols].unsqueeze(1)) / temperature
    return (F.softplus(differences) * pair_mask).sum() / count


def combined(scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, temperature: Temperature,
             mw_weight: float = 1.0, pairs: str = "query", symmetric: bool = False) -> torch.Tensor:
    """``info_nce + mw_weight * mw_loss`` with the same temperature."""
    return (info_nce(scores, targets, negatives, temperature, symmetric=symmetric)
            + mw_weight * mw_loss(scores, targets, negatives, temperature, pairs=pairs))


# ---------------------------------------------------------------------------------------------- modules

class LearnableTemperature(torch.nn.Module):
    """A temperature trained with the model, parametrised by ``log tau`` (positive, scale-free steps).

    Clamped to ``[minimum, maximum]`` in the forward pass so a large step cannot make the logits explode.
    """

    def __init__(self, initial: float = 0.05, minimum: float = 1e-3, maximum: float = 1.0) -> None:
        super().__init__()
        if not minimum <= initial <= maximum:
            raise HardnegError(f"temperature {initial} is outside [{minimum}, {maximum}]")
        self.log_temperature = torch.nn.Parameter(torch.tensor(math.log(initial)))
        self.minimum, self.maximum = minimum, maximum

    def forward(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(self.minimum, self.maximum)


class RetrievalLoss(torch.nn.Module):
    """Base of the loss modules: holds the (fixed or learnable) temperature; ``forward(scores, targets, negatives)``."""

    name = ""

    def __init__(self, temperature: float = 0.05, learn_temperature: bool = False) -> None:
        super().__init__()
        if not temperature > 0:
            raise HardnegError(f"loss {self.name}: temperature must be positive, got {temperature}")
        self.learnable = LearnableTemperature(temperature) if learn_temperature else None
        self.fixed_temperature = float(temperature)

    @property
    def temperature(self) -> Temperature:
        return self.learnable() if self.learnable is not None else self.fixed_temperature

    def forward(self, scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class InfoNCELoss(RetrievalLoss):
    name = "infonce"

    def __init__(self, temperature: float = 0.05, learn_temperature: bool = False, symmetric: bool = False) -> None:
        super().__init__(temperature, learn_temperature)
        self.symmetric = bool(symmetric)

    def forward(self, scores, targets, negatives):
        return info_nce(scores, targets, negatives, self.temperature, symmetric=self.symmetric)


class MWLoss(RetrievalLoss):
    name = "mw"

    def __init__(self, temperature: float = 0.05, learn_temperature: bool = False, pairs: str = "query") -> None:
        super().__init__(temperature, learn_temperature)
        if pairs not in MW_PAIRS:
            raise HardnegError(f"loss mw: pairs must be one of {', '.join(MW_PAIRS)}, got {pairs!r}")
        self.pairs = pairs

    def forward(self, scores, targets, negatives):
        return mw_loss(scores, targets, negatives, self.temperature, pairs=self.pairs)


class DecoupledSoftmaxLoss(RetrievalLoss):
    name = "decoupled"

    def forward(self, scores, targets, negatives):
        return decoupled_softmax(scores, targets, negatives, self.temperature)


class CombinedLoss(RetrievalLoss):
    name = "combined"

    def __init__(self, temperature: float = 0.05, learn_temperature: bool = False, mw_weight: float = 1.0,
                 pairs: str = "query", symmetric: bool = False) -> None:
        super().__init__(temperature, learn_temperature)
        if not mw_weight >= 0:
            raise HardnegError(f"loss combined: mw_weight must be >= 0, got {mw_weight}")
        if pairs not in MW_PAIRS:
            raise HardnegError(f"loss combined: pairs must be one of {', '.join(MW_PAIRS)}, got {pairs!r}")
        self.mw_weight, self.pairs, self.symmetric = float(mw_weight), pairs, bool(symmetric)

    def forward(self, scores, targets, negatives):
        return combined(scores, targets, negatives, self.temperature, mw_weight=self.mw_weight, pairs=self.pairs,
                        symmetric=self.symmetric)


def distillation(scores: torch.Tensor, teacher: torch.Tensor, scored: torch.Tensor, targets: torch.Tensor,
                 temperature: Temperature, teacher_temperature: float, form: str = "kl") -> torch.Tensor:
    """The distillation term over the teacher-scored cells (see the module docstring); 0 when nothing is scored."""
    if form not in DISTILL_FORMS:
        raise HardnegError(f"unknown distillation form {form!r}; choose one of {', '.join(DISTILL_FORMS)}")
    if teacher.shape != scores.shape or scored.shape != scores.shape:
        raise ValueError(f"teacher {tuple(teacher.shape)} and scored {tuple(scored.shape)} must match the scores "
                         f"{tuple(scores.shape)}")
    student = scores.float() / temperature
    reference = torch.where(scored, teacher.float(), torch.zeros_like(student)) / teacher_temperature
    if form == "kl":
        rows = scored.sum(dim=1) >= 2
        if not rows.any():
            return student.sum() * 0.0
        student, reference, mask = student[rows], reference[rows], scored[rows]
        log_student = student.masked_fill(~mask, float("-inf")).log_softmax(dim=1)
        log_teacher = reference.masked_fill(~mask, float("-inf")).log_softmax(dim=1)
        terms = torch.where(mask, log_teacher.exp() * (log_teacher - log_student), torch.zeros_like(student))
        return terms.sum(dim=1).mean()
    pairs = (scored & targets).unsqueeze(2) & (scored & ~targets).unsqueeze(1)   # [Q, positive, negative]
    if not pairs.any():
        return student.sum() * 0.0
    gaps = (student.unsqueeze(2) - student.unsqueeze(1)) - (reference.unsqueeze(2) - reference.unsqueeze(1))
    return gaps.pow(2)[pairs].mean()


class DistilledLoss(torch.nn.Module):
    """``contrastive + weight x kd``, or ``kd`` alone when ``contrastive`` is None.

    The distillation uses the contrastive loss's (possibly learnable) temperature for the student, so both
    terms score the same logits; ``teacher_temperature`` (default: the student's initial one) scales the teacher.
    """

    def __init__(self, contrastive: RetrievalLoss | None, *, weight: float = 1.0, form: str = "kl",
                 temperature: float = 0.05, learn_temperature: bool = False,
                 teacher_temperature: float | None = None) -> None:
        super().__init__()
        if form not in DISTILL_FORMS:
            raise HardnegError(f"unknown distillation form {form!r}; choose one of {', '.join(DISTILL_FORMS)}")
        if not weight >= 0:
            raise HardnegError(f"distillation weight must be >= 0, got {weight}")
        self.contrastive = contrastive
        self.alone = RetrievalLoss(temperature, learn_temperature) if contrastive is None else None
        self.weight, self.form = float(weight), form
        self.teacher_temperature = float(teacher_temperature if teacher_temperature is not None else temperature)

    @property
    def temperature(self) -> Temperature:
        return (self.contrastive if self.contrastive is not None else self.alone).temperature

    def forward(self, scores: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor,
                teacher: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        kd = distillation(scores, teacher, scored, targets, self.temperature, self.teacher_temperature, self.form)
        if self.contrastive is None:
            return kd
        return self.contrastive(scores, targets, negatives) + self.weight * kd


LOSSES: dict[str, type[RetrievalLoss]] = {cls.name: cls for cls in
                                          (InfoNCELoss, MWLoss, DecoupledSoftmaxLoss, CombinedLoss)}
LOSS_FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {"infonce": info_nce, "mw": mw_loss,
                                                          "decoupled": decoupled_softmax, "combined": combined}


def make_loss(name: str, **params) -> RetrievalLoss:
    """The loss module ``name`` with ``params``; unknown names or parameters are refused with the choices.

    Parameters: all losses take ``temperature`` (default 0.05) and ``learn_temperature`` (False);
    ``infonce`` takes ``symmetric``; ``mw`` takes ``pairs`` ("query" | "global"); ``combined`` takes
    ``mw_weight``, ``pairs`` and ``symmetric``.
    """
    if name not in LOSSES:
        raise HardnegError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    cls = LOSSES[name]
    accepted = [p for p in cls.__init__.__code__.co_varnames[1:cls.__init__.__code__.co_argcount]]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise HardnegError(f"loss {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                           f"it takes {', '.join(accepted)}")
    return cls(**params)
