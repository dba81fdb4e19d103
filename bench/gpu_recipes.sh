#!/bin/bash
# Issue 11's NFCorpus sweep on one lent GPU: hardneg's cheap recipe and its ablations against the
# sentence-transformers peer at 1, 3 and 5 epochs, three seeds each, every (method, seed) its own process so that
# the runs share the GPU side by side (bench_recipes.py --only; the result.json files of one --output folder are
# per method and seed, and finished ones are skipped, so a cut-off sweep continues where it stopped).
# Run from the repository root with hardneg installed; MODEL is a local copy of all-MiniLM-L6-v2 (the device
# machine reaches no hub: carry an fp16-rounded copy, as BENCHMARKS.md's GPU rows did). The teacher recipe is not
# in this sweep: all-mpnet-base-v2 (420 MB) does not fit the 64 MiB the device tool carries.
#
#   bash bench/gpu_recipes.sh [NFCORPUS_DIR] [MODEL] [JOBS]
#   python bench/bench_recipes.py --output "$OUT/recipes-nfcorpus" --table      # the table, afterwards
set -u
DATA=${1:-../shared/data/beir/nfcorpus}
MODEL=${2:-all-MiniLM-L6-v2}
JOBS=${3:-8}
OUT=${OUT:-runs/gpu-recipes}
mkdir -p "$OUT/logs"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1

ABLATIONS=(--ablation no-random:train.random_negatives=0 --ablation lr5:train.learning_rate=5e-5
           --ablation epochs5:train.epochs=5 --ablation no-fallback:mine.anchor_fallback=null
           --ablation soup3:train.soup=3)
METHODS="untrained peer-1ep peer-3ep peer-5ep recipe-minilm recipe-minilm-no-random recipe-minilm-lr5
         recipe-minilm-epochs5 recipe-minilm-no-fallback recipe-minilm-soup3"
for seed in 42 43 44; do
  for method in $METHODS; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    python bench/bench_recipes.py --data "$DATA" --model "$MODEL" --seeds "$seed" --peer-epochs 1,3,5 \
        --recipe configs/recipe-minilm.yaml "${ABLATIONS[@]}" --only "$method" --output "$OUT/recipes-nfcorpus" \
        --work /tmp/gpu-recipes-work > "$OUT/logs/$method-$seed.log" 2>&1 &
  done
done
wait
python bench/bench_recipes.py --output "$OUT/recipes-nfcorpus" --table | tee "$OUT/recipes-nfcorpus.md"
