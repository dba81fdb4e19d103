"""Training: batches, masks, every loss learns, outputs, refusals; the CLI and a 2-process torchrun run."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from mining.mine import mine
from retriever.checkpoint import checkpoint_dirs, load_checkpoint_state
from retriever.data import Dataset, write_pools
from retriever.encoder import DualEncoder
from retriever.encoding import cpu_has_native_bf16, resolve_training_precision
from retriever.io import HardnegError
from retriever.losses import build_masks
from retriever.train import (
    LOSS_PLOT,
    MODEL_DIR,
    TRAIN_CONFIG,
    TRAIN_LOG,
    QueryExample,
    TrainConfig,
    batch_columns,
    epoch_batches,
    global_layout,
    rank_slices,
    train,
)

ROOT = Path(__file__).resolve().parents[1]


def _small(dataset: Dataset, queries: int = 24) -> Dataset:
    keep = sorted(dataset.qrels)[:queries]
    return replace(dataset, qrels={q: dataset.qrels[q] for q in keep}, queries={q: dataset.queries[q] for q in keep})


@pytest.fixture(scope="module")
def small(demo_train):
    data = _small(demo_train)
    return data, mine(data, "bm25", depth=20, num_negatives=4).pools


def _config(model, **changes) -> TrainConfig:
    base = TrainConfig(model=str(model), epochs=3, batch_size=8, learning_rate=2e-3, warmup_ratio=0.1,
                       positives_per_query=2, negatives_per_query=2, max_length=48, seed=1)
    return replace(base, **changes)


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / TRAIN_LOG).read_text().splitlines()]


# ------------------------------------------------------------------------------------------ batches

def test_epoch_batches_are_a_seeded_function_of_the_epoch(small):
    _, pools = small
    config = TrainConfig(batch_size=5, positives_per_query=2, negatives_per_query=2, seed=3)
    first, again = epoch_batches(pools, config, 0), epoch_batches(pools, config, 0)
    flat = [e for batch in first for e in batch]
    assert [(e.query_id, e.positives, e.negatives) for e in flat] == \
        [(e.query_id, e.positives, e.negatives) for batch in again for e in batch]
    assert [len(b) for b in first] == [5, 5, 5, 5, 4]
    assert sorted(e.query_id for e in flat) == sorted(p.query_id for p in pools)  # each query once per epoch
    other = [e for batch in epoch_batches(pools, config, 1) for e in batch]
    assert [(e.query_id, e.positives) for e in flat] != [(e.query_id, e.positives) for e in other]
    by_id = {p.query_id: p for p in pools}
    for example in flat:
        pool = by_id[example.query_id]
        assert len(example.positives) == min(2, len(pool.positives)) == len(set(example.positives))
        assert set(example.positives) <= example.positive_ids == {p.doc_id for p in pool.positives}
        assert set(example.negatives) <= {n.doc_id for n in pool.negatives}
        assert not set(example.negatives) & example.positive_ids


def _reference_masks(batch: list[QueryExample]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Loop reference: positives of every query first, then negatives; a cell is a negative iff the
    column's document is not a labelled positive of the row's query."""
    columns, owners = [], []
    for i, example in enumerate(batch):
        for doc_id in example.positives:
            columns.append(doc_id)
            owners.append(i)
    for example in batch:
        columns += example.negatives
        owners += [-1] * len(example.negatives)
    targets = torch.zeros(len(batch), len(columns), dtype=torch.bool)
    negatives = torch.zeros(len(batch), len(columns), dtype=torch.bool)
    for i, example in enumerate(batch):
        for j, doc_id in enumerate(columns):
            targets[i, j] = owners[j] == i
            negatives[i, j] = doc_id not in example.positive_ids
    return columns, targets, negatives


