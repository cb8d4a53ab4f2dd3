"""Post-training quantizers behind one protocol (see `protocol`).

  protocol     Quantizer protocol, LayerStats, RTN, loader hook, save/load
  nf4          NF4 with block-wise absmax and double quantization (QLoRA)
  gptq         GPTQ / OPTQ
  apiq         ApiQ, layer-wise and block-wise (quantization + LoRA init)
  loftq        LoftQ (alternating quantization and low-rank fit)
  merge        quantization-preserving LoRA merge
  calibration  calibration text, per-layer execution, captured inputs
"""

from qft_jax._src.quantizers.apiq import ApiQConfig
from qft_jax._src.quantizers.apiq import ApiQLayerwise
from qft_jax._src.quantizers.apiq import apiq_blockwise_model
from qft_jax._src.quantizers.gptq import GPTQ
from qft_jax._src.quantizers.gptq import GPTQConfig
from qft_jax._src.quantizers.gptq import gptq_quantize
from qft_jax._src.quantizers.loftq import LoftQ
from qft_jax._src.quantizers.loftq import LoftQConfig
from qft_jax._src.quantizers.merge import merge_linear
from qft_jax._src.quantizers.merge import merge_model
from qft_jax._src.quantizers.nf4 import NF4
from qft_jax._src.quantizers.nf4 import NF4Config
from qft_jax._src.quantizers.protocol import LayerStats
from qft_jax._src.quantizers.protocol import Quantizer
from qft_jax._src.quantizers.protocol import RTN
from qft_jax._src.quantizers.protocol import as_quantize_fn
from qft_jax._src.quantizers.protocol import layer_stats
from qft_jax._src.quantizers.protocol import load_params
from qft_jax._src.quantizers.protocol import save_params

__all__ = [
    "ApiQConfig", "ApiQLayerwise", "GPTQ", "GPTQConfig", "LayerStats",
    "LoftQ", "LoftQConfig", "NF4", "NF4Config", "Quantizer", "RTN",
    "apiq_blockwise_model", "as_quantize_fn", "gptq_quantize", "layer_stats",
    "load_params", "merge_linear", "merge_model", "save_params",
]
