"""``torchrun --nproc-per-node 2 -m hardneg mine|evaluate`` (gloo, CPU) gives what one process gives.

Each rank encodes and searches its contiguous share of the corpus; the per-shard top-k lists are merged with the
one-process tie rule. The data is the demo's 2,000 documents and 5 copies (two encoding blocks of unequal size)
and, at the end of the corpus (the second rank's shard), copies of documents from the start (the first rank's):
equal scores across shards, which must come out in corpus order as one process orders them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small

from retriever.data import POOLS_FILE, POOLS_META, load_beir
from retriever.embedding_cache import BLOCK_MIN

pytestmark = pytest.mark.slow

DUPLICATES = 5  # documents of the first shard copied to the end of the corpus (2,000 + 5: an odd count)


def _write_folder(folder: Path, train, test) -> Path:
    corpus = train.corpus
    ids, titles, bodies = list(corpus.ids), list(corpus.titles), list(corpus.bodies)
    for i in range(DUPLICATES):
        ids.append(f"copy-of-{ids[i]}")
        titles.append(titles[i])
        bodies.append(bodies[i])
    folder.mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as handle:
        for doc_id, title, body in zip(ids, titles, bodies):
            handle.write(json.dumps({"_id": doc_id, "title": title, "text": body}) + "\n")
    queries = train.queries | test.queries
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as handle:
        for query_id, text in queries.items():
            handle.write(json.dumps({"_id": query_id, "text": text}) + "\n")
    (folder / "qrels").mkdir()
    kept = set(ids)
    for split, data in (("train", train), ("test", test)):
        lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{g}" for q, judged in data.qrels.items()
                                                 for d, g in judged.items() if d in kept]
        (folder / "qrels" / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory, demo_train, demo_test):
    return _write_folder(tmp_path_factory.mktemp("sharded") / "data", small(demo_train, 24), small(demo_test, 12))


def _split(documents: int) -> list[int]:
    """The documents each of two ranks holds: whole encoding blocks, the first rank one more."""
    return [BLOCK_MIN, documents - BLOCK_MIN]


def _hardneg(args: list[str], processes: int, tmp_path: Path,
             extra_path: Path | None = None) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc-per-node", str(processes), "-m", "hardneg"] if processes > 1 else [sys.executable, "-m",
                                                                                          "hardneg"]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                        "PYTHONPATH": os.pathsep.join(([str(extra_path)] if extra_path else []) + sys.path)}
    return subprocess.run(launcher + ["--quiet", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.parametrize("index", ["Flat", "IVF4,Flat"])
def test_two_processes_mine_the_pools_of_one(folder, tiny_model, tmp_path, index):
    common = ["mine", "--data", str(folder), "--split", "train", "--retriever", str(tiny_model), "--depth", "30",
              "--num-negatives", "4", "--encode-precision", "fp32", "--index", index]
    if index != "Flat":
        common += ["--nprobe", "4"]  # every list searched: exact, so the shards' IVF indexes agree with one
    _ok(_hardneg([*common, "--output", "one", "--cache-dir", "cache-one"], 1, tmp_path))
    _ok(_hardneg([*common, "--output", "two", "--cache-dir", "cache-two"], 2, tmp_path))
    assert (tmp_path / "two" / POOLS_FILE).read_bytes() == (tmp_path / "one" / POOLS_FILE).read_bytes()
    documents = len(load_beir(folder, "train").corpus)
    meta = json.loads((tmp_path / "two" / POOLS_META).read_text())
    assert meta["sharding"][0]["world_size"] == 2
    assert [r["documents"] for r in meta["sharding"][0]["ranks"]] == _split(documents)
    assert [r["encoded"] for r in meta["sharding"][0]["ranks"]] == _split(documents)
    # each rank cached its own rows; one process reuses them and encodes nothing
    assert sorted(p.name.split(".", 1)[1] for p in (tmp_path / "cache-two").glob("*.npy")) == [
        f"rows-0-{BLOCK_MIN}.npy", f"rows-{BLOCK_MIN}-{documents}.npy"]
    _ok(_hardneg([*common, "--output", "again", "--cache-dir", "cache-two"], 1, tmp_path))
    again = json.loads((tmp_path / "again" / POOLS_META).read_text())
    assert again["sharding"][0]["ranks"] == [{"rank": 0, "documents": documents, "encoded": 0}]
    assert (tmp_path / "again" / POOLS_FILE).read_bytes() == (tmp_path / "one" / POOLS_FILE).read_bytes()


def test_a_fused_teacher_gives_the_pools_of_one_process(folder, tiny_model, tmp_path):
    """``--fuse-bm25``: the dense z-scores come from corpus moments summed per encoding block across the ranks, BM25's
    from each rank's share of the queries; the fused pools are byte-identical to one process's."""
    common = ["mine", "--data", str(folder), "--split", "train", "--retriever", str(tiny_model), "--depth", "30",
              "--num-negatives", "4", "--encode-precision", "fp32", "--fuse-bm25", "0.3", "--filter",
              "topk-marginpos", "--margin", "0", "--anchor", "mean", "--no-cache"]
    _ok(_hardneg([*common, "--output", "one"], 1, tmp_path))
    _ok(_hardneg([*common, "--output", "two"], 2, tmp_path))
    assert (tmp_path / "two" / POOLS_FILE).read_bytes() == (tmp_path / "one" / POOLS_FILE).read_bytes()
    meta = json.loads((tmp_path / "two" / POOLS_META).read_text())
    assert meta["settings"]["rescorer"].startswith("fused-z(")
    assert {r["model"].split(":")[0] for r in meta["sharding"]} >= {"bm25"}


def test_bm25_and_a_cross_encoder_split_their_work_and_give_the_pools_of_one(demo_train, demo_test,
                                                                            tiny_cross_encoder, tmp_path):
    """BM25 scores a contiguous share of the queries on each rank (13 and 12 of 25: uneven), the cross-encoder a
    run of whole batches of the one-process order (batches of 7, so the pairs split unevenly too); the pools are
    byte-identical to one process's, and pools.meta.json says what each rank did."""
    folder = _write_folder(tmp_path / "data", small(demo_train, 25), small(demo_test, 5))
    common = ["mine", "--data", str(folder), "--split", "train", "--retriever", "bm25", "--cross-encoder",
              str(tiny_cross_encoder), "--cross-encoder-batch-size", "7", "--encode-max-length", "64",
              "--encode-precision", "fp32", "--depth", "20", "--num-negatives", "4", "--filter", "topk-marginpos",
              "--margin", "0", "--anchor", "max", "--no-cache"]
    _ok(_hardneg([*common, "--output", "one"], 1, tmp_path))
    _ok(_hardneg([*common, "--output", "two"], 2, tmp_path))
    assert (tmp_path / "two" / POOLS_FILE).read_bytes() == (tmp_path / "one" / POOLS_FILE).read_bytes()
    assert json.loads((tmp_path / "one" / POOLS_META).read_text())["sharding"] == []  # one process splits nothing
    two = {r["model"].split(":")[0]: r for r in json.loads((tmp_path / "two" / POOLS_META).read_text())["sharding"]}
    assert [r["queries"] for r in two["bm25"]["ranks"]] == [13, 12]
    pairs = [r["pairs"] for r in two["cross-encoder"]["ranks"]]
    assert 0 < pairs[1] <= pairs[0] and pairs[0] % 7 == 0  # the first rank's shares are whole batches
    evaluate = ["evaluate", "--data", str(folder), "--split", "test", "--retriever", "bm25", "--no-plots",
                "--metrics", "nDCG@10,Recall@100,AUC,AUC-corpus,AUC-pooled"]
    _ok(_hardneg([*evaluate, "--output", "eval-one"], 1, tmp_path))
    _ok(_hardneg([*evaluate, "--output", "eval-two"], 2, tmp_path))
    records = [json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("eval-one", "eval-two")]
    assert records[0]["metrics"] == records[1]["metrics"]
    assert (tmp_path / "eval-one" / "run.trec").read_text() == (tmp_path / "eval-two" / "run.trec").read_text()
    assert [r["queries"] for r in records[1]["sharding"][0]["ranks"]] == [3, 2]
    assert two["bm25"]["world_size"] == two["cross-encoder"]["world_size"] == 2


