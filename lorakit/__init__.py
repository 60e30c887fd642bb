"""lorakit: LoRA fine-tuning for PyTorch / transformers models, PEFT-compatible.

    import lorakit as lk
    cfg = lk.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])
    lk.inject(model, cfg)
    lk.save_adapter(model, "out/")
"""

from .adalora import AdaLoraConfig, adalora_penalty, orthogonal_penalty
from .adapters import active_adapters, delete_adapter, disable_adapters, list_adapters, merged_adapters, set_adapter
from .checkpoint import adapter_state_dict, load_adapter, read_adapter, save_adapter
from .config import PRESET_TARGET_MODULES, LoraConfig
from .errors import (AdapterFileError, AdapterMismatchError, AdapterNotFoundError, ConfigError, LoraError,
                     MergeStateError, TargetNotFoundError)
from .injection import inject
from .embedding_layers import LoraEmbedding
from .layers import LoraLayer
from .linear_layers import LoraLinear
from .losses import ChunkedLossLM, causal_lm_loss, linear_cross_entropy
from .combining import add_weighted_adapter
from .merging import cast_base, merge, unload, unmerge
from .mixed import mixed_batch
from .modules_to_save import ModulesToSave
from .optimizers import loraplus_optimizer, loraplus_param_groups
from .qlora import dequantize, load_quantized, quantize, save_quantized
from .quantization import Linear4bit
from .rank_allocator import current_ranks, update_and_allocate
from .report import ParameterReport, trainable_parameters
from .state import BASE

__version__ = "0.1.0"

__all__ = [
    "LoraConfig", "AdaLoraConfig", "PRESET_TARGET_MODULES", "inject", "update_and_allocate", "current_ranks",
    "orthogonal_penalty", "adalora_penalty", "trainable_parameters", "ParameterReport",
    "save_adapter", "load_adapter", "read_adapter", "adapter_state_dict",
    "set_adapter", "delete_adapter", "list_adapters", "active_adapters", "merged_adapters", "disable_adapters",
    "merge", "unmerge", "unload", "add_weighted_adapter", "cast_base", "mixed_batch", "BASE",
    "loraplus_optimizer", "loraplus_param_groups",
    "quantize", "dequantize", "save_quantized", "load_quantized", "Linear4bit",
    "causal_lm_loss", "linear_cross_entropy", "ChunkedLossLM",
    "LoraLayer", "LoraLinear", "LoraEmbedding", "ModulesToSave",
    "LoraError", "ConfigError", "TargetNotFoundError", "AdapterNotFoundError", "AdapterMismatchError",
    "AdapterFileError", "MergeStateError",
]
