"""Distillation, random negatives, held-out selection and early stopping (the training levers of issue 11).

The distillation losses are checked against float64 loops, exactness under gradient caching against the
same training without a cache, and the CLI's refusals against one-line errors with nothing written.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
from conftest import small as small_dataset

from mining.filters import make_filter
from mining.mine import mine
from retriever.data import Candidate, Pool, dev_subset, hold_out, mined_negatives, pools_dataset, write_pools
from retriever.io import HardnegError
from retriever.losses import DistilledLoss, distillation, info_nce
from retriever.train import MODEL_DIR, TRAIN_LOG, TrainConfig, epoch_batches, train


@pytest.fixture(scope="module")
def small(demo_train):
    data = small_dataset(demo_train, queries=24)
    pools = mine(data, "bm25", depth=20, num_negatives=4, filter=make_filter("topk"), show_progress=False).pools
    assert sum(bool(pool.negatives) for pool in pools) > len(pools) // 2
    return data, pools


def loop_kl(s, teacher, scored, tau, tau_t):
    terms = []
    for i in range(s.shape[0]):
        cells = [j for j in range(s.shape[1]) if scored[i, j]]
        if len(cells) < 2:
            continue
        t = torch.stack([teacher[i, j] / tau_t for j in cells])
        u = torch.stack([s[i, j] / tau for j in cells])
        p, log_p, log_q = t.softmax(0), t.log_softmax(0), u.log_softmax(0)
        terms.append(sum(p[k] * (log_p[k] - log_q[k]) for k in range(len(cells))))
    return torch.stack(terms).mean()


def loop_margin_mse(s, teacher, scored, targets, tau, tau_t):
    terms = []
    for i in range(s.shape[0]):
        for p in range(s.shape[1]):
            for n in range(s.shape[1]):
                if scored[i, p] and scored[i, n] and targets[i, p] and not targets[i, n]:
                    student = (s[i, p] - s[i, n]) / tau
                    reference = (teacher[i, p] - teacher[i, n]) / tau_t
                    terms.append((student - reference) ** 2)
    return torch.stack(terms).mean()


def batch(seed: int, queries: int = 5, columns: int = 10):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(queries, columns, generator=generator, dtype=torch.float64) * 0.5
    teacher = torch.randn(queries, columns, generator=generator, dtype=torch.float64) * 0.3
    scored = torch.rand(queries, columns, generator=generator) < 0.6
    targets = scored & (torch.rand(queries, columns, generator=generator) < 0.4)
    targets[:, 0] = scored[:, 0] = True
    scored[-1] = False
    scored[-1, 0] = True                                 # a query with a single scored cell: no KL term
    negatives = ~targets
    return scores, teacher, scored, targets, negatives


@pytest.mark.parametrize("form", ["kl", "margin-mse"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distillation_equals_the_float64_loop(form, seed):
    scores, teacher, scored, targets, _ = batch(seed)
    a = scores.clone().requires_grad_(True)
    b = scores.clone().requires_grad_(True)
    tau_a = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    tau_b = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    value = distillation(a, teacher, scored, targets, tau_a, 0.1, form)
    expected = (loop_kl(b, teacher, scored, tau_b, 0.1) if form == "kl"
                else loop_margin_mse(b, teacher, scored, targets, tau_b, 0.1))
    value.backward()
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(tau_a.grad, tau_b.grad, atol=1e-4, rtol=1e-4)


def test_distilled_loss_adds_the_weighted_term_and_kd_alone_is_the_term():
    from retriever.losses import make_loss

    scores, teacher, scored, targets, negatives = batch(3)
    scores = scores.float()
    with_kd = DistilledLoss(make_loss("infonce", temperature=0.05), weight=0.5, temperature=0.05)
    expected = info_nce(scores, targets, negatives, 0.05) + 0.5 * distillation(
        scores, teacher, scored, targets, 0.05, 0.05)
    assert with_kd(scores, targets, negatives, teacher, scored).item() == pytest.approx(expected.item(), rel=1e-6)
    alone = DistilledLoss(None, temperature=0.05, teacher_temperature=0.2)
    assert alone(scores, targets, negatives, teacher, scored).item() == pytest.approx(
        distillation(scores, teacher, scored, targets, 0.05, 0.2).item(), rel=1e-6)
    nothing = torch.zeros_like(scored)
    assert distillation(scores.requires_grad_(True), teacher, nothing, targets, 0.05, 0.05).item() == 0.0


def _scored_pools(pools):
    """The fixture's pools with deterministic 'teacher' scores on every positive and negative."""
    return [Pool(p.query_id, p.query, [Candidate(c.doc_id, 0.9 - 0.01 * k) for k, c in enumerate(p.positives)],
                 [Candidate(c.doc_id, 0.5 - 0.02 * k, c.rank, c.source) for k, c in enumerate(p.negatives)])
            for p in pools]