def test_ties_across_shards_come_in_corpus_order(folder, tiny_model, tmp_path):
    """A copy of a first-shard document sits in the second shard with the same score: one process puts the
    original first (lower corpus position), and so must the merge of two shards."""
    _ok(_hardneg(["mine", "--data", str(folder), "--split", "train", "--retriever", str(tiny_model), "--depth",
                  "400", "--num-negatives", "400", "--filter", "topk", "--encode-precision", "fp32", "--output",
                  "two", "--no-cache"], 2, tmp_path))
    corpus = load_beir(folder, "train").corpus
    seen_pairs = 0
    for line in (tmp_path / "two" / POOLS_FILE).read_text().splitlines():
        negatives = [n["doc_id"] for n in json.loads(line)["negatives"]]
        for original in corpus.ids[:DUPLICATES]:
            copy = f"copy-of-{original}"
            if original in negatives and copy in negatives:
                seen_pairs += 1
                assert negatives.index(original) < negatives.index(copy)
    assert seen_pairs > 0


def test_two_processes_evaluate_as_one(folder, tiny_model, tmp_path):
    """Search, whole-corpus AUC (each rank counts over its own rows) and the pooled sample equal one process's;
    the shards cached by two processes are read back by one, which encodes nothing."""
    common = ["evaluate", "--data", str(folder), "--split", "test", "--retriever", str(tiny_model),
              "--encode-precision", "fp32", "--depth", "100", "--no-plots",
              "--metrics", "nDCG@10,Recall@100,MRR@10,AUC,AUC-corpus,AUC-pooled"]
    _ok(_hardneg([*common, "--output", "one", "--no-cache"], 1, tmp_path))
    two = _ok(_hardneg([*common, "--output", "two", "--cache-dir", "cache"], 2, tmp_path))
    _ok(_hardneg([*common, "--output", "again", "--cache-dir", "cache"], 1, tmp_path))
    one_record = json.loads((tmp_path / "one" / "metrics.json").read_text())
    for name in ("two", "again"):
        record = json.loads((tmp_path / name / "metrics.json").read_text())
        assert record["metrics"] == one_record["metrics"], name
        assert (tmp_path / name / "run.trec").read_text() == (tmp_path / "one" / "run.trec").read_text()
        assert (json.loads((tmp_path / name / "per_query.json").read_text())
                == json.loads((tmp_path / "one" / "per_query.json").read_text()))
    two_record = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two_record["sharding"][0]["world_size"] == 2
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())["sharding"][0]["ranks"]
    assert again == [{"rank": 0, "documents": len(load_beir(folder, "test").corpus), "encoded": 0}]
    assert two.stdout.count("wrote metrics.json") == 1  # rank 0 reports for the job


