"""Checkpoints: an interrupted run resumes to the same weights, bad resumes are refused, NaN keeps the last
good checkpoint, keep-best keeps the model of the best dev score."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import Crash, crash_after
from safetensors.torch import load_file

from eval.evaluate import evaluate
from mining.mine import mine
from retriever.checkpoint import STATE_FILE, checkpoint_dirs
from retriever.data import Corpus
from retriever.dense import DenseRetriever
from retriever.encoder import DualEncoder
from retriever.io import HardnegError
from retriever.train import MODEL_DIR, TRAIN_LOG, TrainConfig, train


@pytest.fixture(scope="module")
def small(demo_train):
    keep = sorted(demo_train.qrels)[:20]
    data = replace(demo_train, qrels={q: demo_train.qrels[q] for q in keep},
                   queries={q: demo_train.queries[q] for q in keep})
    return data, mine(data, "bm25", depth=20, num_negatives=4).pools


def _config(model, **changes) -> TrainConfig:
    # 20 queries / batch 8 = 3 steps per epoch (the last one short); dropout on; learnable temperature.
    base = TrainConfig(model=str(model), epochs=2, batch_size=8, learning_rate=2e-3, warmup_ratio=0.2,
                       positives_per_query=2, negatives_per_query=2, max_length=32, seed=5,
                       learnable_temperature=True, save_steps=2)
    return replace(base, **changes)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / TRAIN_LOG).read_text().splitlines()]


def _killed_after(last_step: int, pools, corpus, config: TrainConfig, output: Path) -> dict[int, list[str]]:
    """Train into ``output`` until ``last_step``, then die; the checkpoints on disk after each step."""
    seen: dict[int, list[str]] = {}

    def look_then_die(step: int, model) -> None:
        seen[step] = [p.name for p in checkpoint_dirs(output)]
        if step == last_step:
            raise Crash(f"killed after step {step}")

    with pytest.raises(Crash):
        train(pools, corpus, config, output, show_progress=False, on_step=look_then_die)
    return seen


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(small, tiny_model, tmp_path):
    data, pools = small
    config = _config(tiny_model)
    train(pools, data.corpus, config, tmp_path / "whole", show_progress=False)

    # Killed after step 3: step 3's work is lost, the checkpoint of step 2 survives; resume crosses the
    # epoch boundary (steps 3 and 4) with the data order, RNG, optimizer and temperature restored.
    with pytest.raises(Crash):
        train(pools, data.corpus, config, tmp_path / "cut", show_progress=False, on_step=crash_after(3))
    assert [p.name for p in checkpoint_dirs(tmp_path / "cut")] == ["step-0000002"]
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    summary = train(pools, data.corpus, config, tmp_path / "cut", show_progress=False, resume="latest").summary
    assert summary["resumed_from"].endswith("step-0000002") and summary["steps"] == 6

    whole, resumed = _weights(tmp_path / "whole" / MODEL_DIR), _weights(tmp_path / "cut" / MODEL_DIR)
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name  # bit-identical on CPU
    timing = ("examples_per_s",)
    assert [{k: v for k, v in r.items() if k not in timing} for r in _log(tmp_path / "whole")] == \
        [{k: v for k, v in r.items() if k not in timing} for r in _log(tmp_path / "cut")]
    # a checkpoint holds everything needed to go on
    state = torch.load(checkpoint_dirs(tmp_path / "cut")[-1] / STATE_FILE, weights_only=True)
    assert {"optimizer", "scheduler", "loss", "rng", "step", "epoch", "log", "best"} <= set(state)
    assert {"python", "numpy", "torch", "cuda"} <= set(state["rng"][0])


def test_without_save_steps_a_killed_run_still_resumes_from_its_last_epoch(small, tiny_model, tmp_path):
    """The default safety net: one checkpoint at each epoch end but the last, replacing the one before; a run
    killed in epoch 3 resumes from the end of epoch 2 to the uninterrupted run's weights; a finished run keeps
    no checkpoint (its model folder is the result)."""
    data, pools = small
    config = _config(tiny_model, epochs=3, save_steps=None)  # 3 steps per epoch
    train(pools, data.corpus, config, tmp_path / "whole", show_progress=False)
    assert not (tmp_path / "whole" / "checkpoints").exists()

    seen = _killed_after(8, pools, data.corpus, config, tmp_path / "cut")  # in epoch 3
    assert seen[3] == [] and seen[4] == ["step-0000003"] and seen[7] == ["step-0000006"]
    with pytest.raises(HardnegError, match="already holds checkpoints.*--resume latest"):
        train(pools, data.corpus, config, tmp_path / "cut", show_progress=False)
    summary = train(pools, data.corpus, config, tmp_path / "cut", show_progress=False, resume="latest").summary
    assert summary["resumed_from"].endswith("step-0000006") and summary["steps"] == 9
    assert not (tmp_path / "cut" / "checkpoints").exists()
    whole, resumed = _weights(tmp_path / "whole" / MODEL_DIR), _weights(tmp_path / "cut" / MODEL_DIR)
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_inside_a_long_epoch_the_safety_net_lands_every_half_hour(small, tiny_model, tmp_path, monkeypatch):
    """A CPU epoch can take hours: without save_steps, a checkpoint also lands inside an epoch once
    SAFETY_NET_SECONDS have passed since the last (0 here: after every step), replacing the one before; a run
    killed mid-epoch resumes from it to the uninterrupted run's weights."""
    import retriever.train

    data, pools = small
    config = _config(tiny_model, epochs=3, save_steps=None)  # 3 steps per epoch
    train(pools, data.corpus, config, tmp_path / "whole", show_progress=False)
    monkeypatch.setattr(retriever.train, "SAFETY_NET_SECONDS", 0)
    seen = _killed_after(5, pools, data.corpus, config, tmp_path / "cut")  # in the middle of epoch 2
    assert seen == {1: ["step-0000001"], 2: ["step-0000002"], 3: ["step-0000002"], 4: ["step-0000004"],
                    5: ["step-0000005"]}  # step 3 ends epoch 1: its net is written after the step's callback
    summary = train(pools, data.corpus, config, tmp_path / "cut", show_progress=False, resume="latest").summary
    assert summary["resumed_from"].endswith("step-0000005") and summary["steps"] == 9
    assert not (tmp_path / "cut" / "checkpoints").exists()
    whole, resumed = _weights(tmp_path / "whole" / MODEL_DIR), _weights(tmp_path / "cut" / MODEL_DIR)
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_the_safety_net_never_removes_the_checkpoints_the_user_asked_for(small, tiny_model, tmp_path):
    """A run saved every 2 steps, killed, resumed without save_steps: its own checkpoints stay, the end-of-epoch
    ones the resumed part writes go."""
    data, pools = small
    config = _config(tiny_model, epochs=3, save_steps=2)
    with pytest.raises(Crash):
        train(pools, data.corpus, config, tmp_path / "run", show_progress=False, on_step=crash_after(4))
    seen: dict[int, list[str]] = {}

    def look(step: int, model) -> None:
        seen[step] = [p.name for p in checkpoint_dirs(tmp_path / "run")]

    train(pools, data.corpus, replace(config, save_steps=None), tmp_path / "run", show_progress=False,
          resume="latest", on_step=look)
    assert seen[7] == ["step-0000002", "step-0000004", "step-0000006"]  # the end of epoch 2 added
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-0000002", "step-0000004"]


