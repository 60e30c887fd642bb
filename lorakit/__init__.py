"""lorakit: LoRA fine-tuning for PyTorch / transformers models, PEFT-compatible.

    import lorakit as lk
    cfg = lk.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    lk.inject(model, cfg)
    lk.save_adapter(model, "out/")
"""

from .config import PRESET_TARGET_MODULES, LoraConfig
from .errors import (
                     AdapterFileError,
                     AdapterMismatchError,
                     AdapterNotFoundError,
                     ConfigError,
                     LoraError,
                     MergeStateError,
                     TargetNotFoundError,
)
from .io.checkpoint import adapter_state_dict, load_adapter, read_adapter, save_adapter
from .io.hotswap import hotswap_adapter
from .io.quantized import load_quantized, save_quantized
from .kernels.logprobs import gathered_logprobs, linear_logprobs, token_logprobs
from .kernels.losses import ChunkedLossLM, causal_lm_loss, linear_cross_entropy
from .kernels.nf4 import Linear4bit
from .layers.base import LoraLayer
from .layers.embedding import LoraEmbedding
from .layers.linear import LoraLinear
from .layers.modules_to_save import ModulesToSave
from .layers.trainable_tokens import TrainableTokens
from .model.adalora import adalora_penalty, current_ranks, update_and_allocate
from .model.adapters import (
                     active_adapters,
                     delete_adapter,
                     disable_adapters,
                     list_adapters,
                     merged_adapters,
                     rename_adapter,
                     set_adapter,
)
from .model.combining import add_weighted_adapter
from .model.injection import inject
from .model.loraplus import loraplus_optimizer, loraplus_param_groups
from .model.merging import cast_base, merge, unload, unmerge
from .model.mixed import mixed_batch
from .model.qlora import dequantize, quantize
from .model.report import ParameterReport, trainable_parameters
from .model.state import BASE
from .variants.adalora import AdaLoraConfig, orthogonal_penalty

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "AdaLoraConfig", "PRESET_TARGET_MODULES", "inject", "update_and_allocate", "current_ranks",
    "orthogonal_penalty", "adalora_penalty", "trainable_parameters", "ParameterReport",
    "save_adapter", "load_adapter", "read_adapter", "adapter_state_dict", "hotswap_adapter",
    "set_adapter", "delete_adapter", "rename_adapter", "list_adapters", "active_adapters", "merged_adapters",
    "disable_adapters",
    "merge", "unmerge", "unload", "add_weighted_adapter", "cast_base", "mixed_batch", "BASE",
    "loraplus_optimizer", "loraplus_param_groups",
    "quantize", "dequantize", "save_quantized", "load_quantized", "Linear4bit",
    "causal_lm_loss", "linear_cross_entropy", "ChunkedLossLM", "token_logprobs", "gathered_logprobs", "linear_logprobs",
    "LoraLayer", "LoraLinear", "LoraEmbedding", "ModulesToSave", "TrainableTokens",
    "LoraError", "ConfigError", "TargetNotFoundError", "AdapterNotFoundError", "AdapterMismatchError",
    "AdapterFileError", "MergeStateError",
]
