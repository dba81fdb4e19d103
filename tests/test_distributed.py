"""Two gloo processes with DDP and cross-device negatives give the gradients of one process on the whole batch."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from retriever import distributed
from retriever.encoder import DualEncoder
from retriever.gradcache import encode_and_backward
from retriever.io import HardnegError
from retriever.losses import build_masks, make_loss

WORLD = 2


@dataclass
class Example:
    query: str
    positives: list[tuple[str, str]]      # (doc id, text) trained on this step
    negative: tuple[str, str]
    positive_ids: set[str]


# (name, loss, parameters, chunk size, rank scores only its own query rows)
CASES = [
    ("infonce-symmetric", "infonce", {"symmetric": True, "learn_temperature": True}, None, False),
    ("infonce-symmetric-cached", "infonce", {"symmetric": True, "learn_temperature": True}, 2, False),
    ("mw-global-cached", "mw", {"pairs": "global", "learn_temperature": True}, 2, False),
    ("decoupled-cached", "decoupled", {}, 3, False),
    ("infonce-local-rows", "infonce", {}, None, True),
]


def _columns(examples: list[Example]) -> list[tuple[str, str]]:
    """A rank's document columns: the positives of its examples, then their hard negatives."""
    return [p for e in examples for p in e.positives] + [e.negative for e in examples]


def _global_batch(examples: list[Example], world: int):
    """Global column ids/texts (rank order), targets and negatives masks, as every rank builds them."""
    per_rank = [_columns(examples[distributed.shard(len(examples), r, world)]) for r in range(world)]
    column_ids, _ = distributed.global_columns([[doc_id for doc_id, _ in cols] for cols in per_rank])
    texts = [text for cols in per_rank for _, text in cols]
    targets, offset = [], 0
    for r in range(world):                  # examples are in rank order: rank r's columns start at `offset`
        local = examples[distributed.shard(len(examples), r, world)]
        start = offset
        for e in local:
            targets.append(list(range(start, start + len(e.positives))))
            start += len(e.positives)
        offset += len(per_rank[r])
    target_mask, negative_mask = build_masks([e.positive_ids for e in examples], column_ids, targets)
    return texts, target_mask, negative_mask