def _config(model, **changes) -> TrainConfig:
    base = TrainConfig(model=str(model), epochs=1, batch_size=8, learning_rate=2e-3, positives_per_query=2,
                       negatives_per_query=2, max_length=32, seed=1, precision="fp32")
    return replace(base, **changes)


@pytest.mark.parametrize("changes", [{"distill_weight": 0.7}, {"loss": "kd", "distill_form": "margin-mse"},
                                     {"loss": "kd", "cache_chunk": 3}])
def test_distillation_trains(changes, small, tiny_model, tmp_path):
    """End to end through the trainer (exactness under gradient caching is in test_gradcache.py)."""
    data, pools = small
    summary = train(_scored_pools(pools), data.corpus, _config(tiny_model, epochs=4, **changes), tmp_path / "m",
                    show_progress=False).summary
    losses = [json.loads(line)["loss"] for line in (tmp_path / "m" / TRAIN_LOG).read_text().splitlines()]
    assert len(losses) == summary["steps"] and all(math.isfinite(value) and value >= 0 for value in losses)
    assert sum(losses[-3:]) < sum(losses[:3])


def test_distillation_refuses_pools_without_scores(small, tiny_model, tmp_path):
    data, pools = small
    unscored = [Pool(p.query_id, p.query, [Candidate(c.doc_id, None) for c in p.positives], p.negatives)
                for p in pools]
    first = unscored[0]
    with pytest.raises(HardnegError, match=f"distillation needs a teacher score.* the first document "
                                           f"'{first.positives[0].doc_id}' of query '{first.query_id}'"):
        train(unscored, data.corpus, _config(tiny_model, loss="kd"), tmp_path / "m", show_progress=False)
    assert not (tmp_path / "m").exists()


def test_random_negatives_are_seeded_fresh_per_epoch_and_never_positives(small):
    data, pools = small
    config = TrainConfig(batch_size=8, negatives_per_query=1, random_negatives=3, seed=5)
    ids = list(data.corpus.ids)
    first = [e for b in epoch_batches(pools, config, 0, ids) for e in b]
    again = [e for b in epoch_batches(pools, config, 0, ids) for e in b]
    second = [e for b in epoch_batches(pools, config, 1, ids) for e in b]
    assert [e.negatives for e in first] == [e.negatives for e in again]
    assert [e.negatives for e in first] != [e.negatives for e in second]
    by_id = {p.query_id: p for p in pools}
    for example in first:
        mined = {n.doc_id for n in by_id[example.query_id].negatives}
        randoms = example.negatives[-3:]
        assert len(set(randoms)) == 3 and not set(randoms) & (example.positive_ids | mined)
        assert example.negative_scores[-3:] == [None] * 3
    plain = [e for b in epoch_batches(pools, replace(config, random_negatives=0), 0) for e in b]
    assert [e.negatives[:-3] for e in first] == [e.negatives for e in plain]  # the mined draw is unchanged