def test_resume_is_refused_for_another_model_or_other_settings(small, tiny_model, tmp_path, tmp_path_factory,
                                                                demo_train):
    from conftest import build_tiny_bert

    data, pools = small
    config = _config(tiny_model, epochs=1)
    with pytest.raises(Crash):
        train(pools, data.corpus, config, tmp_path / "run", show_progress=False, on_step=crash_after(2))
    other_model = build_tiny_bert(tmp_path_factory.mktemp("other-bert"), demo_train.corpus.texts()[:200], seed=1)
    refusals = [
        (replace(config, model=str(other_model)), pools, "config.model: checkpoint has"),
        (replace(config, loss="mw"), pools, "config.loss: checkpoint has 'infonce', this run has 'mw'"),
        (replace(config, batch_size=4), pools, "config.batch_size"),
        (config, pools[:-1], "pools: checkpoint has"),
    ]
    for changed, changed_pools, message in refusals:
        with pytest.raises(HardnegError, match="cannot resume from .*belongs to a different run") as error:
            train(changed_pools, data.corpus, changed, tmp_path / "run", show_progress=False, resume="latest")
        assert message in str(error.value)
    # a fresh run into a folder holding checkpoints would mix two runs
    with pytest.raises(HardnegError, match="already holds checkpoints"):
        train(pools, data.corpus, config, tmp_path / "run", show_progress=False)
    # how often to save and the cache chunk may change on resume
    train(pools, data.corpus, replace(config, save_steps=1, cache_chunk=4), tmp_path / "run",
          show_progress=False, resume=checkpoint_dirs(tmp_path / "run")[-1])
    with pytest.raises(HardnegError, match="not a checkpoint folder"):
        train(pools, data.corpus, config, tmp_path / "x", show_progress=False, resume=tmp_path / "nowhere")


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(small, tiny_model, tmp_path):
    data, pools = small
    config = _config(tiny_model)

    def poison(step: int, model) -> None:  # after step 3 the weights go bad, so step 4's loss is NaN
        if step == 3:
            with torch.no_grad():
                model.model.embeddings.word_embeddings.weight.fill_(float("nan"))

    with pytest.raises(HardnegError, match=r"loss is nan at step 4 \(epoch 1, batch 0 of the epoch, queries "
                                           r".*last good checkpoint is .*step-0000002") as error:
        train(pools, data.corpus, config, tmp_path / "run", show_progress=False, on_step=poison)
    assert "stopped without updating the model" in str(error.value)
    kept = checkpoint_dirs(tmp_path / "run")
    assert [p.name for p in kept] == ["step-0000002"]
    assert all(torch.isfinite(t).all() for t in _weights(kept[0] / "model").values())
    assert not (tmp_path / "run" / "model.safetensors").exists()  # no final model from a bad state
    assert [r["step"] for r in _log(tmp_path / "run")] == [1, 2, 3]
    # and the run can go on from the good checkpoint
    summary = train(pools, data.corpus, config, tmp_path / "run", show_progress=False, resume="latest").summary
    assert summary["steps"] == 6 and math.isfinite(summary["final_loss"])


