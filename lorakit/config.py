"""LoraConfig: what to adapt and how, with PEFT's field names and defaults.

The dataclass is frozen: the library never edits a config behind the caller's back. Values that
depend on the model (the preset targets when ``target_modules`` is None) are resolved into a new
config with ``dataclasses.replace``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from .errors import ConfigError

# Default targets when target_modules is None, keyed by transformers' config.model_type.
# Same choices as PEFT (query/value attention projections), so a PEFT user gets what they expect.
PRESET_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"], ["query", "value"]),
    **dict.fromkeys(
        ["llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "opt", "gptj", "bart", "olmo", "phi3"],
        ["q_proj", "v_proj"],
    ),
    "gpt2": ["c_attn"],
    **dict.fromkeys(["gpt_neox", "falcon", "bloom"], ["query_key_value"]),
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
    "deberta-v2": ["query_proj", "value_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}

# Heads that PEFT adds to modules_to_save for SEQ_CLS and TOKEN_CLS adapters (trained in full).
CLASSIFIER_HEAD_NAMES = ("classifier", "score")
# The attributes PEFT looks up, in this order, to keep a SEQ_CLS head out of "all-linear".
SEQ_CLS_HEAD_NAMES = ("score", "classifier")
HEAD_TASK_TYPES = ("SEQ_CLS", "TOKEN_CLS")

# PEFT features that change the forward pass and that lorakit does not implement: loading an
# adapter that uses one must fail loudly instead of silently computing something else.
UNSUPPORTED_PEFT_FEATURES = (
    "lora_bias", "layer_replication",
    "use_qalora", "alora_invocation_tokens", "use_bdlora",
)

BiasMode = Literal["none", "all", "lora_only"]


@dataclass(frozen=True)
class LoraConfig:
    """Configuration of one LoRA adapter (field names and meaning as in PEFT's LoraConfig).

    target_modules: a list of module names or dotted suffixes ("query", "attention.output.dense"),
    a regex string matched against the full module path, "all-linear" (every linear layer except
    the output head), or None for the model family's preset.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    target_parameters: list[str] | None = None  # parameters adapted directly (MoE experts), see param_layers
    exclude_modules: list[str] | str | None = None
    bias: BiasMode = "none"
    modules_to_save: list[str] | None = None
    # rows of embedding tables trained alone (layers/trainable_tokens.py): a list of token ids for the
    # input embedding, or {module name: ids}
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    use_rslora: bool = False
    use_dora: bool = False  # DoRA (lorakit/variants/dora.py): a learned magnitude per output feature
    init_lora_weights: bool | str = True  # True, False, "gaussian", "pissa", "pissa_niter_K", "olora" (variants/principal.py), "loftq"
    loftq_config: dict = field(default_factory=dict)  # init "loftq": PEFT's LoftQConfig fields (variants/loftq.py)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    PEFT_TYPE: ClassVar[str] = "LORA"

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}; typical values are 4 to 16.")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha!r}; a common choice is r or 2*r.")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if self.init_lora_weights not in (True, False, "gaussian") and not (
                isinstance(self.init_lora_weights, str)
                and re.fullmatch(r"pissa|pissa_niter_\d+|olora|loftq", self.init_lora_weights)):
            raise ConfigError(
                f"init_lora_weights must be True, False, 'gaussian', 'pissa', 'pissa_niter_K' (K subspace "
                f"iterations), 'olora' or 'loftq', got {self.init_lora_weights!r}."
            )
        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ConfigError("init_lora_weights='loftq' needs loftq_config (as PEFT), e.g. "
                                  "{'loftq_bits': 4, 'loftq_iter': 1}.")
            check_loftq_config(self.loftq_config)
            if self.use_dora or self.target_parameters:
                raise ConfigError("init_lora_weights='loftq' initialises plain LoRA on linear layers; drop use_dora / "
                                  "target_parameters, or use another init.")
        self._check_rank_pattern()
        self._check_token_indices()
        for pattern, alpha in self.alpha_pattern.items():
            if alpha <= 0:
                raise ConfigError(f"alpha_pattern[{pattern!r}] must be > 0, got {alpha!r}.")
        if self.target_parameters is not None and (
                isinstance(self.target_parameters, str) or not all(isinstance(p, str) for p in self.target_parameters)):
            raise ConfigError(f"target_parameters must be a list of parameter names, got {self.target_parameters!r}.")
        if self.target_parameters and self.use_dora:
            raise ConfigError("target_parameters cannot use DoRA (a parameter has no fixed output feature axis for "
                              "the magnitude), as in PEFT; adapt those parameters with plain LoRA.")
        if self.target_parameters and isinstance(self.init_lora_weights, str) and self.init_lora_weights != "gaussian":
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r} does not apply to target_parameters; "
                              "use the default init for parameter adapters.")
        if self.target_parameters and self.lora_dropout:
            raise ConfigError("target_parameters cannot use lora_dropout (the update is added to a weight, not to an "
                              "input that dropout could act on); set lora_dropout=0, as PEFT requires.")
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ConfigError(f"target_modules regex {self.target_modules!r} does not compile: {exc}") from None
        if not isinstance(self.target_modules, (list, tuple, set, str, type(None))):
            raise ConfigError(
                f"target_modules must be a list of names, a regex string, 'all-linear' or None; "
                f"got {type(self.target_modules).__name__}."
            )

    def _check_rank_pattern(self) -> None:
        for pattern, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ConfigError(f"rank_pattern[{pattern!r}] must be a positive integer, got {rank!r}.")

    def _check_token_indices(self) -> None:
        spec = self.trainable_token_indices
        if spec is None:
            return
        lists = spec.values() if isinstance(spec, dict) else [spec]
        if isinstance(spec, (str, bytes)) or not all(isinstance(ids, (list, tuple)) for ids in lists):
            raise ConfigError(f"trainable_token_indices must be a list of token ids or {{module name: ids}}, "
                              f"got {spec!r}.")
        for ids in lists:
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ConfigError(f"trainable_token_indices needs non-negative integer token ids, got {list(ids)!r}.")
            if len(set(ids)) != len(ids):
                raise ConfigError(f"trainable_token_indices lists a token twice: {list(ids)!r}.")

    # --- per-module values -------------------------------------------------------------------
    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # --- PEFT adapter_config.json --------------------------------------------------------------
    def to_peft_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("target_modules", "target_parameters"):
            if isinstance(data[key], (set, tuple)):
                data[key] = sorted(data[key])
        if isinstance(data["trainable_token_indices"], tuple):
            data["trainable_token_indices"] = list(data["trainable_token_indices"])
        data.update(peft_type=self.PEFT_TYPE, revision=None)
        return data

    @classmethod
    def from_peft_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        peft_type = data.get("peft_type", "LORA")
        if peft_type != cls.PEFT_TYPE:
            raise ConfigError(f"adapter has peft_type {peft_type!r}; lorakit loads LORA and ADALORA adapters.")
        for feature in UNSUPPORTED_PEFT_FEATURES:
            if data.get(feature):
                raise ConfigError(
                    f"adapter uses PEFT's {feature}={data[feature]!r}, which lorakit does not implement; "
                    "load it with PEFT, or retrain without that option."
                )
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known and v is not None}
        init = kwargs.get("init_lora_weights")
        if init not in (True, False, "gaussian") and not re.fullmatch(r"pissa|pissa_niter_\d+|olora", str(init)):
            # Other PEFT init schemes (loftq, eva, corda, ...) only matter before training; saved weights win.
            # PiSSA / OLoRA stay: as PEFT does, loading re-runs them, because the adapter was trained on
            # the residual base they leave behind.
            kwargs["init_lora_weights"] = True
        if kwargs.get("init_lora_weights") != "loftq":
            kwargs.pop("loftq_config", None)  # only meaningful with init "loftq", which loading never re-runs
        for key in ("target_modules", "target_parameters"):
            if isinstance(kwargs.get(key), (set, tuple)):
                kwargs[key] = sorted(kwargs[key])
        return cls(**kwargs)


