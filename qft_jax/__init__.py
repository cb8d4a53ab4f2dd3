"""qft_jax: fine-tune LLMs on quantized weights in JAX.

Quantized weights are integer pytrees with scales (`QArray`); `qdot` routes
gradients through dequantization with a custom VJP; optimizers are optax
transforms (`lion_int8`) and masks; methods (QFT, ApiQ, ModuLoRA, HiFT,
PEQA, LoRA/QLoRA) are choices of storage, trainable set and update rule.
"""

from qft_jax._src import memory
from qft_jax._src import quantizers
from qft_jax._src import sharding
from qft_jax._src.checkpoint import Checkpointer
from qft_jax._src.data import Batch
from qft_jax._src.data import build_dataset
from qft_jax._src.data import load_examples
from qft_jax._src.evaluate import perplexity
from qft_jax._src.evaluate import text_token_ids
from qft_jax._src.export import export_hf
from qft_jax._src.export import load_quantized
from qft_jax._src.export import save_quantized
from qft_jax._src.lora import LoraSpec
from qft_jax._src.lora import init_lora
from qft_jax._src.lora import lora_mask
from qft_jax._src.lora import merge_lora
from qft_jax._src.lora import split_lora
from qft_jax._src.methods import MethodConfig
from qft_jax._src.methods import make_method
from qft_jax._src.methods import make_optimizer
from qft_jax._src.methods import prepare_params
from qft_jax._src.models.generate import generate
from qft_jax._src.models.hf import save_hf
from qft_jax._src.models.llama import Llama
from qft_jax._src.models.llama import LlamaConfig
from qft_jax._src.models.llama import forward
from qft_jax._src.models.llama import init_params
from qft_jax._src.models.loading import load_model
from qft_jax._src.models.loading import load_tokenizer
from qft_jax._src.optim.hift import HiFT
from qft_jax._src.optim.hift import HiFTSchedule
from qft_jax._src.optim.hift import hift_units
from qft_jax._src.optim.lion_int8 import lion_int8
from qft_jax._src.optim.lion_int8 import scale_by_lion_int8
from qft_jax._src.optim.masks import combine
from qft_jax._src.optim.masks import mask_from_rules
from qft_jax._src.optim.masks import split
from qft_jax._src.optim.masks import trainable_mask
from qft_jax._src.optim.peqa import peqa_mask
from qft_jax._src.optim.qft import QFTWeight
from qft_jax._src.optim.qft import qft_apply_updates
from qft_jax._src.optim.qft import qft_dequantize
from qft_jax._src.optim.qft import qft_quantize
from qft_jax._src.qarray import QArray
from qft_jax._src.qarray import QuantConfig
from qft_jax._src.qarray import dequantize
from qft_jax._src.qarray import quantize
from qft_jax._src.qarray import validate
from qft_jax._src.qmatmul import linear
from qft_jax._src.qmatmul import qdot
from qft_jax._src.streamed import StreamedSpec
from qft_jax._src.streamed import make_streamed_step
from qft_jax._src.train import Method
from qft_jax._src.train import TrainState
from qft_jax._src.train import chunked_lm_loss
from qft_jax._src.train import cross_entropy
from qft_jax._src.train import make_train_step

__version__ = "0.1.0"

__all__ = [
    "Batch", "Checkpointer", "HiFT", "HiFTSchedule", "Llama", "LlamaConfig",
    "LoraSpec", "Method", "MethodConfig", "QArray", "QFTWeight",
    "QuantConfig", "StreamedSpec", "TrainState", "build_dataset",
    "chunked_lm_loss", "combine", "cross_entropy", "dequantize", "export_hf",
    "forward", "generate", "hift_units", "init_lora", "init_params",
    "linear", "lion_int8", "load_examples", "load_model", "load_quantized",
    "load_tokenizer", "lora_mask", "make_method", "make_optimizer",
    "make_streamed_step", "make_train_step", "mask_from_rules", "memory",
    "merge_lora", "peqa_mask", "perplexity", "prepare_params", "qdot",
    "qft_apply_updates", "qft_dequantize", "qft_quantize", "quantize",
    "quantizers", "save_hf", "save_quantized", "scale_by_lion_int8",
    "sharding", "split", "split_lora", "text_token_ids", "trainable_mask",
    "validate",
]