@pytest.fixture(scope="module")
def ndcg(demo_test):
    """nDCG@10 of a model on 20 demo test queries over 300 documents plus their judged ones: a real dev score."""
    queries = sorted(demo_test.qrels)[:20]
    judged = {d for q in queries for d in demo_test.qrels[q]}
    keep = [i for i, d in enumerate(demo_test.corpus.ids) if i < 300 or d in judged]
    corpus = Corpus([demo_test.corpus.ids[i] for i in keep], [demo_test.corpus.titles[i] for i in keep],
                    [demo_test.corpus.bodies[i] for i in keep])
    dev = replace(demo_test, corpus=corpus, qrels={q: demo_test.qrels[q] for q in queries},
                  queries={q: demo_test.queries[q] for q in queries})

    def score(model) -> float:
        return evaluate(dev, DenseRetriever(model, show_progress=False), metrics=("nDCG@10",), depth=100
                        )["metrics"]["nDCG@10"]
    return score


def test_keep_best_keeps_the_model_of_the_best_dev_score(small, tiny_model, ndcg, tmp_path):
    data, pools = small
    config = _config(tiny_model, eval_steps=2, save_steps=2, save_total_limit=None, learning_rate=5e-3, epochs=2)
    summary = train(pools, data.corpus, config, tmp_path / "run", show_progress=False, evaluator=ndcg).summary
    scored = [(r["step"], r["dev"]) for r in _log(tmp_path / "run") if "dev" in r]
    assert [s for s, _ in scored] == [2, 4, 6]
    best_step, best_score = max(scored, key=lambda item: (item[1], -item[0]))
    assert summary["best_step"] == best_step and summary["best_dev"] == pytest.approx(best_score, abs=1e-6)
    best = _weights(tmp_path / "run" / MODEL_DIR)
    at_step = _weights(tmp_path / "run" / "checkpoints" / f"step-{best_step:07d}" / "model")
    assert all(torch.equal(best[name], at_step[name]) for name in best)
    assert ndcg(DualEncoder.load(tmp_path / "run" / MODEL_DIR)) == pytest.approx(best_score, abs=1e-6)


def test_the_log_on_disk_holds_each_dev_score_as_it_comes(small, tiny_model, ndcg, tmp_path):
    """A long run's dev scores can be read in logs/train_log.jsonl while it goes on, not only when it ends."""
    data, pools = small
    config = _config(tiny_model, eval_steps=2, save_steps=None, max_steps=4)
    on_disk: dict[int, list[dict] | None] = {}

    def look(step: int, model) -> None:
        on_disk[step] = _log(tmp_path / "run") if (tmp_path / "run" / TRAIN_LOG).is_file() else None

    train(pools, data.corpus, config, tmp_path / "run", show_progress=False, evaluator=ndcg, on_step=look)
    assert on_disk[1] is None  # nothing to report before the first evaluation
    for step in (2, 3):  # written at the evaluation of step 2, as it stood then
        assert [r["step"] for r in on_disk[step]] == [1, 2] and "dev" in on_disk[step][-1]
    assert [r["step"] for r in on_disk[4] if "dev" in r] == [2, 4]