def _loss_gradients(model, loss_module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    grads |= {"loss." + n: p.grad.clone() for n, p in loss_module.named_parameters() if p.grad is not None}
    return grads


def _worker(rank: int, port: int, model_path: str, examples: list[Example], output: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    assert distributed.init_from_env()
    try:
        assert distributed.world_size() == WORLD and distributed.rank() == rank
        assert distributed.is_main() == (rank == 0)
        model = DualEncoder.load(model_path, device="cpu", max_length=32)
        model.eval()  # dropout off: the ranks' and the single process's dropout streams cannot coincide
        ddp = distributed.wrap_ddp(model)
        assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
        local = examples[distributed.shard(len(examples))]
        texts, targets, negatives = _global_batch(examples, WORLD)
        rows = distributed.shard(len(examples))
        for name, loss_name, params, chunk_size, local_rows in CASES:
            loss_module = make_loss(loss_name, temperature=0.05, **params)
            if local_rows:
                scale = distributed.local_rows_scale(int(targets[rows].sum()), int(targets.sum()))

                def loss_fn(q, d, loss_module=loss_module, scale=scale):
                    scores = q @ distributed.all_gather_with_grad(d).T
                    return loss_module(scores, targets[rows], negatives[rows]) * scale
            else:
                def loss_fn(q, d, loss_module=loss_module):
                    all_q, all_d = distributed.gather_embeddings(q, d)
                    return loss_module(all_q @ all_d.T, targets, negatives)
            ddp.zero_grad(set_to_none=True)
            loss = encode_and_backward(ddp, [e.query for e in local], [t for _, t in _columns(local)], loss_fn,
                                       chunk_size=chunk_size)
            grads = _loss_gradients(model, loss_module)
            torch.save({"loss": distributed.all_reduce_mean(loss) if local_rows else loss.item(), "grads": grads},
                       os.path.join(output, f"{name}-{rank}.pt"))
    finally:
        distributed.cleanup()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def examples(demo_train) -> list[Example]:
    """5 examples (uneven shards 3 + 2), 1-2 positives each, a document shared across ranks."""
    query_ids = [q for q in demo_train.queries if len(demo_train.relevant(q)) >= 2][:5]
    text = demo_train.corpus.text_of
    result = []
    for i, query_id in enumerate(query_ids):
        relevant = sorted(demo_train.relevant(query_id))
        chosen = relevant[:1 + i % 2]
        negative = next(d for d in demo_train.corpus.ids[50 * i:] if d not in relevant)
        result.append(Example(demo_train.queries[query_id], [(d, text(d)) for d in chosen], (negative, text(negative)),
                              set(relevant)))
    result[4].negative = result[0].positives[0]   # a rank-1 column repeats a rank-0 positive
    result[4].positive_ids = result[4].positive_ids - {result[0].positives[0][0]}
    return result


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_on_the_whole_batch(tiny_model, examples, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")   # the workers are CPU/gloo processes, GPU or not
    mp.spawn(_worker, args=(_free_port(), str(tiny_model), examples, str(tmp_path)), nprocs=WORLD, join=True)

    model = DualEncoder.load(tiny_model, device="cpu", max_length=32)
    model.eval()
    texts, targets, negatives = _global_batch(examples, WORLD)
    assert targets.sum() > len(examples), "some query must have several positives"
    for name, loss_name, params, _, _ in CASES:
        loss_module = make_loss(loss_name, temperature=0.05, **params)
        model.zero_grad(set_to_none=True)
        loss = encode_and_backward(model, [e.query for e in examples], texts,
                                   lambda q, d, m=loss_module: m(q @ d.T, targets, negatives), chunk_size=None)
        expected = _loss_gradients(model, loss_module)
        for rank in range(WORLD):
            result = torch.load(tmp_path / f"{name}-{rank}.pt")
            assert result["loss"] == pytest.approx(loss.item(), rel=1e-5), (name, rank)
            assert result["grads"].keys() == expected.keys(), (name, rank)
            for key, grad in expected.items():
                torch.testing.assert_close(result["grads"][key], grad, atol=1e-5, rtol=1e-4,
                                           msg=lambda m, k=key, r=rank, c=name: f"{c} rank {r} {k}: {m}")
        if params.get("learn_temperature"):
            assert expected["loss.learnable.log_temperature"].abs() > 0


def test_single_process_helpers_are_no_ops():
    assert not distributed.init_from_env()
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    tensor = torch.randn(3, 2, requires_grad=True)
    assert distributed.all_gather_with_grad(tensor) is tensor
    assert distributed.all_reduce_mean(2.5) == 2.5


def test_shards_cover_the_batch_in_rank_order():
    for total in range(0, 12):
        for world in (1, 2, 3, 4):
            slices = [distributed.shard(total, r, world) for r in range(world)]
            covered = [i for s in slices for i in range(total)[s]]
            assert covered == list(range(total))
            assert max(len(range(total)[s]) for s in slices) - min(len(range(total)[s]) for s in slices) <= 1
    columns, offsets = distributed.global_columns([["a", "b"], ["c"], ["d", "e"]])
    assert columns == ["a", "b", "c", "d", "e"] and offsets == [0, 2, 3]


@pytest.mark.gpu
def test_a_process_without_a_gpu_of_its_own_is_refused(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))
    with pytest.raises(HardnegError, match="has no GPU"):
        distributed.device()


def _train_four_steps(rank: int, port: int, model_path: str, output: str, on_step) -> str | None:
    """A 4-step training run on this rank of a gloo group of WORLD processes; the message of the ``Crash`` that
    ended it early, if one did."""
    from conftest import Crash, small

    from mining.mine import mine
    from retriever.data import load_dataset
    from retriever.train import TrainConfig, train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    assert distributed.init_from_env()
    data = small(load_dataset("nfcorpus-demo", "train"), queries=16)
    pools = mine(data, "bm25", depth=10, num_negatives=2, show_progress=False).pools
    config = TrainConfig(model=model_path, epochs=1, batch_size=4, max_length=16, negatives_per_query=1)
    try:
        train(pools, data.corpus, config, output, show_progress=False, on_step=on_step)
    except Crash as crash:
        return str(crash)
    finally:
        distributed.cleanup()
    return None


def _spawn_or_fail(worker, model_path: Path, output: Path, hang: str) -> None:
    """``worker(rank, port, model_path, output)`` on WORLD processes. A rank left out of a collective hangs them
    all: the test fails after 2 minutes instead, saying where they hung."""
    context = mp.spawn(worker, args=(_free_port(), str(model_path), str(output)), nprocs=WORLD, join=False)
    for _ in range(240):
        if context.join(timeout=0.5):
            return
    for process in context.processes:
        process.kill()
    pytest.fail(f"the processes hung {hang}")


def _safety_net_worker(rank: int, port: int, model_path: str, output: str) -> None:
    """Rank 0's clock says a safety net is due after every step, rank 1's never: both must write it together
    (a checkpoint gathers every rank's RNG state), or the run would hang."""
    from conftest import crash_after

    import retriever.train

    retriever.train.SAFETY_NET_SECONDS = 0 if rank == 0 else 10**9
    _train_four_steps(rank, port, model_path, output, crash_after(2))


@pytest.mark.slow
def test_rank_0s_clock_decides_when_every_rank_writes_a_safety_net(tiny_model, tmp_path, monkeypatch):
    from retriever.checkpoint import checkpoint_dirs

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    _spawn_or_fail(_safety_net_worker, tiny_model, tmp_path / "run", "around a safety-net checkpoint")
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-0000002"]


def _stop_signal_worker(rank: int, port: int, model_path: str, output: str) -> None:
    """Only rank 0 is sent SIGTERM (after step 1): every rank takes part in the checkpoint of step 2, then ends by
    rank 0's signal. Each rank's handler from before training stands in for the default (ending the process)
    and leaves a mark."""
    import signal

    from conftest import Crash

    def ended(number, frame):
        raise Crash(signal.Signals(number).name)

    def preempt(step, model):
        if rank == 0 and step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, ended)
    ended_by = _train_four_steps(rank, port, model_path, output, preempt)
    if ended_by:
        (Path(output) / f"rank-{rank}-ended-by-{ended_by}").touch()


@pytest.mark.slow
def test_a_stop_signal_to_rank_0_checkpoints_on_every_rank_and_ends_them_all(tiny_model, tmp_path, monkeypatch):
    from retriever.checkpoint import checkpoint_dirs

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    _spawn_or_fail(_stop_signal_worker, tiny_model, tmp_path / "run", "after rank 0 was sent SIGTERM")
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-0000002"]
    assert sorted(p.name for p in (tmp_path / "run").glob("rank-*")) == [
        f"rank-{rank}-ended-by-SIGTERM" for rank in range(WORLD)]