DYING_RANK = """
import os, time
from pathlib import Path

if os.environ.get("RANK") == "1":
    from retriever import dense

    original = dense.DenseRetriever._encode

    def _encode(self, texts, *, is_query, **options):
        if not is_query:  # die as this rank starts its rows, once rank 0 has cached its own
            deadline = time.time() + 120
            while not list(Path("cache").glob("*.rows-0-*.json")) and time.time() < deadline:
                time.sleep(0.2)
            os._exit(17)
        return original(self, texts, is_query=is_query, **options)

    dense.DenseRetriever._encode = _encode
"""


def test_a_rank_that_dies_stops_the_job_and_a_rerun_resumes_from_its_shards(folder, tiny_model, tmp_path):
    """Rank 1 dies (exit 17, as an out-of-memory kill would) as it starts encoding its rows: the job stops with
    a message, rank 0's rows stay cached, and one process run again encodes only the rows rank 1 never wrote."""
    common = ["mine", "--data", str(folder), "--split", "train", "--retriever", str(tiny_model), "--depth", "30",
              "--num-negatives", "4", "--encode-precision", "fp32", "--cache-dir", "cache", "--output", "pools"]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(DYING_RANK)
    failed = _hardneg(common, 2, tmp_path, extra_path=hook)
    assert failed.returncode != 0
    # rank 0 reports the lost peer, unless torchrun, which also saw rank 1 exit, stops it first (a race a loaded
    # machine can lose): then rank 0 says it was interrupted and how to continue; never a bare traceback of ours
    stopped = ("hardneg: rank 0: ", "hardneg: interrupted; outputs are whole or absent")
    assert any(message in failed.stderr for message in stopped), failed.stderr[-3000:]
    assert not (tmp_path / "pools" / POOLS_FILE).exists()
    cached = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(cached) == 1 and ".rows-0-" in cached[0].name  # rank 0 finished its rows
    _ok(_hardneg(common, 1, tmp_path))
    meta = json.loads((tmp_path / "pools" / POOLS_META).read_text())
    documents = len(load_beir(folder, "train").corpus)
    assert meta["sharding"][0]["ranks"][0]["encoded"] == _split(documents)[1]  # only rank 1's rows
    reference = ["mine", *common[1:-4], "--no-cache", "--output", "reference"]
    _ok(_hardneg(reference, 1, tmp_path))
    assert (tmp_path / "pools" / POOLS_FILE).read_bytes() == (tmp_path / "reference" / POOLS_FILE).read_bytes()