def test_hold_out_is_seeded_by_query_and_graded_from_the_source(small):
    data, pools = small
    kept, held = hold_out(pools, 0.25, seed=7)
    again_kept, again_held = hold_out(list(reversed(pools)), 0.25, seed=7)
    assert {p.query_id for p in held} == {p.query_id for p in again_held}
    assert len(held) == round(0.25 * len(pools)) and len(kept) + len(held) == len(pools)
    assert not {p.query_id for p in held} & {p.query_id for p in kept}
    dev = pools_dataset(held, data.corpus, data)
    assert set(dev.queries) == {p.query_id for p in held}
    assert all(dev.qrels[q] == data.qrels[q] for q in dev.queries)
    for bad in (0.0, 0.6):
        with pytest.raises(HardnegError, match="dev_fraction"):
            hold_out(pools, bad, seed=1)


def test_max_steps_and_patience_stop_training(small, tiny_model, tmp_path):
    data, pools = small
    summary = train(pools, data.corpus, _config(tiny_model, epochs=3, max_steps=5), tmp_path / "capped",
                    show_progress=False).summary
    assert summary["steps"] == 5
    scores = iter([0.5, 0.4, 0.3, 0.9])
    summary = train(pools, data.corpus, _config(tiny_model, epochs=4, patience=2), tmp_path / "patient",
                    show_progress=False, evaluator=lambda model: next(scores)).summary
    log = [json.loads(line) for line in (tmp_path / "patient" / TRAIN_LOG).read_text().splitlines()]
    steps_per_epoch = math.ceil(len(pools) / 8)
    assert [r["step"] for r in log if "dev" in r] == [steps_per_epoch, 2 * steps_per_epoch, 3 * steps_per_epoch]
    assert summary["stopped_early"] and summary["steps"] == 3 * steps_per_epoch
    assert summary["best_step"] == steps_per_epoch and (tmp_path / "patient" / MODEL_DIR).is_dir()


def test_cli_refuses_bad_distillation_and_selection_settings(small, tiny_model, tmp_path, capsys):
    from hardneg.cli import main

    _, pools = small
    write_pools(tmp_path / "pools.jsonl", pools)  # no pools.meta.json naming a teacher: student scores
    base = ["--quiet", "train", "--pools", str(tmp_path / "pools.jsonl"), "--data", "nfcorpus-demo",
            "--model", str(tiny_model), "--output", str(tmp_path / "out")]
    for extra, message in ((["--loss", "kd"], "distillation needs pools mined with a teacher"),
                           (["--distill-weight", "0.5"], "distillation needs pools mined with a teacher"),
                           (["--dev-fraction", "0.7"], "dev_fraction: must be <= 0.5"),
                           (["--dev-corpus-size", "100"], "nothing scores on dev"),
                           (["--dev-fraction", "0.2", "--dev-corpus-size", "0"], "dev_corpus_size: must be > 0"),
                           (["--patience", "2"], "no qrels for split 'dev'"),
                           (["--dev-fraction", "0.2", "--dev-split", "test"], "give one or the other")):
        assert main(base + extra) == 2, extra
        error = capsys.readouterr().err
        assert error.count("\n") == 1 and message in error, error
        assert not (tmp_path / "out").exists()


def test_cli_selects_on_held_out_training_queries(small, tiny_model, tmp_path, capsys):
    from hardneg.cli import main

    _, pools = small
    write_pools(tmp_path / "pools.jsonl", pools)
    code = main(["--quiet", "train", "--pools", str(tmp_path / "pools.jsonl"), "--data", "nfcorpus-demo",
                 "--model", str(tiny_model), "--output", str(tmp_path / "out"), "--batch-size", "8",
                 "--max-length", "24", "--lr", "1e-3", "--epochs", "2", "--dev-fraction", "0.2",
                 "--random-negatives", "2"])
    out = capsys.readouterr().out
    assert code == 0
    log = [json.loads(line) for line in (tmp_path / "out" / TRAIN_LOG).read_text().splitlines()]
    kept = len(pools) - round(0.2 * len(pools))
    assert [r["step"] for r in log if "dev" in r] == [math.ceil(kept / 8), 2 * math.ceil(kept / 8)]
    assert "on held-out training queries" in out and (tmp_path / "out" / MODEL_DIR / "model.safetensors").is_file()