def _brute_force_soup(checkpoints: dict[int, dict[str, torch.Tensor]], scores: dict[int, float], score_weights):
    """Greedy soup written out independently: ingredients by dev score (ties: earlier step), each added only if
    the plain mean of the chosen weights then scores strictly higher."""
    order = sorted(scores, key=lambda step: (-scores[step], step))
    chosen, best = [order[0]], scores[order[0]]
    for step in order[1:]:
        trial = [*chosen, step]
        mean = {name: torch.stack([checkpoints[s][name].double() for s in trial]).mean(0).float()
                for name in checkpoints[step] if checkpoints[step][name].is_floating_point()}
        value = score_weights(mean)
        if value > best:
            chosen, best = trial, value
    return chosen, best


def test_a_greedy_soup_beats_or_keeps_the_best_model_and_survives_a_resume(small, tiny_model, ndcg, tmp_path):
    """soup=3: the 3 best of 4 dev evaluations are the ingredients; the model saved is their greedy soup when it
    beats the best single model on dev (else that model), as an independent re-implementation over the
    checkpoints' weights finds; a run killed and resumed makes the same soup; the ingredients are removed."""
    data, pools = small
    config = _config(tiny_model, eval_steps=2, save_steps=2, save_total_limit=None, learning_rate=5e-3, epochs=3,
                     soup=3, max_steps=8)
    summary = train(pools, data.corpus, config, tmp_path / "run", show_progress=False, evaluator=ndcg).summary
    scored = {r["step"]: r["dev"] for r in _log(tmp_path / "run") if "dev" in r}
    assert sorted(scored) == [2, 4, 6, 8]
    ingredients = sorted(scored, key=lambda step: (-scored[step], step))[:3]
    checkpoints = {step: _weights(tmp_path / "run" / "checkpoints" / f"step-{step:07d}" / "model")
                   for step in ingredients}
    probe = DualEncoder.load(tmp_path / "run" / MODEL_DIR)

    def score_weights(weights):
        probe.model.load_state_dict({key.removeprefix("bert."): value for key, value in weights.items()},
                                    strict=False)
        return ndcg(probe)

    chosen, best = _brute_force_soup(checkpoints, {s: scored[s] for s in ingredients}, score_weights)
    made = summary["soup"]
    assert made["steps"] == chosen and len(made["tried"]) == 2
    assert made["kept"] == (len(chosen) > 1) and made["dev"] == pytest.approx(best, abs=1e-6)
    saved = _weights(tmp_path / "run" / MODEL_DIR)
    expected = {name: torch.stack([checkpoints[s][name].double() for s in chosen]).mean(0).float()
                for name in saved if saved[name].is_floating_point()}
    assert all(torch.allclose(saved[name], expected[name], atol=1e-6) for name in expected)
    assert ndcg(DualEncoder.load(tmp_path / "run" / MODEL_DIR)) == pytest.approx(best, abs=1e-6)
    assert not (tmp_path / "run" / "soup").exists()
    # killed after step 5: the ingredients of steps 2 and 4 are on disk; the resumed run adds 6 and 8
    with pytest.raises(Crash):
        train(pools, data.corpus, config, tmp_path / "cut", show_progress=False, evaluator=ndcg,
              on_step=crash_after(5))
    assert sorted(p.name for p in (tmp_path / "cut" / "soup").glob("*.pt")) == ["step-0000002.pt", "step-0000004.pt"]
    resumed = train(pools, data.corpus, config, tmp_path / "cut", show_progress=False, evaluator=ndcg,
                    resume="latest").summary
    assert resumed["soup"] == made
    again = _weights(tmp_path / "cut" / MODEL_DIR)
    assert all(torch.allclose(again[name], saved[name], atol=1e-6) for name in saved)


