#!/bin/bash
# Issue 11's NFCorpus sweep on one lent GPU: hardneg's teacher recipe (configs/recipe-distill.yaml) and its
# ablation table (every lever of bench_recipes.LEVERS switched alone) against the sentence-transformers peer at 1,
# 3 and 5 epochs, three seeds each, every (method, seed) its own process so that the runs share the GPU side by
# side (bench_recipes.py --only; the result.json files of one --output folder are per method and seed, and
# finished ones are skipped, so a cut-off sweep continues where it stopped).
#
# The device machine reaches no hub and carries at most 64 MiB: MODEL is a local copy of all-MiniLM-L6-v2 (an
# fp16-rounded copy fits, as BENCHMARKS.md's GPU rows did), and the teacher travels as a table of its embeddings,
# not as its 420 MB of weights, written here once (about 10 MB for NFCorpus in float16) and carried with it:
#   hardneg encode --model "$(bash ../shared/models/fetch_mpnet.sh)" --data ../shared/data/beir/nfcorpus \
#       --dtype float16 --output bench/teacher-mpnet-nfcorpus
# Without TEACHER the sweep is the peer and the cheap recipe (configs/recipe-minilm.yaml) only.
#
#   bash bench/gpu_recipes.sh [NFCORPUS_DIR] [MODEL] [TEACHER] [JOBS]
#   DRY=1 bash bench/gpu_recipes.sh ...       # print the commands instead of running them
#   python bench/bench_recipes.py --output "$OUT/recipes-nfcorpus" --table      # the table, afterwards
set -u
DATA=${1:-../shared/data/beir/nfcorpus}
MODEL=${2:-all-MiniLM-L6-v2}
TEACHER=${3:-}
JOBS=${4:-8}
OUT=${OUT:-runs/gpu-recipes}
mkdir -p "$OUT/logs"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1

if [ -n "$TEACHER" ]; then
  RECIPE=(--recipe configs/recipe-distill.yaml --set "mine.teacher=$TEACHER" --ablation all)
  LEVERS=$(python -c "import runpy; print(' '.join(runpy.run_path('bench/bench_recipes.py')['LEVERS']))")
  METHODS="untrained peer-1ep peer-3ep peer-5ep recipe-distill $(printf 'recipe-distill-%s ' $LEVERS)"
else
  RECIPE=(--recipe configs/recipe-minilm.yaml)
  METHODS="untrained peer-1ep peer-3ep peer-5ep recipe-minilm"
fi
for seed in 42 43 44; do
  for method in $METHODS; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    command=(python bench/bench_recipes.py --data "$DATA" --model "$MODEL" --seeds "$seed" --peer-epochs 1,3,5
             "${RECIPE[@]}" --only "$method" --output "$OUT/recipes-nfcorpus" --work /tmp/gpu-recipes-work)
    if [ -n "${DRY:-}" ]; then echo "${command[*]}"; continue; fi
    "${command[@]}" > "$OUT/logs/$method-$seed.log" 2>&1 &
  done
done
wait
[ -n "${DRY:-}" ] || python bench/bench_recipes.py --output "$OUT/recipes-nfcorpus" --table | tee "$OUT/recipes-nfcorpus.md"