def test_dev_subset_keeps_every_judged_document_then_the_distractors_then_random_ones(small):
    """Against the rule written out: judged documents, then distractors in their order (every query's hardest
    negative before any query's second), then a seeded draw of the rest, to exactly ``size`` documents in corpus
    order."""
    data, pools = small
    _, held = hold_out(pools, 0.25, seed=1)
    dev = pools_dataset(held, data.corpus, data)
    judged = {d for q in dev.qrels for d in dev.qrels[q] if d in data.corpus}
    by_rank = [pool.negatives[rank].doc_id for rank in range(8) for pool in held if rank < len(pool.negatives)]
    assert mined_negatives(held) == by_rank
    distractors = list(dict.fromkeys(d for d in by_rank if d not in judged))  # the new ones, first time seen
    assert len(distractors) > 2
    size = len(judged) + len(distractors) + 40
    sub, kinds = dev_subset(dev, size, seed=5, distractors=mined_negatives(held))
    ids = sub.corpus.ids
    assert len(ids) == size and len(set(ids)) == size
    assert kinds == {"judged": len(judged), "mined negatives": len(distractors), "random": 40}
    assert judged | set(distractors) <= set(ids)
    assert ids == [d for d in data.corpus.ids if d in set(ids)]  # corpus order
    assert all(sub.corpus.text_of(d) == data.corpus.text_of(d) for d in ids)
    assert sub.queries == dev.queries and sub.qrels == dev.qrels
    assert dev_subset(dev, size, seed=5, distractors=mined_negatives(held))[0].corpus.ids == ids  # seeded
    assert dev_subset(dev, size, seed=6, distractors=mined_negatives(held))[0].corpus.ids != ids
    few, _ = dev_subset(dev, len(judged) + 2, seed=5, distractors=by_rank)  # full before the distractors end
    assert set(few.corpus.ids) == judged | set(distractors[:2])
    alone, kinds = dev_subset(dev, 1, seed=5)
    assert set(alone.corpus.ids) == judged and kinds["judged"] == len(judged)  # the judged stay, whatever the size
    assert dev_subset(dev, len(data.corpus), seed=5) == (dev, {})


def test_the_dev_evaluator_over_a_subset_scores_as_evaluation_on_that_subset(small, tiny_model):
    from eval.evaluate import dev_evaluator, evaluate
    from retriever.data import Corpus
    from retriever.dense import DenseRetriever
    from retriever.encoder import DualEncoder

    data, pools = small
    _, held = hold_out(pools, 0.25, seed=1)
    dev = pools_dataset(held, data.corpus, data)
    score = dev_evaluator(dev, "nDCG@10", corpus_size=120, distractors=mined_negatives(held), seed=3)
    chosen = set(dev_subset(dev, 120, seed=3, distractors=mined_negatives(held))[0].corpus.ids)
    rows = [i for i, d in enumerate(data.corpus.ids) if d in chosen]
    by_hand = replace(dev, corpus=Corpus([data.corpus.ids[i] for i in rows], [data.corpus.titles[i] for i in rows],
                                         [data.corpus.bodies[i] for i in rows]))
    model = DualEncoder.load(str(tiny_model))
    expected = evaluate(by_hand, DenseRetriever(model, show_progress=False), metrics=("nDCG@10",),
                        depth=100)["metrics"]["nDCG@10"]
    assert score.documents == 120 and score.subset_note.startswith(f"over 120 of the {len(data.corpus):,} documents")
    assert score(model) == pytest.approx(expected, abs=1e-9)
    whole = dev_evaluator(dev, "nDCG@10")
    assert whole.documents == len(data.corpus) and whole.subset_note == ""
    crowded = dev_evaluator(dev, "nDCG@10", corpus_size=5, distractors=mined_negatives(held))
    assert "the judged documents alone fill dev_corpus_size 5" in crowded.subset_note