def test_multi_positive_batch_masks_never_make_a_labelled_positive_a_negative():
    batch = [QueryExample("q0", "a", ["d1", "d3"], ["d2", "d9"], frozenset({"d1", "d3", "d7"})),
             QueryExample("q1", "b", ["d3"], ["d1"], frozenset({"d3"})),           # q0's positive as a negative
             QueryExample("q2", "c", ["d1", "d7"], ["d4"], frozenset({"d1", "d7"})),  # duplicates of q0's positives
             QueryExample("q3", "d", ["d5"], [], frozenset({"d5"}))]
    queries, column_ids, target_columns = batch_columns(batch)
    assert queries == ["a", "b", "c", "d"]
    assert column_ids == ["d1", "d3", "d3", "d1", "d7", "d5", "d2", "d9", "d1", "d4"]
    assert target_columns == [[0, 1], [2], [3, 4], [5]]
    columns, expected_targets, expected_negatives = _reference_masks(batch)
    assert columns == column_ids
    targets, negatives = build_masks([e.positive_ids for e in batch], column_ids, target_columns)
    assert torch.equal(targets, expected_targets) and torch.equal(negatives, expected_negatives)
    # q0: both copies of d1 and d3 (one is q1's positive, one q2's) and q2's d7 are not negatives
    assert not negatives[0, [0, 1, 2, 3, 4, 8]].any() and negatives[0, [5, 6, 7, 9]].all()
    assert negatives[1, 0] and not negatives[1, 1] and not negatives[1, 2]

    # Split over 3 processes, the gathered layout is the same batch with the same masks.
    slices = rank_slices(batch, 3)
    assert [len(s) for s in slices] == [2, 1, 1]
    positive_ids, global_columns, global_targets = global_layout(slices)
    targets_3, negatives_3 = build_masks(positive_ids, global_columns, global_targets)
    assert global_columns == ["d1", "d3", "d3", "d2", "d9", "d1", "d1", "d7", "d4", "d5"]
    for i, example in enumerate(batch):
        assert [global_columns[j] for j in global_targets[i]] == example.positives
        for j, doc_id in enumerate(global_columns):
            assert negatives_3[i, j] == (doc_id not in example.positive_ids)
            assert targets_3[i, j] == (j in global_targets[i])


# --------------------------------------------------------------------------------------------- train

@pytest.mark.parametrize("loss, options", [("infonce", {"learnable_temperature": True}),
                                           ("mw", {"mw_pairs": "global"}),
                                           ("decoupled", {"cache_chunk": 5})])
def test_each_loss_trains(loss, options, small, tiny_model, tmp_path):
    data, pools = small
    config = _config(tiny_model, loss=loss, epochs=4, **options)
    summary = train(pools, data.corpus, config, tmp_path / loss, show_progress=False).summary
    log = _log(tmp_path / loss)
    assert len(log) == summary["steps"] == 4 * math.ceil(24 / 8)
    first, last = np.mean([r["loss"] for r in log[:3]]), np.mean([r["loss"] for r in log[-3:]])
    assert last < first * 0.93, (loss, first, last)
    if options.get("learnable_temperature"):
        assert log[-1]["temperature"] != pytest.approx(0.05, abs=1e-6)
        assert summary["final_temperature"] == log[-1]["temperature"]


def test_training_saves_a_loadable_model_and_is_reproducible(small, tiny_model, tmp_path):
    data, pools = small
    config = _config(tiny_model, warmup_ratio=0.3)
    train(pools, data.corpus, config, tmp_path / "a", show_progress=False)
    log = _log(tmp_path / "a")
    assert log[0]["lr"] < max(r["lr"] for r in log)  # warm-up
    assert {"loss", "lr", "grad_norm", "examples_per_s", "epoch"} <= set(log[0])
    assert (tmp_path / "a" / LOSS_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "a" / TRAIN_CONFIG).read_text())
    assert saved["config"]["loss"] == "infonce" and saved["library_versions"]["torch"]
    SentenceTransformer(str(tmp_path / "a" / MODEL_DIR), device="cpu")  # loads
    umask = os.umask(0)
    os.umask(umask)
    for file in (tmp_path / "a" / MODEL_DIR).rglob("*"):  # the user's umask, also for model.safetensors
        assert file.stat().st_mode & 0o777 == (0o777 if file.is_dir() else 0o666) & ~umask, file

    train(pools, data.corpus, config, tmp_path / "b", show_progress=False)
    texts = [data.corpus.text(i) for i in range(20)]
    a = DualEncoder.load(tmp_path / "a" / MODEL_DIR).encode(texts)
    assert np.array_equal(a, DualEncoder.load(tmp_path / "b" / MODEL_DIR).encode(texts))
    assert not np.allclose(a, DualEncoder.load(tiny_model, max_length=48).encode(texts), atol=1e-3)


