"""The trained model folder as people share it: a model card and no logs; TensorBoard curves read back."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import yaml
from conftest import small as _small
from sentence_transformers import SentenceTransformer

from eval.evaluate import dev_evaluator
from mining.mine import mine
from retriever.data import hold_out, pools_dataset
from retriever.encoder import DualEncoder
from retriever.io import HardnegError
from retriever.model_card import render_model_card
from retriever.train import MODEL_DIR, TENSORBOARD_DIR, TRAIN_CONFIG, TRAIN_LOG, TrainConfig, train

# What `huggingface-cli upload REPO OUTPUT/model` would send: model files and the card, no logs or checkpoints.
UPLOADED_FILES = ["1_Pooling", "2_Normalize", "README.md", "config.json", "config_sentence_transformers.json",
                  "model.safetensors", "modules.json", "sentence_bert_config.json", "tokenizer.json",
                  "tokenizer_config.json"]


@pytest.fixture(scope="module")
def mined(demo_train, tmp_path_factory):
    data = _small(demo_train, documents=300)
    folder = tmp_path_factory.mktemp("pools")
    result = mine(data, "bm25", depth=20, num_negatives=4, output_dir=folder, show_progress=False)
    return data, result


def _config(model, **changes) -> TrainConfig:
    base = TrainConfig(model=str(model), epochs=2, batch_size=8, learning_rate=2e-3, positives_per_query=2,
                       negatives_per_query=2, max_length=48, seed=1)
    return replace(base, **changes)


def _log(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / TRAIN_LOG).read_text().splitlines()]


def test_the_model_folder_carries_a_card_and_no_logs(mined, tiny_model, tmp_path):
    data, result = mined
    trained = train(result.pools, data.corpus, _config(tiny_model), tmp_path / "run", show_progress=False,
                    pools_meta=result.meta, provenance={"pools/pools.jsonl": "sha256:0123abcd"})
    model_dir = tmp_path / "run" / MODEL_DIR
    assert sorted(p.name for p in model_dir.iterdir()) == UPLOADED_FILES
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["logs", "model", "training_config.json"]
    card = (model_dir / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["library_name"] == "sentence-transformers" and "sentence-transformers" in header["tags"]
    assert "base_model" not in header  # a local folder is not a hub id
    assert f"`{tiny_model}`" in card and "| loss | infonce |" in card and "| epochs | 2 |" in card
    assert f"# {tiny_model.name} fine-tuned with hardneg" in card and "distill_form" not in card
    counts = result.meta["counts"]
    assert (f"{counts['queries']} queries; candidates from `bm25" in card and "the lowest-scored positive" in card
            and f"{counts['queries_with_hard_negatives']} queries with hard negatives" in card)
    checksums = json.loads((tmp_path / "run" / TRAIN_CONFIG).read_text())["input_checksums"]
    assert "- `pools.jsonl`: `sha256:0123abcd`" in card and all(value in card for value in checksums.values())
    assert "- torch: " in card and "SentenceTransformer(" in card
    assert f"Trained {trained.summary['steps']} steps" in card
    loaded = SentenceTransformer(str(model_dir), device="cpu")  # the card does not get in the way of loading
    texts = [data.corpus.text(i) for i in range(5)]
    trained.model.precision = "fp32"  # as sentence-transformers loads it (auto is bf16 on a CPU that has it)
    assert np.allclose(loaded.encode(texts), trained.model.encode(texts), atol=1e-5)


def test_the_card_names_a_hub_base_model_and_shows_metrics_before_and_after():
    record = {"config": {"model": "sentence-transformers/all-MiniLM-L6-v2", "loss": "kd", "epochs": 3,
                         "distill_form": "kl",
                         "batch_size": 32, "learning_rate": 3e-5, "seed": 42},
              "summary": {"steps": 30, "best_step": 20, "best_dev": 0.2437, "dev_metric": "nDCG@10"},
              "model_identity": {"query_prefix": "query: "}}
    card = render_model_card(record, {"before": {"demo/test": {"nDCG@10": 0.3759}},
                                      "after": {"demo/test": {"nDCG@10": 0.3812}}})
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "| base model | 0.3759 |" in card and "| this model | 0.3812 |" in card
    assert "model of step 20, the best nDCG@10" in card and 'prompt_name="query"' in card
    assert "| query prefix | `query: ` |" in card and "| distill_form |" in card  # kd: the distillation


def test_with_dev_selection_the_model_folder_and_the_returned_model_are_the_best(mined, tiny_model, tmp_path):
    data, result = mined
    pools, held = hold_out(result.pools, 0.25, 1)
    evaluator = dev_evaluator(pools_dataset(held, data.corpus), "nDCG@10")
    trained = train(pools, data.corpus, _config(tiny_model, epochs=3, save_steps=2), tmp_path / "run",
                    show_progress=False, evaluator=evaluator)
    summary = trained.summary
    dev = {r["step"]: r["dev"] for r in _log(tmp_path / "run") if "dev" in r}
    assert summary["best_step"] == max(dev, key=dev.get) and summary["dev_metric"] == "nDCG@10"
    texts = [data.corpus.text(i) for i in range(8)]
    saved = DualEncoder.load(tmp_path / "run" / MODEL_DIR).encode(texts)
    assert np.allclose(saved, trained.model.encode(texts), atol=1e-6)
    assert evaluator(trained.model) == pytest.approx(summary["best_dev"], abs=1e-6)


def test_tensorboard_events_are_written_and_read_back(mined, tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data, result = mined
    pools, held = hold_out(result.pools, 0.25, 1)
    evaluator = dev_evaluator(pools_dataset(held, data.corpus), "nDCG@10")
    train(pools, data.corpus, _config(tiny_model, report_to="tensorboard"), tmp_path / "run", show_progress=False,
          evaluator=evaluator)
    events = EventAccumulator(str(tmp_path / "run" / TENSORBOARD_DIR))
    events.Reload()
    log = _log(tmp_path / "run")
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/temperature", "train/grad_norm", "dev/nDCG@10",
            "mining/queries_with_negatives"} <= tags
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [r["step"] for r in log]
    assert [e.value for e in losses] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert [e.value for e in events.Scalars("train/learning_rate")] == pytest.approx([r["lr"] for r in log])
    assert {e.step: e.value for e in events.Scalars("dev/nDCG@10")} == pytest.approx(
        {r["step"]: r["dev"] for r in log if "dev" in r}, abs=1e-6)  # the log rounds to 6 decimals
    assert events.Scalars("train/temperature")[0].value == pytest.approx(0.05)
    (first,) = events.Scalars("mining/queries_with_negatives")
    assert first.step == 0 and first.value == sum(1 for p in pools if p.negatives)


def test_tensorboard_without_its_package_fails_before_training(mined, tiny_model, tmp_path, monkeypatch):
    data, result = mined
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(HardnegError, match=r"pip install 'hardneg\[tensorboard\]'"):
        train(result.pools, data.corpus, _config(tiny_model, report_to="tensorboard"), tmp_path / "run",
              show_progress=False)
    assert not (tmp_path / "run").exists()


def test_the_cli_trains_with_report_to_tensorboard(demo_train, tiny_model, tmp_path, capsys):
    from hardneg.cli import main

    folder = tmp_path / "pools"
    mine(_small(demo_train), "bm25", depth=20, num_negatives=4, output_dir=folder, show_progress=False)
    code = main(["train", "--pools", str(folder), "--data", "nfcorpus-demo", "--model", str(tiny_model),
                 "--output", str(tmp_path / "run"), "--train-batch-size", "8", "--max-length", "48", "--epochs", "1",
                 "--report-to", "tensorboard", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"model (with its README.md card) in {tmp_path / 'run' / MODEL_DIR}" in out
    assert any((tmp_path / "run" / TENSORBOARD_DIR).iterdir())
    assert "candidates from `bm25" in (tmp_path / "run" / MODEL_DIR / "README.md").read_text()
