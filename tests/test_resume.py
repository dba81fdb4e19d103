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


def test_keep_best_keeps_the_model_of_the_best_dev_score(small, tiny_model, demo_test, tmp_path):
    data, pools = small
    queries = sorted(demo_test.qrels)[:20]
    judged = {d for q in queries for d in demo_test.qrels[q]}
    keep = [i for i, d in enumerate(demo_test.corpus.ids) if i < 300 or d in judged]
    corpus = Corpus([demo_test.corpus.ids[i] for i in keep], [demo_test.corpus.titles[i] for i in keep],
                    [demo_test.corpus.bodies[i] for i in keep])
    dev = replace(demo_test, corpus=corpus, qrels={q: demo_test.qrels[q] for q in queries},
                  queries={q: demo_test.queries[q] for q in queries})

    def ndcg(model) -> float:
        return evaluate(dev, DenseRetriever(model, show_progress=False), metrics=("nDCG@10",), depth=100
                        )["metrics"]["nDCG@10"]

    config = _config(tiny_model, eval_steps=2, save_steps=2, save_total_limit=None, learning_rate=5e-3, epochs=2)
    summary = train(pools, data.corpus, config, tmp_path / "run", show_progress=False, evaluator=ndcg).summary
    scored = [(r["step"], r["dev"]) for r in _log(tmp_path / "run") if "dev" in r]
    assert [s for s, _ in scored] == [2, 4, 6]
    best_step, best_score = max(scored, key=lambda item: (item[1], -item[0]))
    assert summary["best_step"] == best_step and summary["best_dev"] == pytest.approx(best_score, abs=1e-6)
    best = _weights(tmp_path / "run" / MODEL_DIR)
    at_step = _weights(tmp_path / "run" / "checkpoints" / f"step-{best_step:07d}" / "model")
    assert all(torch.equal(best[name], at_step[name]) for name in best)
    from retriever.encoder import DualEncoder

    assert ndcg(DualEncoder.load(tmp_path / "run" / MODEL_DIR)) == pytest.approx(best_score, abs=1e-6)