def test_dropout_setting_trains_as_a_model_configured_without_dropout(small, tiny_model, tmp_path):
    """``train.dropout=0`` on a model whose config says 0.1 trains the same weights as the same model saved with
    dropout 0 in its config (the independent reference); without the setting the model's own dropout applies."""
    from transformers import AutoConfig, AutoModel

    data, pools = small
    undropped = tmp_path / "undropped"
    shutil.copytree(tiny_model, undropped)
    config = AutoConfig.from_pretrained(tiny_model)
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.1
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    AutoModel.from_pretrained(tiny_model, config=config).save_pretrained(undropped)
    runs = {"setting": (tiny_model, 0.0), "config": (undropped, None), "default": (tiny_model, None)}
    texts = [data.corpus.text(i) for i in range(20)]
    encoded = {}
    for name, (model, dropout) in runs.items():
        train(pools, data.corpus, _config(model, epochs=1, dropout=dropout),
              tmp_path / name, show_progress=False)
        encoded[name] = DualEncoder.load(tmp_path / name / MODEL_DIR).encode(texts)
    assert np.allclose(encoded["setting"], encoded["config"], atol=1e-6)
    assert not np.allclose(encoded["setting"], encoded["default"], atol=1e-4)
    saved = json.loads((tmp_path / "setting" / MODEL_DIR / "config.json").read_text())
    assert saved["hidden_dropout_prob"] == 0.1  # the model files keep their own configuration


def test_bf16_autocast_trains_on_cpu(small, tiny_model, tmp_path):
    data, pools = small
    summary = train(pools, data.corpus, _config(tiny_model, epochs=1, precision="bf16"), tmp_path / "m",
                    show_progress=False).summary
    assert summary["steps"] == 3 and math.isfinite(summary["final_loss"]) and summary["precision"] == "bf16"


def test_auto_precision_trains_in_what_the_hardware_runs_natively(small, tiny_model, tmp_path):
    data, pools = small
    summary = train(pools, data.corpus, _config(tiny_model, epochs=1, precision="auto"), tmp_path / "m",
                    show_progress=False).summary
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert summary["precision"] == expected == resolve_training_precision("auto", "cpu")
    assert json.loads((tmp_path / "m" / TRAIN_CONFIG).read_text())["summary"]["precision"] == expected


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_trains_on_cuda_with_the_gradient_cache(precision, small, tiny_model, tmp_path):
    """fp16 runs with a loss scaler (kept in the checkpoint); both lower the loss as fp32 does."""
    data, pools = small
    config = _config(tiny_model, epochs=4, precision=precision, cache_chunk=4, save_steps=6)
    summary = train(pools, data.corpus, config, tmp_path / "m", show_progress=False).summary
    log = _log(tmp_path / "m")
    assert summary["steps"] == 12 and all(math.isfinite(r["loss"]) for r in log)
    assert np.mean([r["loss"] for r in log[-3:]]) < np.mean([r["loss"] for r in log[:3]]) * 0.93
    state, _ = load_checkpoint_state(checkpoint_dirs(tmp_path / "m")[-1])
    assert (state["scaler"] is not None) == (precision == "fp16")


@pytest.mark.parametrize("changes, message", [
    ({"loss": "triplet"}, "unknown loss 'triplet'"),
    ({"cache_chunk": 9}, "cache_chunk 9 is larger than the batch size 8"),
    ({"precision": "fp8"}, "unknown precision"),
    ({"mw_pairs": "all"}, "mw_pairs"),
    ({"mw_weight": 0.5}, "mw_weight"),
    ({"loss": "decoupled", "symmetric": True}, "symmetric"),
    ({"save_steps": 0}, "save_steps"),
    ({"batch_size": 0}, "batch_size"), ({"learning_rate": -1.0}, "learning_rate"),
    ({"warmup_ratio": 1.5}, "warmup_ratio"), ({"negatives_per_query": -1}, "negatives_per_query"),
    ({"temperature": 0.0}, "temperature"), ({"soup": 1}, "soup"), ({"dropout": 1.0}, "dropout"),
])
def test_invalid_settings_are_refused(changes, message):
    with pytest.raises(HardnegError, match=message.replace("(", r"\(")):
        replace(TrainConfig(batch_size=8), **changes).check()


def test_fp16_needs_cuda_and_keep_best_needs_a_dev_set(small, tiny_model, tmp_path):
    data, pools = small
    if not torch.cuda.is_available():
        with pytest.raises(HardnegError, match="fp16 needs a CUDA GPU"):
            train(pools, data.corpus, _config(tiny_model, precision="fp16"), tmp_path / "m", show_progress=False)
    with pytest.raises(HardnegError, match="eval_steps, patience, dev_fraction and soup need a dev evaluator"):
        train(pools, data.corpus, _config(tiny_model, eval_steps=2), tmp_path / "m", show_progress=False)
    assert not (tmp_path / "m").exists()


