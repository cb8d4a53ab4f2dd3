#!/usr/bin/env bash
# Saves the PTX, and where the machine has ptxas the register use and SASS,
# of one qmatmul kernel, for reading its inner loop. On the GPU machine:
#
#   bash scripts/kernel_asm.sh DEST [profile_kernels.py args...]
#   e.g. bash scripts/kernel_asm.sh $OUT/asm_fwd --op fwd --m 1
set -euo pipefail
dest=$1; shift
python3 experiments/profile_kernels.py --ptx_out "$dest" "$@" \
  > "$dest.log" 2>&1
ptxas=$(command -v ptxas || find / -name ptxas -type f 2>/dev/null | head -1 \
        || true)
echo "ptxas: ${ptxas:-none}" >> "$dest.log"
[[ -n "$ptxas" ]] || exit 0
cuobjdump=$(command -v cuobjdump || find / -name cuobjdump -type f \
            2>/dev/null | head -1 || true)
for f in "$dest"/*.ptx; do
  base=${f%.ptx}
  "$ptxas" -arch=sm_90a -v -o "$base.cubin" "$f" > "$base.ptxas.log" 2>&1 \
    || true
  if [[ -n "$cuobjdump" && -f "$base.cubin" ]]; then
    "$cuobjdump" -sass "$base.cubin" > "$base.sass" 2>&1 || true
  fi
  rm -f "$base.cubin"
done
ls -la "$dest"