def test_cli_selects_over_a_subset_of_the_corpus(small, tiny_model, tmp_path, capsys):
    from hardneg.cli import main

    _, pools = small
    write_pools(tmp_path / "pools.jsonl", pools)
    code = main(["train", "--pools", str(tmp_path / "pools.jsonl"), "--data", "nfcorpus-demo",
                 "--model", str(tiny_model), "--output", str(tmp_path / "out"), "--batch-size", "8",
                 "--max-length", "24", "--epochs", "1", "--dev-fraction", "0.2", "--dev-corpus-size", "300"])
    assert code == 0
    assert "over 300 of the 2,000 documents (" in capsys.readouterr().err
    log = [json.loads(line) for line in (tmp_path / "out" / TRAIN_LOG).read_text().splitlines()]
    assert any("dev" in record for record in log)
    recorded = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert recorded["config"]["dev_corpus_size"] == 300


# ------------------------------------------------------------------------- in-batch distillation (distill_scope)

def test_batch_teacher_scores_every_cell_of_the_global_batch(small, tiny_model):
    """Each query of the global batch (two processes' slices) against every column, as the teacher scores the pair:
    checked against the teacher's own embeddings."""
    from mining.sources import dense
    from retriever.encoder import DualEncoder
    from retriever.train import batch_teacher_scores, global_layout, rank_slices

    data, pools = small
    batch = epoch_batches(pools, TrainConfig(batch_size=8, negatives_per_query=2, random_negatives=1, seed=3), 0,
                          list(data.corpus.ids))[0]
    slices = rank_slices(batch, 2)
    matrix = batch_teacher_scores(dense(str(tiny_model), show_progress=False), data.corpus, slices)
    _, column_ids, _ = global_layout(slices)
    encoder = DualEncoder.load(str(tiny_model))
    queries = encoder.encode_queries([example.query for part in slices for example in part])
    documents = encoder.encode_documents([data.corpus.text_of(doc_id) for doc_id in column_ids])
    assert matrix.shape == (len(batch), len(column_ids))
    assert torch.allclose(matrix, torch.from_numpy(queries @ documents.T), atol=1e-5)


def test_a_batch_step_distils_over_every_cell(small, tiny_model):
    """The loss of a batch-scope step is InfoNCE + w x KL over the whole (query x column) matrix with the teacher's
    scores of every cell, recomputed here from the embeddings."""
    from mining.sources import dense
    from retriever.encoder import DualEncoder
    from retriever.losses import build_masks
    from retriever.train import _loss_module, _train_step, global_layout

    data, pools = small
    config = _config(tiny_model, distill_weight=0.5, distill_scope="batch", teacher_temperature=0.1)
    slices = [epoch_batches(pools, config, 0)[0]]
    teacher = dense(str(tiny_model), show_progress=False)
    model = DualEncoder.load(str(tiny_model), max_length=32)
    model.set_dropout(0.0)
    model.train()
    loss = _train_step(model, _loss_module(config), slices, 0, data.corpus, config, None, None, torch.device("cpu"),
                       True, teacher)
    positive_ids, column_ids, target_columns = global_layout(slices)
    targets, negatives = build_masks(positive_ids, column_ids, target_columns)
    with torch.no_grad():
        scores = (model.embed([e.query for e in slices[0]], is_query=True)
                  @ model.embed([data.corpus.text_of(d) for d in column_ids], is_query=False).T)
    reference = teacher.score(data.corpus, {e.query_id: e.query for e in slices[0]},
                              {e.query_id: column_ids for e in slices[0]})
    teacher_matrix = torch.tensor([[reference[e.query_id][d] for d in column_ids] for e in slices[0]])
    expected = info_nce(scores, targets, negatives, 0.05) + 0.5 * distillation(
        scores, teacher_matrix, torch.ones_like(targets), targets, 0.05, 0.1)
    assert loss == pytest.approx(float(expected), rel=1e-4)
    pools_loss = _train_step(model, _loss_module(replace(config, distill_scope="pools")), slices, 0, data.corpus,
                             config, None, None, torch.device("cpu"), True)
    assert pools_loss != pytest.approx(loss, rel=1e-3)  # the pools' few scored cells are another term