def test_pools_must_match_the_corpus(demo_train, demo_test, tmp_path):
    pools = mine(_small(demo_train, 4), "bm25", depth=10, num_negatives=2).pools
    other = replace(demo_test.corpus, ids=demo_test.corpus.ids[:5], titles=demo_test.corpus.titles[:5],
                    bodies=demo_test.corpus.bodies[:5])
    with pytest.raises(HardnegError, match="not in the corpus"):
        train(pools, other, TrainConfig(), tmp_path / "m", show_progress=False)
    assert not (tmp_path / "m").exists()


# ---------------------------------------------------------------------------------------------- CLI

def _cli(*args: str, env_extra: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"} | (env_extra or {})
    command = (launcher or [sys.executable, "-m"]) + ["hardneg", "--quiet", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra, message", [
    (["--loss", "listnet"], "unknown loss 'listnet'; choose one of infonce, mw, decoupled"),
    (["--cache-chunk", "16", "--train-batch-size", "8"], "cache_chunk 16 is larger than the batch size 8"),
    (["--resume"], "no checkpoint in"),
])
def test_cli_refuses_bad_training_settings_before_work(extra, message, small, tiny_model, tmp_path, capsys):
    from hardneg.cli import main

    _, pools = small
    write_pools(tmp_path / "pools.jsonl", pools)
    code = main(["--quiet", "train", "--pools", str(tmp_path / "pools.jsonl"), "--data", "nfcorpus-demo",
                 "--model", str(tiny_model), "--output", str(tmp_path / "out"), *extra])
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("hardneg: error: ") and error.count("\n") == 1
    assert message in error
    assert not (tmp_path / "out").exists()


def test_cli_keeps_the_best_model_on_a_dev_split(small, tiny_model, tmp_path, capsys):
    from hardneg.cli import main

    _, pools = small
    write_pools(tmp_path / "pools.jsonl", pools)
    code = main(["--quiet", "train", "--pools", str(tmp_path / "pools.jsonl"), "--data", "nfcorpus-demo",
                 "--model", str(tiny_model), "--output", str(tmp_path / "out"), "--train-batch-size", "8",
                 "--max-length", "24", "--lr", "1e-3", "--eval-steps", "2", "--dev-split", "test",
                 "--loss", "mw", "--mw-weight", "0.5"])
    out = capsys.readouterr().out
    assert code == 0
    dev = {r["step"]: r["dev"] for r in _log(tmp_path / "out") if "dev" in r}
    assert sorted(dev) == [2, 3]
    best_step = max(dev, key=lambda s: (dev[s], -s))
    assert f"best nDCG@10 on test: {dev[best_step]:.4f} at step {best_step}" in out
    assert (tmp_path / "out" / MODEL_DIR / "model.safetensors").is_file()


@pytest.mark.slow
def test_torchrun_two_processes_train_and_write_once(small, tiny_model, tmp_path):
    """A real 2-process gloo run through the CLI: each rank takes half of every batch, rank 0 writes."""
    _, pools = small
    write_pools(tmp_path / "pools.jsonl", pools)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(29500 + os.getpid() % 1000), "-m"]
    result = _cli("train", "--pools", str(tmp_path / "pools.jsonl"), "--data", "nfcorpus-demo", "--model",
                  str(tiny_model), "--output", str(tmp_path / "out"), "--train-batch-size", "12",
                  "--positives-per-step", "2", "--negatives-per-query", "2", "--max-length", "32", "--lr", "1e-3",
                  "--save-steps", "1", "--cache-chunk", "4", launcher=launcher,
                  env_extra={"CUDA_VISIBLE_DEVICES": ""})   # gloo on the CPU even where one GPU is present
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained 2 steps") == 1  # printed by rank 0 only
    log = _log(tmp_path / "out")
    assert [r["step"] for r in log] == [1, 2]
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]
    assert json.loads((tmp_path / "out" / TRAIN_CONFIG).read_text())["summary"]["world_size"] == 2
    SentenceTransformer(str(tmp_path / "out" / MODEL_DIR), device="cpu")


def test_pipeline_keep_best_needs_a_dev_split_before_the_reported_one(tmp_path):
    from hardneg.pipeline import load_config, run_pipeline

    config_file = tmp_path / "run.yaml"
    config_file.write_text("data: {path: nfcorpus-demo}\ntrain: {eval_steps: 5}\nevaluate: {split: test}\n")
    with pytest.raises(HardnegError, match="list a dev split before the reported one"):
        run_pipeline(load_config(config_file, [f"output_dir={tmp_path / 'out'}"]), show_progress=False)
    assert not (tmp_path / "out").exists()
    assert load_config(config_file, ["train.loss=mw", "train.resume=latest"])["train"]["loss"] == "mw"


# ------------------------------------------------------------------------------------ objects in, model out

