"""Gradient caching gives the parameter gradients of one autograd graph over the batch, dropout on.

Every test runs on the CPU, and again on the GPU where CUDA is present (fp16 with a loss scaler there too).
"""

from __future__ import annotations

import pytest
import torch

from retriever.encoder import DualEncoder
from retriever.gradcache import encode_and_backward
from retriever.io import HardnegError
from retriever.losses import build_masks, make_loss

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(scope="module")
def cpu_batch(demo_train):
    """10 queries with 1-3 positives each and 1 hard negative, drawn from the demo qrels (varied lengths)."""
    queries, documents, positive_ids, column_ids, targets = [], [], [], [], []
    query_ids = [q for q in demo_train.queries if len(demo_train.relevant(q)) >= 3][:10]
    for query_id in query_ids:
        relevant = sorted(demo_train.relevant(query_id))
        chosen = relevant[:1 + len(queries) % 3]
        queries.append(demo_train.queries[query_id])
        positive_ids.append(set(relevant))
        targets.append(list(range(len(column_ids), len(column_ids) + len(chosen))))
        column_ids.extend(chosen)
    for i in range(len(queries)):
        negative = next(d for d in demo_train.corpus.ids[37 * i:] if d not in positive_ids[i])
        column_ids.append(negative)
    documents = [demo_train.corpus.text_of(d) for d in column_ids]
    mask_targets, mask_negatives = build_masks(positive_ids, column_ids, targets)
    return queries, documents, mask_targets, mask_negatives


@pytest.fixture(params=DEVICES)
def model(tiny_model, request):
    encoder = DualEncoder.load(tiny_model, device=request.param, max_length=64)
    assert encoder.model.config.hidden_dropout_prob == 0.1 and encoder.model.config.attention_probs_dropout_prob > 0
    encoder.train()  # dropout ON
    return encoder


@pytest.fixture
def batch(cpu_batch, model):
    queries, documents, targets, negatives = cpu_batch
    return queries, documents, targets.to(model.device), negatives.to(model.device)


