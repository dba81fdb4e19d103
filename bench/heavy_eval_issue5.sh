#!/bin/bash
# The heavy runs behind the "Evaluation (issue 5)" section of BENCHMARKS.md, one after the other.
#   flock /tmp/hardneg-heavy.lock bash bench/heavy_eval_issue5.sh > runs/heavy_eval.log 2>&1
set -x
export OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD
PY=${PYTHON:-python}
for config in eval-nfcorpus-bm25 eval-msmarco-sample-bm25 eval-msmarco-sample-minilm eval-nfcorpus-minilm; do
  /usr/bin/time -f "$config: %e s" $PY -m hardneg.cli --quiet reproduce configs/$config.yaml
done
/usr/bin/time -f "bench: %e s" $PY bench/bench_eval.py --repeats 5
