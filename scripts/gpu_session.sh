#!/usr/bin/env bash
# Prepares a bare GPU machine (the device tool's) for the SmolLM2 jobs, then
# runs the command given as arguments. Used from the repository root:
#
#   bash scripts/gpu_session.sh stage-part .stage/p0/part00   # call 1
#   bash scripts/gpu_session.sh run python experiments/reproduce.py ...  # call 2+
#   bash scripts/gpu_session.sh reproduce --config=...:headline --workers=4
#
# `reproduce` runs experiments/reproduce.py with its results in /root/res
# (outside the tree the device tool re-copies on every call, so finished
# cells survive between calls), seeded from experiments/results/reproduce;
# stops it after $REPRO_TIMEOUT seconds (default 540; its running cells are
# stopped with it) and puts the cell JSONs this call wrote in
# $OUT/reproduce_cells.tgz (paths `<task>/<method>_s<seed>.json`).
#
# What it expects to have been carried (git-ignored folders):
#   .stage/p0/part00, .stage/p1/part01  the SmolLM2 GGUF split in two (one
#                                        call carries at most 64 MiB)
#   .stage/data                          copies of ../shared/data files
#   .whl2                                gguf, ml_collections, rouge-score,
#                                        nltk, defusedxml wheels
# It assembles the GGUF at $SMOLLM2_GGUF (checking its sha256), puts the data
# where experiments/configs expect ../shared/data, installs the wheels into
# /root/site, and exports PYTHONPATH and a persistent JAX compilation cache
# (so repeated cells skip recompiling).
set -euo pipefail
STAGE=/root/stage
SMOLLM2_GGUF=$STAGE/SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p $STAGE
for p in .stage/p0/part00 .stage/p1/part01; do
  if [[ -f $p ]]; then cp "$p" $STAGE/; fi
done
if [[ ! -f $SMOLLM2_GGUF && -f $STAGE/part00 && -f $STAGE/part01 ]]; then
  cat $STAGE/part00 $STAGE/part01 > $SMOLLM2_GGUF
  echo "$SHA  $SMOLLM2_GGUF" | sha256sum -c -
fi
if [[ -d .stage/data && ! -d ../shared/data/tasks ]]; then
  mkdir -p ../shared && cp -r .stage/data ../shared/
fi
if [[ -d .whl2 && ! -d /root/site/ml_collections ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /root/site .whl2/*.whl
fi
if [[ -d .whl && ! -d /root/site/bitsandbytes ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /root/site .whl/*.whl
fi
export PYTHONPATH=$PWD:/root/site XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR=/root/jax_cache PYTHONUNBUFFERED=1
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
export SMOLLM2_GGUF COMMIT=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
mode=$1; shift
case $mode in
  stage-part) ls -la $STAGE ;;
  run) "$@" ;;
  reproduce)
    mkdir -p /root/res  # seed with the finished cells, keep what is there
    cp -r --update=none experiments/results/reproduce/. /root/res/ 2>/dev/null \
      || cp -rn experiments/results/reproduce/. /root/res/
    marker=$(mktemp)
    timeout "${REPRO_TIMEOUT:-540}" python3 experiments/reproduce.py "$@" \
      --config.results_dir=/root/res --config.base.model="$SMOLLM2_GGUF" \
      || echo "reproduce.py exited with $?"
    (cd /root/res && find . -name '*.json' -newer "$marker" \
      | tar czf "$OUT/reproduce_cells.tgz" -T -)
    tar tzf "$OUT/reproduce_cells.tgz" ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
