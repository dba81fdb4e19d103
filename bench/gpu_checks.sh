#!/bin/bash
# The GPU checks behind BENCHMARKS.md's H200 rows, in one script: run from the repository root on a CUDA
# machine with hardneg installed (`pip install -e '.[dev]'` with a CUDA build of torch) and a BEIR
# nfcorpus folder (default ../shared/data/beir/nfcorpus). About 6 minutes on an H200.
#
#   bash bench/gpu_checks.sh [NFCORPUS_DIR] [MODEL]
#
# 1. the test suite, whose CUDA variants (gradient cache under fp16 + loss scaler and bf16, the mixed-
#    precision trainer, one GPU per process) run only where CUDA is present;
# 2. naive top-k vs TopK-PercPos 95 %, and the three losses at 2 positives per step (configs/nfcorpus.yaml),
#    five runs side by side on the one GPU;
# 3. training step time and CUDA memory against sentence-transformers (bench/bench_training.py);
# 4. corpus encoding throughput against sentence-transformers, fp32 and auto (bench/bench_encoding.py).
# The quality runs pin fp32 encoding and training, as the H200 rows of BENCHMARKS.md were measured.
set -u
DATA=${1:-../shared/data/beir/nfcorpus}
MODEL=${2:-all-MiniLM-L6-v2}
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

python -m pytest -q tests -rs 2>&1 | tee "$OUT/pytest.log" | tail -5

run() {
  local name=$1; shift
  OMP_NUM_THREADS=3 hardneg run configs/nfcorpus.yaml --model "$MODEL" --set data.path="$DATA" \
      --set encode.precision=fp32 --set train.precision=fp32 --output-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $?"
}
run percpos-infonce-p1 &
run topk-infonce-p1 --set mine.filter=topk --set 'mine.filter_params={}' --set evaluate.before=false &
for loss in infonce mw decoupled; do
  run "percpos-$loss-p2" --set train.loss=$loss --set train.positives_per_query=2 --set evaluate.before=false &
done
wait
for f in "$OUT"/*/run.json; do
  python -c "import json, sys; r = json.load(open(sys.argv[1])); print(sys.argv[1], json.dumps(r['metrics']))" "$f"
done

python bench/bench_training.py --device cuda --model "$MODEL" --data "$DATA" --batch-size 32 --chunk-size 16 \
    --max-length 128 --steps 10 --memory-batches 32 64 128 256 512 --memory-chunks 16 \
    --uncached-batches 32 64 128 256 --output "$OUT/training-cuda.json" 2>&1 | tail -20

python bench/bench_encoding.py --device cuda --data "$DATA" --docs 1000 --repeats 5 \
    --methods st,hardneg-fp32,hardneg-auto --output "$OUT/encoding-cuda.json" 2>&1 | tail -6