def _gradients(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def _reference(model, queries, documents, loss_fn, chunk_size, autocast=None, scale=None):
    """Plain autograd over the same chunked forwards (same dropout draws), one backward: no caching.

    Under autocast each chunk gets its own autocast region, as in the replay: inside one region the
    bf16 copy of a weight is cached and shared by all chunks, so its gradient would be summed in bf16
    across chunks (a 5-10 % error at temperature 0.05) instead of in float32 in ``.grad``.
    """
    def encode(texts, is_query):
        parts = []
        for i in range(0, len(texts), chunk_size):
            with torch.autocast(model.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                parts.append(model(model.tokenize(texts[i:i + chunk_size], is_query=is_query)))
        return torch.cat(parts)

    query_embeddings, document_embeddings = encode(queries, True), encode(documents, False)
    loss = loss_fn(query_embeddings.float(), document_embeddings.float())
    (loss * (scale or 1.0)).backward()   # scaled as the cached side is, so fp16 underflows alike
    return loss.detach()


def _compare(model, loss_module, batch, chunk_size, *, autocast=None, atol=1e-5, rtol=1e-4, norm_rtol=None,
             scale=None):
    queries, documents, targets, negatives = batch

    def loss_fn(q, d):
        return loss_module(q @ d.T, targets, negatives)

    model.zero_grad(set_to_none=True)
    loss_module.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    scaler = torch.amp.GradScaler(model.device.type, init_scale=scale) if scale else None
    cached = encode_and_backward(model, queries, documents, loss_fn, chunk_size=chunk_size, autocast=autocast,
                                 scaler=scaler)
    cached_grads = {k: v / (scale or 1.0) for k, v in _gradients(model).items()}
    cached_grads |= {"loss." + k: v / (scale or 1.0) for k, v in _gradients(loss_module).items()}
    model.zero_grad(set_to_none=True)
    loss_module.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    expected = _reference(model, queries, documents, loss_fn, chunk_size, autocast, scale)
    expected_grads = {k: v / (scale or 1.0) for k, v in _gradients(model).items()}
    expected_grads |= {"loss." + k: v / (scale or 1.0) for k, v in _gradients(loss_module).items()}
    assert cached.item() == pytest.approx(expected.item(), rel=1e-6 if autocast is None else 1e-3)
    assert cached_grads.keys() == expected_grads.keys() and len(cached_grads) > 20
    for name, grad in expected_grads.items():
        if norm_rtol is not None:
            error = (cached_grads[name] - grad).norm() / grad.norm()
            assert error <= norm_rtol, f"{name}: relative error {error:.2e}"
        else:
            torch.testing.assert_close(cached_grads[name], grad, atol=atol, rtol=rtol,
                                       msg=lambda m, n=name: f"{n}: {m}")
    return cached_grads


LOSS_SETTINGS = [("infonce", {"learn_temperature": True}), ("infonce", {"symmetric": True}),
                 ("mw", {}), ("mw", {"pairs": "global", "learn_temperature": True}),
                 ("decoupled", {"learn_temperature": True})]


@pytest.mark.parametrize("name,params", LOSS_SETTINGS, ids=[f"{n}-{'-'.join(p)}" for n, p in LOSS_SETTINGS])
def test_cached_gradients_equal_the_full_graph_with_dropout(model, batch, name, params):
    loss_module = make_loss(name, temperature=0.05, **params)
    grads = _compare(model, loss_module, batch, chunk_size=4)   # 10 queries, 26 documents: ragged last chunks
    if params.get("learn_temperature"):
        assert grads["loss.learnable.log_temperature"].abs() > 0


def test_dropout_is_replayed_not_redrawn(model, batch):
    """Without replaying the RNG state the second pass draws other masks and the gradients differ."""
    queries, documents, targets, negatives = batch
    loss_module = make_loss("infonce")
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    encode_and_backward(model, queries, documents, lambda q, d: loss_module(q @ d.T, targets, negatives),
                        chunk_size=4)
    replayed = _gradients(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(321)
    _reference(model, queries, documents, lambda q, d: loss_module(q @ d.T, targets, negatives), 4)
    other = _gradients(model)
    assert any(not torch.allclose(replayed[k], other[k], atol=1e-5) for k in replayed)


def test_cached_equals_one_unchunked_pass_without_dropout(model, batch):
    """With dropout off, chunking changes nothing: cached == one forward of the whole batch."""
    queries, documents, targets, negatives = batch
    model.eval()
    loss_module = make_loss("decoupled")

    def loss_fn(q, d):
        return loss_module(q @ d.T, targets, negatives)

    model.zero_grad(set_to_none=True)
    whole = encode_and_backward(model, queries, documents, loss_fn, chunk_size=None)
    expected = _gradients(model)
    model.zero_grad(set_to_none=True)
    cached = encode_and_backward(model, queries, documents, loss_fn, chunk_size=3)
    assert cached.item() == pytest.approx(whole.item(), rel=1e-5)
    for name, grad in _gradients(model).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_cached_gradients_under_bf16_autocast(model, batch):
    """bf16 autocast: each gradient tensor within 1e-4 of its norm (measured on CPU: ~3e-6).

    Not bitwise: with several threads the CPU bf16 kernels' accumulation order varies between runs.
    """
    _compare(model, make_loss("infonce"), batch, chunk_size=4, autocast=torch.bfloat16, norm_rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["infonce", "mw", "decoupled"])
def test_cached_gradients_under_cuda_fp16_autocast_with_a_loss_scaler(tiny_model, cpu_batch, name):
    """fp16 on CUDA, as the trainer runs it: autocast plus a GradScaler; unscaled gradients match the graph."""
    model = DualEncoder.load(tiny_model, device="cuda", max_length=64)
    model.train()
    queries, documents, targets, negatives = cpu_batch
    batch = queries, documents, targets.cuda(), negatives.cuda()
    _compare(model, make_loss(name), batch, chunk_size=4, autocast=torch.float16, norm_rtol=2e-3, scale=2.0**10)


def test_grad_scaler_scales_the_parameter_gradients(model, batch):
    queries, documents, targets, negatives = batch
    loss_module = make_loss("mw")

    def loss_fn(q, d):
        return loss_module(q @ d.T, targets, negatives)

    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    plain = encode_and_backward(model, queries, documents, loss_fn, chunk_size=5)
    expected = _gradients(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    scaler = torch.amp.GradScaler(model.device.type, init_scale=1024.0)
    scaled = encode_and_backward(model, queries, documents, loss_fn, chunk_size=5, scaler=scaler)
    assert scaled.item() == pytest.approx(plain.item(), rel=1e-6)
    for name, grad in _gradients(model).items():
        torch.testing.assert_close(grad / 1024.0, expected[name], atol=1e-7, rtol=1e-5, msg=name)


def test_rng_continues_as_after_one_pass(model, batch):
    """After the replay the generator is where one ordinary pass leaves it, so later draws are unchanged."""
    queries, documents, targets, negatives = batch
    loss_module = make_loss("infonce")

    def loss_fn(q, d):
        return loss_module(q @ d.T, targets, negatives)

    torch.manual_seed(9)
    encode_and_backward(model, queries, documents, loss_fn, chunk_size=4)
    after_cached = torch.rand(3, device=model.device)   # dropout draws from the generator of the model's device
    torch.manual_seed(9)
    _reference(model, queries, documents, loss_fn, 4)
    after_plain = torch.rand(3, device=model.device)
    torch.testing.assert_close(after_cached, after_plain, rtol=0, atol=0)


def test_bad_chunk_size_is_refused(model, batch):
    queries, documents, targets, negatives = batch
    with pytest.raises(HardnegError, match="chunk size"):
        encode_and_backward(model, queries, documents, lambda q, d: (q @ d.T).sum(), chunk_size=0)


class _WithTeacher(torch.nn.Module):
    """A distilled loss with the batch's teacher scores fixed, in the (scores, targets, negatives) form."""

    def __init__(self, loss: torch.nn.Module, teacher: torch.Tensor, scored: torch.Tensor) -> None:
        super().__init__()
        self.loss, self.teacher, self.scored = loss, teacher, scored

    def forward(self, scores, targets, negatives):
        return self.loss(scores, targets, negatives, self.teacher, self.scored)


@pytest.mark.parametrize("contrastive, form, every_cell", [("infonce", "kl", False), ("decoupled", "margin-mse", False),
                                                           (None, "kl", False), ("infonce", "kl", True)])
def test_cached_gradients_equal_the_full_graph_with_distillation(model, batch, contrastive, form, every_cell):
    """``every_cell``: the teacher scores the whole batch (``distill_scope="batch"``), not the pools' cells."""
    from retriever.losses import DistilledLoss

    _, _, targets, negatives = batch
    generator = torch.Generator().manual_seed(7)
    teacher = (torch.rand(targets.shape, generator=generator) * 0.6).to(targets.device)
    scored = targets | (negatives & (torch.rand(targets.shape, generator=generator) < 0.5).to(targets.device))
    if every_cell:
        scored = torch.ones_like(targets)
    inner = make_loss(contrastive, temperature=0.05, learn_temperature=True) if contrastive else None
    loss = DistilledLoss(inner, weight=0.5, form=form, temperature=0.05, learn_temperature=True,
                         teacher_temperature=0.1)
    grads = _compare(model, _WithTeacher(loss, teacher, scored), batch, chunk_size=4)
    assert any(name.endswith("log_temperature") and grad.abs() > 0 for name, grad in grads.items())