def test_greedy_soup_averages_in_only_what_raises_dev(tmp_path):
    """Four saved ingredients around a target, one far off: the soup takes the close ones (their mean is nearer
    the target than any one of them) and refuses the far one; the brute-force greedy agrees."""
    from retriever import soup

    target = torch.zeros(6)
    offsets = {2: torch.tensor([1.0, 0, 0, 0, 0, 0]), 4: torch.tensor([0, 1.1, 0, 0, 0, 0]),
               6: torch.tensor([0, 0, 1.2, 0, 0, 0]), 8: torch.full((6,), 5.0)}
    checkpoints = {}
    for step, offset in offsets.items():
        layer = torch.nn.Linear(6, 1, bias=False)
        with torch.no_grad():
            layer.weight.copy_((target + offset).unsqueeze(0))
        soup.save_ingredient(tmp_path, step, layer)
        checkpoints[step] = {name: tensor.clone() for name, tensor in layer.state_dict().items()}

    def score_weights(weights):
        return -float(torch.linalg.norm(weights["weight"] - target))

    scores = {step: score_weights(weights) for step, weights in checkpoints.items()}
    soup.prune(tmp_path, scores, 4)
    made = soup.greedy_soup(tmp_path, scores, score_weights)
    chosen, best = _brute_force_soup(checkpoints, scores, score_weights)
    assert made["steps"] == chosen == [2, 4, 6]
    assert made["dev"] == pytest.approx(best) and best > scores[2]
    assert torch.allclose(made["state"]["weight"], torch.stack([checkpoints[s]["weight"] for s in chosen]).mean(0))
    soup.prune(tmp_path, scores, 2)  # only the two best ingredients stay on disk
    assert sorted(p.name for p in (tmp_path / soup.SOUP_DIR).glob("*.pt")) == ["step-0000002.pt", "step-0000004.pt"]
    soup.drop_after(tmp_path, 2)
    assert [p.name for p in (tmp_path / soup.SOUP_DIR).glob("*.pt")] == ["step-0000002.pt"]


_PREEMPTED_RUN = """
import ast, os, signal, sys
from dataclasses import replace
from mining.mine import mine
from retriever.data import load_dataset
from retriever.train import TrainConfig, train
model, output = sys.argv[1], sys.argv[2]
data = load_dataset("nfcorpus-demo", "train")
keep = sorted(data.qrels)[:20]
data = replace(data, qrels={q: data.qrels[q] for q in keep}, queries={q: data.queries[q] for q in keep})
pools = mine(data, "bm25", depth=20, num_negatives=4).pools
config = TrainConfig(**ast.literal_eval(sys.argv[3]))

def preempt(step, model):  # the scheduler's SIGTERM, sent while step 5 is under way
    if step == 4:
        os.kill(os.getpid(), signal.SIGTERM)

train(pools, data.corpus, config, output, show_progress=False, on_step=preempt)
print("not stopped")
"""


@pytest.mark.slow
def test_a_stop_signal_ends_the_run_after_a_checkpoint_of_its_step(small, tiny_model, tmp_path):
    """A scheduler's SIGTERM (preemption, a time limit) mid-epoch: the step under way finishes, a checkpoint of it is
    written, and the process then ends by the signal as it would have (exit status -SIGTERM, no traceback). The
    resumed run reaches the uninterrupted run's weights, losing no step. In a real process: the default handler."""
    import os
    import signal
    import subprocess
    import sys

    data, pools = small
    changes = {"model": str(tiny_model), "epochs": 3, "batch_size": 8, "learning_rate": 2e-3, "warmup_ratio": 0.2,
               "positives_per_query": 2, "negatives_per_query": 2, "max_length": 32, "seed": 5,
               "learnable_temperature": True}
    config = TrainConfig(**changes)  # 3 steps per epoch, no save_steps: a safety net only at epoch ends
    before = signal.getsignal(signal.SIGTERM)
    train(pools, data.corpus, config, tmp_path / "whole", show_progress=False)
    assert signal.getsignal(signal.SIGTERM) is before  # training puts the handler back

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", _PREEMPTED_RUN, str(tiny_model), str(tmp_path / "cut"),
                           repr(changes)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == -signal.SIGTERM, done.stderr[-2000:]
    assert "not stopped" not in done.stdout and "Traceback" not in done.stderr
    assert "SIGTERM at step 5 of 9: checkpoint" in done.stderr and "--resume latest" in done.stderr
    assert [p.name for p in checkpoint_dirs(tmp_path / "cut")] == ["step-0000005"]  # epoch 1's net replaced
    summary = train(pools, data.corpus, config, tmp_path / "cut", show_progress=False, resume="latest").summary
    assert summary["resumed_from"].endswith("step-0000005") and summary["steps"] == 9
    whole, resumed = _weights(tmp_path / "whole" / MODEL_DIR), _weights(tmp_path / "cut" / MODEL_DIR)
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