LOFTQ_DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}  # PEFT's LoftQConfig


def check_loftq_config(loftq_config: dict) -> dict:
    """PEFT's LoftQConfig fields, defaults filled in; refused when lorakit cannot honour them."""
    unknown = set(loftq_config) - set(LOFTQ_DEFAULTS)
    if unknown:
        raise ConfigError(f"loftq_config has unknown fields {sorted(unknown)}; it takes {sorted(LOFTQ_DEFAULTS)}.")
    config = {**LOFTQ_DEFAULTS, **loftq_config}
    if config["loftq_bits"] != 4:
        raise ConfigError(f"loftq_bits={config['loftq_bits']!r}: lorakit's LoftQ quantizes to 4-bit NF4 (QLoRA's "
                          "format); 8-bit bases are not implemented. Use loftq_bits=4.")
    if not isinstance(config["loftq_iter"], int) or config["loftq_iter"] < 1:
        raise ConfigError(f"loftq_iter must be a positive integer (alternating rounds), got {config['loftq_iter']!r}.")
    return config


def _pattern_value(patterns: dict, module_name: str, default):
    """PEFT's rule: a pattern applies when it matches the end of the module path at a dot boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


def resolve_target_modules(config: LoraConfig, model_type: str | None) -> LoraConfig:
    """Fill in the preset targets (and classifier heads to save) from the model family."""
    updates: dict[str, Any] = {}
    if config.target_modules is None and not config.target_parameters:
        if model_type not in PRESET_TARGET_MODULES:
            known = ", ".join(sorted(PRESET_TARGET_MODULES))
            raise ConfigError(
                f"no preset target_modules for model type {model_type!r}; pass target_modules explicitly "
                f"(a list of names, a regex or 'all-linear'). Presets exist for: {known}."
            )
        updates["target_modules"] = list(PRESET_TARGET_MODULES[model_type])
    return dataclasses.replace(config, **updates) if updates else config