def test_query_blocks_shared_between_ranks_give_the_lists_of_one_process(tmp_path):
    """More queries than one encoding block (2,500: blocks of 1,024, the second rank holds the short last one)
    are encoded in shares and exchanged; the benchmark's own check compares the top-10 lists of one process
    in memory, two processes and one memory-mapped run."""
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_sharded.py"
    output = tmp_path / "sharded.json"
    env = os.environ | {"OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, str(script), "--documents", "5000", "--queries", "2500", "--depth", "30",
                    "--dimension", "16", "--output", str(output)], check=True, env=env, capture_output=True,
                   timeout=600)
    record = json.loads(output.read_text())
    assert record["same_top10_in_every_run"] is True
    two = next(run for run in record["runs"] if run["name"] == "memory-2")
    assert [rank["documents_held"] for rank in two["ranks"]] == [3 * BLOCK_MIN, 5000 - 3 * BLOCK_MIN]
    mapped = next(run for run in record["runs"] if run["name"] == "mmap-1")
    assert mapped["ranks"][0]["documents_encoded"] == 5000


def test_two_processes_encode_the_table_of_one(folder, tiny_model, tmp_path):
    """`torchrun hardneg encode`: each rank encodes its shard, rank 0 writes the one table, byte for byte what one
    process writes; and the table then mines with two processes as with one."""
    common = ["encode", "--model", str(tiny_model), "--data", str(folder), "--max-length", "32", "--no-cache"]
    _ok(_hardneg([*common, "--output", "one"], 1, tmp_path))
    _ok(_hardneg([*common, "--output", "two"], 2, tmp_path))
    for name in ("corpus.npy", "queries.npy", "corpus_ids.txt", "query_ids.txt", "corpus_text_hashes.npy"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    mine = ["mine", "--data", str(folder), "--split", "train", "--retriever", str(tmp_path / "one"), "--depth", "30",
            "--num-negatives", "4"]
    _ok(_hardneg([*mine, "--output", "pools-one"], 1, tmp_path))
    _ok(_hardneg([*mine, "--output", "pools-two"], 2, tmp_path))
    assert (tmp_path / "pools-one" / POOLS_FILE).read_bytes() == (tmp_path / "pools-two" / POOLS_FILE).read_bytes()
