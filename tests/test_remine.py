"""Dynamic negatives: re-mining with the model being trained, each round kept, resume across rounds, refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import Crash, crash_after
from safetensors.torch import load_file

from mining.filters import make_filter
from mining.mine import mine
from mining.remine import REMINED_DIR, Remining, recorded_mine_settings
from mining.settings import MineSettings
from retriever.data import POOLS_FILE, POOLS_META, pools_dataset, read_pools, write_pools
from retriever.io import HardnegError
from retriever.train import TrainConfig, train


@pytest.fixture(scope="module")
def small(demo_train):
    keep = sorted(demo_train.qrels)[:20]
    data = replace(demo_train, qrels={q: demo_train.qrels[q] for q in keep},
                   queries={q: demo_train.queries[q] for q in keep})
    return data, mine(data, "bm25", depth=20, num_negatives=4, filter=make_filter("topk")).pools


# Plain top-k: a random-weight student scores every document alike, so a positive-aware filter would keep none.
SETTINGS = dict(retriever=["bm25"], depth=20, num_negatives=4, filter="topk")


def _config(model, **changes) -> TrainConfig:
    # 20 queries / batch 8 = 3 steps per epoch; re-mined after epochs 1 and 2.
    base = TrainConfig(model=str(model), epochs=3, batch_size=8, learning_rate=2e-3, warmup_ratio=0.2,
                       positives_per_query=1, negatives_per_query=2, max_length=32, seed=5, remine_every=1,
                       save_steps=2)
    return replace(base, **changes)


def _remining(data, pools, output: Path, **settings) -> Remining:
    mine_settings = MineSettings(**(SETTINGS | settings))
    return Remining(pools_dataset(pools, data.corpus, data, split="remine"), mine_settings, output,
                    encode={"batch_size": 64, "show_progress": False})


def test_each_round_is_mined_by_the_student_and_kept(small, tiny_model, tmp_path):
    data, pools = small
    summary = train(pools, data.corpus, _config(tiny_model, save_steps=None), tmp_path,
                    show_progress=False, remine=_remining(data, pools, tmp_path)).summary
    assert [(r["round"], r["epoch"], r["step"]) for r in summary["remine_rounds"]] == [(1, 1, 3), (2, 2, 6)]
    rounds = []
    for number in (1, 2):
        folder = tmp_path / REMINED_DIR / f"round-{number}"
        meta = json.loads((folder / POOLS_META).read_text())
        assert meta["settings"]["retriever"] == f"dense:{tiny_model}"  # the student, not BM25 again
        assert meta["config"]["remine_round"] == number and (folder / "pools.scores.png").is_file()
        assert meta["counts"]["queries"] == len(pools)
        rounds.append({p.query_id: [n.doc_id for n in p.negatives] for p in read_pools(folder / POOLS_FILE)})
    bm25 = {p.query_id: [n.doc_id for n in p.negatives] for p in pools}
    assert rounds[0] != bm25 and rounds[1] != rounds[0]  # the model changed between rounds, so did its negatives
    for pool in read_pools(tmp_path / REMINED_DIR / "round-1" / POOLS_FILE):
        labelled = {doc for doc, grade in data.qrels[pool.query_id].items() if grade > 0}
        assert {p.doc_id for p in pool.positives} == labelled
        assert not labelled & {n.doc_id for n in pool.negatives}


@pytest.mark.slow
def test_resume_across_rounds_gives_the_weights_of_an_uninterrupted_run(small, tiny_model, tmp_path):
    data, pools = small
    config = _config(tiny_model)
    train(pools, data.corpus, config, tmp_path / "whole", show_progress=False,
          remine=_remining(data, pools, tmp_path / "whole"))
    whole = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    # Killed after step 5 (round 1, checkpoint of step 4): round 1 is read back, round 2 mined on resume.
    # Killed after step 7 (checkpoint of step 6, the end of epoch 2): round 2 was mined already and is read back.
    for crash, reused in ((5, [True, False]), (7, [True])):
        folder = tmp_path / f"cut-{crash}"
        with pytest.raises(Crash):
            train(pools, data.corpus, config, folder, show_progress=False, on_step=crash_after(crash),
                  remine=_remining(data, pools, folder))
        remining = _remining(data, pools, folder)
        train(pools, data.corpus, config, folder, show_progress=False, resume="latest", remine=remining)
        assert [r["reused"] for r in remining.rounds] == reused
        resumed = load_file(str(folder / "model" / "model.safetensors"))
        for name in whole:
            assert torch.equal(whole[name], resumed[name]), (crash, name)
        for number in (1, 2):
            assert (folder / REMINED_DIR / f"round-{number}" / POOLS_FILE).read_bytes() == \
                (tmp_path / "whole" / REMINED_DIR / f"round-{number}" / POOLS_FILE).read_bytes()


def test_a_fresh_run_mines_its_rounds_again_instead_of_reading_another_runs(small, tiny_model, tmp_path):
    """A finished run leaves its rounds; a run of another config started afresh in that folder (a `hardneg run`
    config changed and run again) read them back as its own and trained on the other run's negatives."""
    data, pools = small
    config = _config(tiny_model, epochs=2, save_steps=None)
    train(pools, data.corpus, config, tmp_path, show_progress=False, remine=_remining(data, pools, tmp_path))
    remining = _remining(data, pools, tmp_path, num_negatives=2)
    train(pools, data.corpus, replace(config, learning_rate=1e-3), tmp_path, show_progress=False, remine=remining)
    assert [r["reused"] for r in remining.rounds] == [False]
    meta = json.loads((tmp_path / REMINED_DIR / "round-1" / POOLS_META).read_text())
    assert meta["settings"]["num_negatives"] == 2


