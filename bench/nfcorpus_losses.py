"""Train one loss on NFCorpus pools and evaluate it on dev and test (the quality table of BENCHMARKS.md).

    hardneg mine --data ../shared/data/beir/nfcorpus --retriever all-MiniLM-L6-v2 --anchor mean \\
        --output runs/nfc-pools                                   # once, shared by every loss
    python bench/nfcorpus_losses.py --pools runs/nfc-pools --loss infonce --output runs/nfc-infonce
    python bench/nfcorpus_losses.py --pools runs/nfc-pools --loss mw --output runs/nfc-mw
    python bench/nfcorpus_losses.py --pools runs/nfc-pools --loss decoupled --output runs/nfc-decoupled
    python bench/nfcorpus_losses.py --evaluate-only all-MiniLM-L6-v2 --output runs/nfc-untrained

It is ``hardneg train`` followed by ``hardneg evaluate`` on dev and on test, except that the corpus is
encoded once for both splits. Every loss gets the same pools, seed, batches and budget; only
``--loss`` differs. Training may be truncated (``--train-max-length``) to fit a 2-core CPU; evaluation
always uses the model's full length (256 tokens for all-MiniLM-L6-v2), as for the untrained figures.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from eval.evaluate import evaluate
from hardneg.pipeline import format_metrics
from retriever.data import load_dataset, read_pools
from retriever.dense import DenseRetriever
from retriever.encoder import DualEncoder
from retriever.io import file_checksum, write_json
from retriever.train import TrainConfig, train

METRICS = ("nDCG@10", "Recall@100", "MRR@10", "AUC")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/beir/nfcorpus"))
    parser.add_argument("--pools", help="folder with pools.jsonl")
    parser.add_argument("--model", default="all-MiniLM-L6-v2")
    parser.add_argument("--loss", default="infonce")
    parser.add_argument("--output", required=True)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--positives-per-step", type=int, default=2)
    parser.add_argument("--negatives-per-query", type=int, default=1)
    parser.add_argument("--train-max-length", type=int, default=128)
    parser.add_argument("--eval-max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--evaluate-only", help="skip training; evaluate this model")
    args = parser.parse_args()

    output = Path(args.output)
    dev = load_dataset(args.data, "dev")
    test = load_dataset(args.data, "test")
    test.corpus = dev.corpus  # one corpus object: encoded once for both splits
    record: dict = {"loss": args.loss, "settings": vars(args)}
    if args.evaluate_only:
        model_path = args.evaluate_only
    else:
        config = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size,
                             learning_rate=args.lr, loss=args.loss, temperature=args.temperature,
                             positives_per_query=args.positives_per_step,
                             negatives_per_query=args.negatives_per_query, max_length=args.train_max_length,
                             seed=args.seed)
        pools_file = os.path.join(args.pools, "pools.jsonl")
        pools = read_pools(pools_file, dev.corpus)
        record["training"] = train(pools, dev.corpus, config, output / "model",
                                   provenance={pools_file: file_checksum(pools_file)}).summary
        model_path = str(output / "model")
    encoder = DualEncoder.load(model_path, max_length=args.eval_max_length)
    retriever = DenseRetriever(encoder, batch_size=32, show_progress=True)
    record["metrics"] = {}
    for split in (dev, test):
        result = evaluate(split, retriever, metrics=METRICS, depth=1000, output_dir=output / "eval" / split.split)
        record["metrics"][split.split] = result["metrics"]
        print(format_metrics(result["metrics"], f"{args.loss} {split.split}"))
    write_json(output / "result.json", record)
    print(json.dumps(record["metrics"]))


if __name__ == "__main__":
    main()
