#!/usr/bin/env bash
# Dumps the PTX (and, where the machine has ptxas, the register count and
# SASS) of one qmatmul kernel, for reading its inner loop.
#
#   bash scripts/kernel_asm.sh DEST [profile_kernels.py args...]
#   e.g. bash scripts/kernel_asm.sh $OUT/asm_fwd --op fwd --m 1
#
# XLA writes the module's PTX (the Pallas Triton kernel is linked into it)
# under --xla_dump_to; the files whose PTX holds a `qmatmul` entry are kept
# in DEST, with `ptxas -v` output and `cuobjdump -sass` beside them.
set -euo pipefail
dest=$1; shift
dump=$(mktemp -d)
mkdir -p "$dest"
XLA_FLAGS="--xla_dump_to=$dump" python3 experiments/profile_kernels.py "$@" \
  > "$dest/run.log" 2>&1
ptxas=$(command -v ptxas || find / -name ptxas -type f 2>/dev/null | head -1 || true)
for f in $(grep -l "qmatmul" "$dump"/*.ptx 2>/dev/null || true); do
  base=$(basename "$f" .ptx)
  cp "$f" "$dest/$base.ptx"
  if [[ -n "$ptxas" ]]; then
    "$ptxas" -arch=sm_90a -v -o "$dest/$base.cubin" "$f" \
      > "$dest/$base.ptxas.log" 2>&1 || true
    cuobjdump=$(dirname "$ptxas")/cuobjdump
    [[ -x "$cuobjdump" ]] || cuobjdump=$(command -v cuobjdump || true)
    if [[ -n "$cuobjdump" && -f "$dest/$base.cubin" ]]; then
      "$cuobjdump" -sass "$dest/$base.cubin" > "$dest/$base.sass" 2>&1 || true
    fi
    rm -f "$dest/$base.cubin"
  fi
done
ls -la "$dest"