def test_a_resume_inside_a_round_whose_pools_are_gone_is_refused(small, tiny_model, tmp_path):
    data, pools = small
    config = _config(tiny_model, epochs=2)
    with pytest.raises(Crash):
        train(pools, data.corpus, config, tmp_path, show_progress=False, on_step=crash_after(5),
              remine=_remining(data, pools, tmp_path))
    (tmp_path / REMINED_DIR / "round-1" / POOLS_META).unlink()
    with pytest.raises(HardnegError, match="pools of re-mining round 1 are missing or unfinished"):
        train(pools, data.corpus, config, tmp_path, show_progress=False, resume="latest",
              remine=_remining(data, pools, tmp_path))


@pytest.mark.slow
def test_the_teacher_still_scores_the_remined_pools(small, tiny_model, tmp_path, tmp_path_factory, demo_train):
    from conftest import build_tiny_bert

    data, _ = small
    teacher = str(build_tiny_bert(tmp_path_factory.mktemp("teacher"), demo_train.corpus.texts()[:300], seed=3))
    pools = mine(data, "bm25", depth=20, num_negatives=4, filter=make_filter("topk"), rescorer=teacher).pools
    remining = _remining(data, pools, tmp_path, teacher=teacher)
    train(pools, data.corpus, _config(tiny_model, epochs=2, save_steps=None, distill_weight=0.5), tmp_path / "m",
          show_progress=False, remine=remining)
    folder = Path(remining.rounds[0]["folder"])
    assert json.loads((folder / POOLS_META).read_text())["settings"]["rescorer"] == f"dense:{teacher}"
    before = {p.query_id: {c.doc_id: c.score for c in p.positives} for p in pools}
    for pool in read_pools(folder / POOLS_FILE):
        assert {c.doc_id: c.score for c in pool.positives} == before[pool.query_id]  # the teacher's, unchanged
        assert all(c.score is not None for c in pool.negatives)


@pytest.mark.slow
def test_a_fused_student_teacher_is_rebuilt_around_the_student_each_round(small, tiny_model, tmp_path):
    """``fuse_bm25`` without a teacher: each round's scores are the student-as-it-is-then fused with BM25, so they
    move between rounds (a teacher's would not), and distillation can read them in every round."""
    from mining.sources import build_rescorer, dense

    data, _ = small
    source = dense(str(tiny_model), show_progress=False)
    pools = mine(data, source, depth=20, num_negatives=4, filter=make_filter("topk"),
                 rescorer=build_rescorer(fuse_bm25=0.3, source=source, show_progress=False)).pools
    remining = _remining(data, pools, tmp_path, retriever=[str(tiny_model)], fuse_bm25=0.3)
    train(pools, data.corpus, _config(tiny_model, save_steps=None, distill_weight=0.5), tmp_path / "m",
          show_progress=False, remine=remining)
    scores = []
    for number in (1, 2):
        folder = Path(remining.rounds[number - 1]["folder"])
        rescorer = json.loads((folder / POOLS_META).read_text())["settings"]["rescorer"]
        assert rescorer.startswith(f"fused-z(1*dense:{tiny_model}+0.3*bm25")
        round_pools = read_pools(folder / POOLS_FILE)
        assert all(c.score is not None for pool in round_pools for c in pool.positives + pool.negatives)
        scores.append({p.query_id: [c.score for c in p.positives] for p in round_pools})
    assert scores[0] != scores[1]