def test_train_takes_a_model_and_a_loss_object_and_gives_the_model_back(small, tiny_model, tmp_path):
    """A DualEncoder object and a loss module train exactly like the names in the config."""
    from retriever.losses import make_loss

    data, pools = small
    config = _config(tiny_model, epochs=1, loss="decoupled")
    by_name = train(pools, data.corpus, config, tmp_path / "name", show_progress=False)
    given = DualEncoder.load(tiny_model, max_length=48)
    by_object = train(pools, data.corpus, replace(config, loss="infonce"), tmp_path / "object", model=given,
                      loss=make_loss("decoupled", temperature=config.temperature), show_progress=False)
    assert by_object.model is given and by_object.summary["steps"] == by_name.summary["steps"] == 3
    texts = [data.corpus.text(i) for i in range(20)]
    expected = DualEncoder.load(tmp_path / "name" / MODEL_DIR).encode(texts)
    assert np.allclose(given.encode(texts), expected, atol=1e-6)
    assert np.allclose(DualEncoder.load(tmp_path / "object" / MODEL_DIR).encode(texts), expected, atol=1e-6)
    assert [r["loss"] for r in _log(tmp_path / "object")] == pytest.approx([r["loss"] for r in _log(tmp_path / "name")])
    assert train(pools, data.corpus, config, tmp_path / "loss-name", loss="mw",
                 show_progress=False).summary["steps"] == 3
    assert json.loads((tmp_path / "loss-name" / TRAIN_CONFIG).read_text())["config"]["loss"] == "mw"


def test_train_trains_a_sentence_transformer_in_place(small, tiny_model, tmp_path):
    data, pools = small
    DualEncoder.load(tiny_model, max_length=48).save(tmp_path / "st")
    st_model = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    texts = [data.corpus.text(i) for i in range(20)]
    before = st_model.encode(texts)
    result = train(pools, data.corpus, _config(tiny_model, epochs=1), tmp_path / "m", model=st_model,
                   show_progress=False)
    after = st_model.encode(texts)
    assert not np.allclose(before, after, atol=1e-4)  # the object itself learned
    result.model.precision = "fp32"  # as sentence-transformers encodes (auto is bf16 on a CPU that has it)
    assert np.allclose(after, result.model.encode(texts), atol=1e-5)
    reloaded = SentenceTransformer(str(tmp_path / "m" / MODEL_DIR), device="cpu")
    assert np.allclose(after, reloaded.encode(texts), atol=1e-5)


def test_config_model_settings_apply_to_a_given_model_or_are_refused(small, tiny_model, tmp_path):
    """Set model settings are never ignored: a DualEncoder takes them; a SentenceTransformer, which keeps
    encoding with its own modules after training in place, refuses one that contradicts them."""
    data, pools = small
    given = DualEncoder.load(tiny_model, max_length=48)
    train(pools, data.corpus, _config(tiny_model, epochs=1, max_length=24, query_prefix="q: "), tmp_path / "d",
          model=given, show_progress=False)
    assert (given.max_length, given.query_prefix) == (24, "q: ")
    from retriever.dense import encoder_identity  # trained weights are not those of its files: never cached

    assert encoder_identity(given) is None and encoder_identity(DualEncoder.load(tiny_model)) is not None
    assert DualEncoder.load(tmp_path / "d" / MODEL_DIR).max_length == 24
    DualEncoder.load(tiny_model, max_length=48).save(tmp_path / "st")
    st_model = SentenceTransformer(str(tmp_path / "st"), device="cpu")
    with pytest.raises(HardnegError, match="pooling='cls' differs from the given SentenceTransformer's 'mean'"):
        train(pools, data.corpus, _config(tiny_model, pooling="cls"), tmp_path / "m", model=st_model,
              show_progress=False)
    assert not (tmp_path / "m").exists()


def test_train_refuses_a_model_it_cannot_train(small, tiny_model, tmp_path):
    from sentence_transformers.models import Dense

    data, pools = small
    with pytest.raises(HardnegError, match="model must be a DualEncoder or a SentenceTransformer, got str"):
        train(pools, data.corpus, _config(tiny_model), tmp_path / "m", model=str(tiny_model), show_progress=False)
    st_model = SentenceTransformer(str(tiny_model), device="cpu")
    st_model.append(Dense(32, 8))
    with pytest.raises(HardnegError, match=r"modules \['Transformer', 'Pooling', 'Dense'\] is not supported"):
        train(pools, data.corpus, _config(tiny_model), tmp_path / "m", model=st_model, show_progress=False)
    assert not (tmp_path / "m").exists()