def test_batch_scope_needs_a_teacher_and_a_distillation(small, tiny_model, tmp_path, capsys):
    from hardneg.cli import main

    data, pools = small
    with pytest.raises(HardnegError, match="nothing distils"):
        _config(tiny_model, distill_scope="batch").check()
    with pytest.raises(HardnegError, match="needs the teacher to score each batch with"):
        train(_scored_pools(pools), data.corpus, _config(tiny_model, distill_weight=0.5, distill_scope="batch"),
              tmp_path / "m", show_progress=False)
    # pools that `hardneg mine` scored with the student alone have no teacher to rebuild
    assert main(["--quiet", "mine", "--data", "nfcorpus-demo", "--retriever", str(tiny_model), "--depth", "10",
                 "--num-negatives", "2", "--filter", "topk", "--output", str(tmp_path / "pools"), "--no-cache"]) == 0
    base = ["--quiet", "train", "--pools", str(tmp_path / "pools"), "--data", "nfcorpus-demo", "--model",
            str(tiny_model), "--output", str(tmp_path / "out"), "--distill-weight", "0.5", "--distill-scope", "batch"]
    assert main(base) == 2
    assert "distillation needs pools mined with a teacher" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_distils_over_the_batch_with_the_recorded_fused_teacher(tiny_model, tmp_path, capsys):
    """Pools mined with ``--fuse-bm25`` (the student fused with BM25): ``train --distill-scope batch`` rebuilds that
    teacher from pools.meta.json and trains."""
    from hardneg.cli import main

    pools = tmp_path / "pools"
    assert main(["--quiet", "mine", "--data", "nfcorpus-demo", "--retriever", str(tiny_model), "--fuse-bm25", "0.3",
                 "--depth", "10", "--num-negatives", "2", "--filter", "topk", "--output", str(pools),
                 "--no-cache"]) == 0
    meta = json.loads((pools / "pools.meta.json").read_text())
    assert meta["settings"]["rescorer"].startswith("fused-z(")
    code = main(["--quiet", "train", "--pools", str(pools), "--data", "nfcorpus-demo", "--model", str(tiny_model),
                 "--output", str(tmp_path / "out"), "--distill-weight", "0.5", "--distill-scope", "batch",
                 "--batch-size", "32", "--max-steps", "3", "--max-length", "24", "--no-cache"])
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "training_config.json").read_text())
    assert record["config"]["distill_scope"] == "batch" and record["summary"]["steps"] == 3


@pytest.mark.parametrize("changes, message", [
    ({"teacher_temperature": 2.0}, "teacher_temperature 2.0 only shapes .* nothing distils.* at its default \\(None"),
    ({"distill_form": "margin-mse"}, "distill_form 'margin-mse' only shapes .* at its default \\('kl'\\)"),
    ({"loss": "kd", "negatives_per_query": 0}, "1 positive.* \\+ 0 negative.* the term is always 0"),
    ({"distill_weight": 1.0, "distill_form": "margin-mse", "negatives_per_query": 0}, "no query has a pair"),
])
def test_a_distillation_setting_that_cannot_act_is_refused(changes, message):
    """Silently ignored (a teacher temperature without distillation) or silently 0 (a pool-scope KL over one
    document per query trained a model with a zero loss and zero gradients)."""
    with pytest.raises(HardnegError, match=message):
        TrainConfig(**changes).check()
    TrainConfig(loss="kd", negatives_per_query=0, positives_per_query=2).check()  # two positives to compare
    TrainConfig(loss="kd", negatives_per_query=0, distill_scope="batch").check()  # the whole batch is scored