def test_remining_needs_its_hook_and_a_round_to_come(small, tiny_model, tmp_path):
    data, pools = small
    with pytest.raises(HardnegError, match="remine_every needs the mining settings"):
        train(pools, data.corpus, _config(tiny_model), tmp_path, show_progress=False)
    with pytest.raises(HardnegError, match="remine_every 3 .* training runs 3: it would never re-mine"):
        _config(tiny_model, remine_every=3).check()


def test_cli_remines_with_the_recorded_mining_settings(small, tiny_model, tmp_path, capsys):
    from hardneg.cli import main

    data, pools = small
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{g}\n" for q in data.qrels for d, g in data.qrels[q].items()))
    assert main(["--quiet", "mine", "--data", "nfcorpus-demo", "--qrels", str(qrels),  # default --retriever
                 "--depth", "20", "--num-negatives", "3", "--anchor-fallback", "max",
                 "--output", str(tmp_path / "pools")]) == 0
    settings = recorded_mine_settings(tmp_path / "pools", str(tiny_model))
    assert (settings.depth, settings.num_negatives, settings.anchor_fallback) == (20, 3, "max")
    assert settings.retriever == ["bm25"]
    code = main(["--quiet", "train", "--pools", str(tmp_path / "pools"), "--data", "nfcorpus-demo",
                 "--model", str(tiny_model), "--output", str(tmp_path / "out"), "--batch-size", "8",
                 "--max-length", "24", "--epochs", "2", "--remine-every", "1"])
    capsys.readouterr()
    assert code == 0
    meta = json.loads((tmp_path / "out" / REMINED_DIR / "round-1" / POOLS_META).read_text())
    assert meta["settings"]["depth"] == 20 and meta["settings"]["num_negatives"] == 3
    assert meta["settings"]["retriever"] == f"dense:{tiny_model}"


def test_recorded_settings_name_the_student_for_remining_and_the_mining_model_for_the_teacher(tmp_path):
    """Pools a `hardneg run` mined with its model Y and fused with BM25: re-mining puts the student in Y's place,
    the in-batch teacher is Y itself (whatever model trains on them); with re-mining that teacher would go stale,
    so the pair is refused."""
    from mining.remine import check_batch_teacher

    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "pools.jsonl").write_text("")
    (tmp_path / "pools" / POOLS_META).write_text(json.dumps({"config": {
        "model": "mined/with-y", "seed": 7, "mine": {"retriever": ["model", "bm25"], "fuse_bm25": 0.3}}}))
    assert recorded_mine_settings(tmp_path / "pools", "trains/x").retriever == ["model", "bm25"]
    as_mined = recorded_mine_settings(tmp_path / "pools", "trains/x", as_mined=True)
    assert as_mined.retriever == ["mined/with-y", "bm25"] and as_mined.seed == 7
    check_batch_teacher(as_mined, remine_every=0)
    with pytest.raises(HardnegError, match="changes every round"):
        check_batch_teacher(as_mined, remine_every=1)


def test_cli_refuses_remining_pools_it_cannot_remine(small, tiny_model, tmp_path, capsys):
    from hardneg.cli import main

    _, pools = small
    write_pools(tmp_path / "pools.jsonl", pools)  # converted pools: no record of how they were mined
    base = ["--quiet", "train", "--pools", str(tmp_path / "pools.jsonl"), "--data", "nfcorpus-demo",
            "--model", str(tiny_model), "--output", str(tmp_path / "out")]
    for extra, message in ((["--epochs", "2", "--remine-every", "1"], "pools.meta.json: not found"),
                           (["--epochs", "2", "--remine-every", "2"], "it would never re-mine"),
                           (["--epochs", "2", "--remine-every", "0"], "remine_every: must be >= 1")):
        assert main(base + extra) == 2, extra
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error, error
        assert not (tmp_path / "out").exists()
