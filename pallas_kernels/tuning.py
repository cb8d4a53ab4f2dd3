"""Block sizes, warps and pipelining depth of the quantized-matmul kernels.

A `TuningConfig` is static (frozen, hashable): one compiled kernel per config.
`choose(...)` picks one per shape class from a small table chosen by a sweep
on an H100 (WORKSPACE.md section 4, experiments/results/kernels_h100_*):
decode (M <= 16) should be bound by the bytes of the packed weight, so its
tiles are thin in M and narrow in N and the contraction is split over several
programs (fwd: up to 4, as measured best, fewer once the output tiles fill
the GPU; dx: until about a thousand programs share the GPU); prefill /
training (M >= 256) should be bound by the matrix units,
so its tiles are the large ones of a bf16 GEMM.

Word tiles. The kernels walk K in tiles of `block_k` packed *words* per plane
(a word holds `codes_per_word` codes, see qft_jax/_src/qarray.py), so one step
covers `codes_per_word * block_k` input columns. `effective_block_k` shrinks
`block_k` to a power of two that divides both `K / codes_per_word` and the
group size, so every (plane, word tile) lies inside one quantization group and
K never needs masking.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

SCALE_MODES = ("weights", "activations")
MAX_PREFETCH = 4
CONTRACTIONS = ("mma", "fma")
LOOKUPS = ("gather", "select")
UNPACKS = ("jnp", "ptx")
SPLIT_REDUCES = ("xla", "kernel")
PTX_BITS = (2, 4)  # uniform widths whose decode `choose` unpacks in PTX


@dataclasses.dataclass(frozen=True)
class TuningConfig:
  """Static knobs of one kernel launch.

  Attributes:
    block_m: rows of x (fwd) or dy (dx) per program; >= 16 (matrix-unit
      minimum) with `contraction="mma"`, exactly 1 with "fma"; masked when M
      is not a multiple.
    block_n: weight rows per program (fwd: output columns; dx: the
      contraction step); >= 16, masked when N is not a multiple.
    block_k: packed words per plane per step (upper bound, see
      `effective_block_k`); >= 16.
    num_warps: warps per program.
    num_stages: software-pipelining depth of the K (fwd) / N (dx) loop.
    scale_mode: where the group scale is applied.
      "weights": dequantize each weight tile in float32, `(q - z) * s`, cast to
        the activation dtype, then one matrix product (cheapest for large M).
      "activations": the tile holds the exact integers `q - z` (or codebook
        levels); fwd scales the float32 partial product of each group,
        `acc += s * (x @ (q - z)^T)`, dx scales the dy tile, `(dy * s) @ (q -
        z)`: O(block_m * block_n) multiplies instead of O(block_n * block_k),
        cheaper for small M. Codebook levels enter the matrix unit rounded
        to the activation dtype, one rounding per level shared by every
        weight with that code (not averaged out by the contraction), so
        `choose` takes it for codebooks at decode only (`_PTX_CODEBOOK`).
    group_m: programs along M that share one weight column tile before moving
      on (L2 reuse, fwd only).
    split_k: upper bound on the programs that share one output tile, each
      reducing a slice of the contraction (fwd: K, dx: N) into float32
      partials that one XLA reduction sums. Decode has too few output tiles
      to occupy the GPU; splitting the contraction multiplies the programs.
      `effective_split` shrinks it to the loop's trip count.
    contraction: how a tile's product is formed (fwd only).
      "mma": a matrix-unit product `deq(W_tile) @ x_tile^T` (bf16 operands,
        float32 accumulation); the dequantized tile must be converted to the
        operand layout, and M is padded to the 16-row minimum.
      "fma": one activation row per program (`block_m = 1`), the product
        `sum_k deq(W)[n, k] * x[k]` in float32 on the vector units, with a
        `(block_n, block_k)` accumulator reduced once at the end (needs
        `scale_mode="weights"`): no operand layout, no padded rows; each row
        re-reads the weight (L2), so it is a candidate for M = 1 decode
        only.
    prefetch: steps of loads in flight ahead of the arithmetic (0: none).
      With D > 0 the contraction loop carries the next D steps' loads
      (packed bytes, activation tiles, scales and zero points), issuing
      step t + D's before step t's arithmetic, so their memory latency
      overlaps it instead of stalling every step; each step ahead costs
      the registers of one step's operands.
    lookup: how codebook (NF4) codes become their float32 levels; uniform
      codes ignore it. Both are exact and give bitwise-equal outputs.
      "gather": `levels[c]`, a load from a 16-entry float32 operand per
        weight element (served by L1, but a memory instruction each).
      "select": a binary tree of `where`s over the code's bits with the
        static levels as constant operands, `2**bits - 1` selects (15 for
        NF4; about 20 ALU operations per element with the bit tests), no
        memory access and no codebook operand. Measured faster at every
        shape probed (`choose` picks it for codebooks): the gather's
        per-element loads cost more than the selects.
    unpack: how codes become 16-bit floats (`scale_mode=
      "activations"`, where the weight tile holds exact `q - z`, or the
      codebook levels rounded to the activation dtype).
      "jnp": each code on its own 32-bit lane (shift, mask, or, narrow,
        subtract: about 6 instructions per code).
      "ptx": four bytes per register, byte-permute + lop3 in inline PTX,
        two codes per instruction (tiles.py), then the subtraction (2/3/4/8-
        bit; 3-bit from its three byte planes, 8-bit in bf16 as `q - 128`
        by a paired bf16 multiply-add); 16-level codebooks (NF4) by
        a byte-permute table lookup, four levels per ~14 instructions
        (`tiles.level_planes`). The Pallas interpreter runs the jnp form
        instead. Decode is bound by instruction issue and latency, not
        bytes (WORKSPACE.md section 4), so fewer instructions per code
        shorten it: `choose` picks it for uniform 2/4-bit and NF4 decode
        with 16-bit activations (3- and 8-bit: prepared in session 9, not
        yet timed, so `choose` keeps the jnp form).
    split_reduce: who sums a split contraction's float32 partials
      (`split_k > 1`). "xla": a second kernel after the launch. "kernel":
      the last of each output tile's programs to finish (an atomic arrival
      counter per tile, tiles.store_split_result), saving that launch.
  """
  block_m: int = 16
  block_n: int = 32
  block_k: int = 128
  num_warps: int = 4
  num_stages: int = 3
  scale_mode: str = "activations"
  group_m: int = 8
  split_k: int = 1
  contraction: str = "mma"
  prefetch: int = 0
  lookup: str = "gather"
  unpack: str = "jnp"
  split_reduce: str = "xla"

  def __post_init__(self):
    _check_one_of("contraction", self.contraction, CONTRACTIONS)
    if self.contraction == "fma" and self.block_m != 1:
      raise ValueError(f"contraction='fma' takes one row per program "
                       f"(block_m=1), got block_m={self.block_m}")
    if self.contraction == "fma" and self.scale_mode != "weights":
      raise ValueError("contraction='fma' scales each weight tile before "
                       "its multiply-adds: it needs scale_mode='weights', "
                       f"got {self.scale_mode!r}")
    for name in ("block_m", "block_n", "block_k"):
      v = getattr(self, name)
      if name == "block_m" and self.contraction == "fma":
        continue
      if v < 16 or v & (v - 1):
        raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got "
                       f"{self.num_warps}")
    if self.num_stages < 1:
      raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
    _check_one_of("scale_mode", self.scale_mode, SCALE_MODES)
    if self.group_m < 1:
      raise ValueError(f"group_m must be >= 1, got {self.group_m}")
    if self.split_k < 1:
      raise ValueError(f"split_k must be >= 1, got {self.split_k}")
    if (isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int)
        or not 0 <= self.prefetch <= MAX_PREFETCH):
      raise ValueError(f"prefetch must be 0..{MAX_PREFETCH} steps ahead, got "
                       f"{self.prefetch}")
    _check_one_of("lookup", self.lookup, LOOKUPS)
    _check_one_of("unpack", self.unpack, UNPACKS)
    _check_one_of("split_reduce", self.split_reduce, SPLIT_REDUCES)
    if self.unpack == "ptx" and (self.scale_mode != "activations"
                                 or self.contraction != "mma"):
      raise ValueError("unpack='ptx' makes exact codes for the matrix "
                       "unit: it needs scale_mode='activations' and "
                       f"contraction='mma', got {self.scale_mode!r} and "
                       f"{self.contraction!r}")


def _check_one_of(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def largest_pow2_divisor(n: int, cap: int) -> int:
  """The largest power of two <= `cap` that divides `n` (n > 0)."""
  p = 1
  while p * 2 <= cap and n % (p * 2) == 0:
    p *= 2
  return p


def effective_block_k(block_k: int, words_per_plane: int, group: int) -> int:
  """Word tile actually used: a power of two dividing Kw and the group."""
  return largest_pow2_divisor(words_per_plane,
                              largest_pow2_divisor(group, block_k))


def effective_split(split_k: int, trips: int) -> int:
  """Contraction splits actually used: at most one loop trip per split."""
  return max(1, min(split_k, trips))


# Programs a dx decode launch aims for: ~8 resident per SM on a 132-SM H100.
DECODE_TARGET_PROGRAMS = 1024
MAX_SPLIT = 8


DECODE_MAX_M = 16
TRAIN_MIN_M = 256

# (op, shape class) -> config, from the sweep of run 1 on an H100
# (experiments/results/kernels_h100_2026-11-27_run1.json). block_k is the
# per-plane word tile before `choose` scales it with the codes per word.
_TABLE = {
    # Run 2's decode sweep (kernels_h100_2026-11-27.json, "sweep"; M = 16,
    # 4-bit): 11.5 / 23.7 us at N x K = 4096^2 / 11008x4096 against 13.0 /
    # 27.3 for run 1's entry (block_n 32, 2 warps, 5 stages, split to 1,024
    # programs). Its split is fixed, not grown with the program count.
    ("fwd", "decode"): TuningConfig(block_m=16, block_n=64, block_k=128,
                                    num_warps=4, num_stages=3,
                                    scale_mode="activations", split_k=4),
    ("fwd", "mid"): TuningConfig(block_m=128, block_n=64, block_k=64,
                                 num_warps=4, num_stages=3,
                                 scale_mode="weights"),
    ("fwd", "train"): TuningConfig(block_m=256, block_n=128, block_k=64,
                                   num_warps=8, num_stages=3,
                                   scale_mode="weights"),
    ("dx", "decode"): TuningConfig(block_m=16, block_n=256, block_k=32,
                                   num_warps=4, num_stages=3,
                                   scale_mode="activations"),
    ("dx", "mid"): TuningConfig(block_m=64, block_n=64, block_k=64,
                                num_warps=4, num_stages=3,
                                scale_mode="weights"),
    ("dx", "train"): TuningConfig(block_m=128, block_n=64, block_k=64,
                                  num_warps=4, num_stages=3,
                                  scale_mode="weights"),
}


# Geometry of PTX-unpacked decode, from session 7's second probe
# (kernels_probe_h100_2026-11-27_run4.json, M = 1): fwd 4-bit with half-
# width programs of 2 warps, 9.8 -> 8.3 us (4096^2) and 19.7 -> 17.2 us
# (11008x4096; 2-bit: 8.9 -> 8.3 but 16.5 -> 17.4, so it keeps the table's);
# dx with a 64-word tile, 19.2 -> 13.7 and 43.9 -> 31.4 us (4-bit). Session
# 8's probes (..._run5.json, reproduced in _run6.json) moved 4-bit dx to
# 128-row steps: 13.8 -> 12.8 and 31.6 -> 28.0 us.
_PTX_DECODE = {("fwd", 4): dict(block_n=32, num_warps=2),
               ("fwd", 2): {},
               ("dx", 4): dict(block_k=64, block_n=128),
               ("dx", 2): dict(block_k=64)}

# 4-bit fwd decode splits its contraction only as far as it needs to reach
# FWD4_TARGET_PROGRAMS programs (at most the table's 4). Session 9's probe
# 13 (kernels_probe_h100_2026-11-27_run13.json, M = 1): 11008x4096 (344
# output tiles of 32 rows) 17.1 us split 4, 15.1 split 2, 16.4 unsplit;
# 4096^2 (128 tiles) 8.2 us split 4, 8.8 split 2, 11.4 unsplit. XLA's sum
# of the partials costs 1.2-1.4 us a call (decode_breakdown_h100_2026-11-27
# .json), so fewer splits pay once the GPU is full without them.
FWD4_TARGET_PROGRAMS = 512

# 3-bit decode (8 planes per 3-byte word, unpacked in jnp): fwd with two
# pipeline stages instead of three, 15.6 -> 12.5 us (4096^2) and 37.9 ->
# 28.8 us (11008x4096) in session 8's probes (..._run5.json and _run6.json);
# dx with 128-row steps instead of 256, 50.7 -> 26.2 us and 118.2 -> 66.6 us
# in session 9's (..._run11.json). With 16-bit activations both unpack the
# three byte planes in PTX (`tiles._unpack_ptx`), session 10's probe
# (kernels_probe_h100_2026-11-28.json, M = 1): fwd 12.4 -> 9.8 us (4096^2)
# and 28.9 -> 22.0 us (11008x4096), dx 26.7 -> 23.2 and 66.6 -> 53.9 us.
# (8-bit's PTX unpacking lost in the same probe: fwd 13.0 -> 13.1 and 27.1
# -> 29.6 us, dx 27.2 -> 30.0 and 61.4 -> 68.1 us; 8-bit keeps the jnp form.)
_DECODE_3BIT = {"fwd": dict(num_stages=2), "dx": dict(block_n=128)}

# Codebook (NF4) levels by the PTX byte-permute lookup (tiles.level_planes),
# session 9's probes 11 and 12 (..._run11.json, _run12.json; QLoRA's
# double-quantized NF4, 4096^2 / 11008x4096): decode fwd with the 4-bit
# geometry split 8 ways, 27.7 -> 12.4 us (M = 1) and 68.0 -> 23.1 us
# (split 4: 12.9 / 23.9); decode dx with 4-bit dx's geometry, 37.8 -> 17.5
# and 89.9 -> 36.0 us (the lookup alone: 22.9 / 51.7).
# Not taken, on accuracy: training dx (M = 2048) with the PTX levels and the
# dy tile scaled ("activations") was 1.7x faster (385.7 -> 230.4 us,
# 1021.5 -> 595.9 us) and its output error matched (2.6e-3), but QLoRA's
# training check failed with it (pallas_training_h100_2026-11-27_run4_
# rejected.json: first-batch LoRA gradient 1.8e-2 from XLA's against the
# 1e-2 bound and 4.9e-3 with the "weights" mode). That mode rounds each
# weight `level * s` to bf16 once; this one rounds each of the 16 levels
# once, an error shared by every weight with that code, which sums over
# the contraction instead of averaging out. Decode keeps it: its rows are
# inference-sized, and the select tree's decode path rounds the levels the
# same way. Training fwd lost on speed (359.7 -> 430.6 us; uniform 4-bit
# lost at both training ops: fwd 154.0 -> 386.3, dx 205.7 -> 300.5 us).
_PTX_CODEBOOK = {("fwd", "decode"): dict(unpack="ptx", block_n=32,
                                         num_warps=2, split_k=8),
                 ("dx", "decode"): dict(unpack="ptx", block_k=64,
                                        block_n=128)}


# Prefill (TRAIN_MIN_M <= M < PREFILL_MAX_M) keeps the training class's
# config but not its tile sizes: at M = 256 they leave the GPU mostly idle
# (fwd N = 4096: 32 programs of 256 x 128). Session 8's probe 9
# (kernels_probe_h100_2026-11-27_run9.json, 4-bit, M = 256): dx with 64-row
# M tiles, half the word tile and the contraction split in two, 99.3 ->
# 52.6 us (4096^2) and 254.5 -> 129.9 us (11008x4096); fwd with 128 x 64
# tiles of 4 warps 72.5 -> 39.7 us where the training tiles give fewer than
# PREFILL_MIN_PROGRAMS programs (4096^2: 32), but 74.6 -> 86.3 us at
# 11008x4096 (86 programs), which keeps them. Probe 10 (..._run10.json)
# split those small fwd tiles' contraction in two: 39.8 -> 31.3 us.
PREFILL_MAX_M = 1024
PREFILL_MIN_PROGRAMS = 64


def _prefill(cfg: TuningConfig, op: str, m: int, n: int) -> TuningConfig:
  """The training config resized for prefill (see above). Probed at 4-bit;
  other widths and NF4 take the same shapes untimed (the reason, too few
  programs, does not depend on the code width)."""
  if op == "dx":
    return dataclasses.replace(cfg, block_m=64,
                               block_k=max(16, cfg.block_k // 2), split_k=2)
  programs = -(-m // cfg.block_m) * -(-n // cfg.block_n)
  if programs >= PREFILL_MIN_PROGRAMS:
    return cfg
  return dataclasses.replace(cfg, block_m=128, block_n=64, num_warps=4,
                             split_k=2)


def shape_class(m: int) -> str:
  if m <= DECODE_MAX_M:
    return "decode"
  if m >= TRAIN_MIN_M:
    return "train"
  return "mid"


def choose(op: str, m: int, n: int, k: int, bits: int, *,
           codebook: bool = False, dtype=None) -> TuningConfig:
  """The table's config for `op` ("fwd" or "dx") at this shape.

  Outside decode, one K step covers `codes_per_word * block_k` columns; the
  word tile shrinks with the codes per word to keep that <= 128 (the x tiles
  of all planes share the pipeline's shared memory, and dx keeps one float32
  accumulator per plane in registers). Decode: fwd takes the table's split;
  dx splits its contraction until about `DECODE_TARGET_PROGRAMS` programs
  run.

  Session 7's probe (experiments/results/kernels_probe_h100_2026-11-27_run3
  .json, M = 1) sets two knobs the table's geometry leaves open (and
  `_PTX_DECODE` the geometry that suits the PTX unpacking):
  codebook codes (`codebook=True`) look their levels up by select tree,
  1.4-1.6x faster than the gather at decode and 1.1-2.5x at M = 2048; and
  uniform 2/4-bit decode with 16-bit activations (`dtype` bf16 / f16)
  unpacks in PTX: 4-bit fwd 10.9 -> 9.9 us (4096^2) and 22.9 -> 19.7 us
  (11008x4096), 2-bit fwd 10.3 -> 8.9 and 24.1 -> 16.4 us, dx 2-4 % faster.
  3-bit decode has its own geometry (`_DECODE_3BIT`, PTX-unpacked with
  16-bit activations); codebook codes with
  16-bit activations take the PTX lookup at decode (`_PTX_CODEBOOK`); 4-bit
  fwd decode splits toward FWD4_TARGET_PROGRAMS programs.
  """
  if op not in ("fwd", "dx"):
    raise ValueError(f"op must be 'fwd' or 'dx', got {op!r}")
  cls = shape_class(m)
  cfg = _TABLE[(op, cls)]
  half = dtype is not None and jnp.dtype(dtype) in (jnp.bfloat16,
                                                     jnp.float16)
  if codebook:
    cfg = dataclasses.replace(cfg, lookup="select")
    if half and (op, cls) in _PTX_CODEBOOK:
      cfg = dataclasses.replace(cfg, **_PTX_CODEBOOK[(op, cls)])
  elif cls == "decode" and bits in PTX_BITS and half:
    cfg = dataclasses.replace(cfg, unpack="ptx", **_PTX_DECODE[(op, bits)])
  elif cls == "decode" and bits == 3:
    cfg = dataclasses.replace(cfg, **_DECODE_3BIT[op],
                              unpack="ptx" if half else cfg.unpack)
  cpw = 8 if bits == 3 else 8 // bits
  if cls != "decode":
    cfg = dataclasses.replace(cfg, block_k=max(16, min(64, 128 // cpw)))
    return _prefill(cfg, op, m, n) if m < PREFILL_MAX_M else cfg
  if op == "fwd" and cfg.unpack == "ptx" and bits == 4 and not codebook:
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    split = 1
    while split < cfg.split_k and tiles * split < FWD4_TARGET_PROGRAMS:
      split *= 2
    return dataclasses.replace(cfg, split_k=split)
  if op == "fwd":
    return cfg
  tiles = max(1, (k // cpw) // cfg.block_k)
  split = 1
  while split < MAX_SPLIT and tiles * split < DECODE_TARGET_PROGRAMS:
    split *= 2
  return dataclasses.replace(cfg, split_k=split)
