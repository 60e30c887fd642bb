"""Put LoRA into a model: plan (no side effects, all checks) and then apply.

Planning first means every bad-input error is raised before the model is touched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import CLASSIFIER_HEAD_NAMES, HEAD_TASK_TYPES, LoraConfig, resolve_target_modules
from ..errors import ConfigError, LoraError
from ..kernels.lora import SHARED_INPUT_SETS, SharedInputGroup
from ..kernels.nf4 import Linear4bit
from ..layers.base import LoraLayer, conv1d_class
from ..layers.conv import CONV_TYPES, LoraConv, check_conv
from ..layers.embedding import LoraEmbedding
from ..layers.linear import LoraLinear
from ..layers.modules_to_save import ModulesToSave
from ..layers.moe import convert_moe_config, find_param_targets, nested_path
from ..layers.param import LoraParam
from ..layers.trainable_tokens import TrainableTokens
from ..variants.adalora import add_singular_values, is_adalora
from ..variants.loftq import check_loftq_target, loftq_init
from ..variants.principal import check_principal_init, is_principal_init
from .adalora import add_penalty_hook
from .qlora import full_weights
from .state import (
    BASE,
    adapter_wrappers,
    apply_trainability,
    check_one_token_adapter,
    ensure_registry,
    has_adapters,
    lora_layers,
    registry,
    walk_modules,
)
from .targeting import (
    TokenTarget,
    find_modules_to_save,
    find_targets,
    find_token_targets,
    iter_base_modules,
    minimal_suffixes,
    replace_module,
    unwrap,
)


@dataclass(frozen=True)
class InjectionPlan:
    config: LoraConfig  # resolved: presets filled in, "all-linear" written out as names
    targets: list[str]
    modules_to_save: list[str]
    # modules owning adapted parameters (target_parameters), with those parameters in nesting order
    param_targets: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
    token_targets: list[TokenTarget] = dataclasses.field(default_factory=list)  # trainable_token_indices


def check_svd_target(module: nn.Module, path: str) -> None:
    """AdaLoRA's SVD form exists for linear layers (nn.Linear, GPT-2's Conv1D) here."""
    if not isinstance(module, (nn.Linear, conv1d_class())):
        raise ConfigError(f"{path!r} is a {type(module).__name__}; lorakit's AdaLoRA adapts nn.Linear and Conv1D "
                          "layers only. Leave it out of target_modules (or use LoraConfig for it).")


def layer_class_for(base: nn.Module) -> type[LoraLayer]:
    """The LoRA layer type that wraps ``base`` (a target module, unwrapped)."""
    if isinstance(base, CONV_TYPES):
        return LoraConv
    return LoraEmbedding if isinstance(base, nn.Embedding) else LoraLinear


def check_new_name(model: nn.Module, adapter_name: str) -> None:
    """Raise unless ``adapter_name`` can name a new adapter of ``model``."""
    if not adapter_name or adapter_name == BASE or "." in adapter_name:
        raise ConfigError(f"invalid adapter name {adapter_name!r}: use a non-empty name without dots.")
    if has_adapters(model) and adapter_name in registry(model).configs:
        raise LoraError(
            f"adapter {adapter_name!r} already exists; pick another adapter_name or lk.delete_adapter it first."
        )


def plan_injection(model: nn.Module, config: LoraConfig, adapter_name: str, strict: bool = True) -> InjectionPlan:
    """Resolve ``config`` against ``model``; strict=False (loading a saved adapter) tolerates
    modules_to_save entries that the model lacks."""
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"expected a lorakit.LoraConfig, got {type(config).__name__}.")
    check_new_name(model, adapter_name)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    config = resolve_target_modules(config, model_type)
    user_save = list(config.modules_to_save or [])
    if config.task_type in HEAD_TASK_TYPES:
        # as PEFT: the classification head names join modules_to_save (whichever the model has)
        heads = [n for n in CLASSIFIER_HEAD_NAMES if n not in user_save]
        config = dataclasses.replace(config, modules_to_save=user_save + heads)
    modules = list(iter_base_modules(model))
    config = convert_moe_config(config, model_type, modules, lambda: sorted(
        {p.rsplit(".", 1)[-1] for p in find_targets(model, dataclasses.replace(config, target_parameters=None))}))
    targets = find_targets(model, config)
    param_targets = find_param_targets(model, config, modules)
    if config.target_modules == "all-linear":
        config = dataclasses.replace(config, target_modules=minimal_suffixes(model, targets))
    find_modules_to_save(model, user_save, strict=strict)  # the user's own names must match something
    save = find_modules_to_save(model, config.modules_to_save, strict=False)
    if is_adalora(config):
        trainable = [n for n, c in registry(model).configs.items() if is_adalora(c) and not c.inference_mode] \
            if has_adapters(model) else []
        if trainable and not config.inference_mode:
            raise LoraError(f"AdaLoRA trains one adapter at a time (as PEFT); {trainable[0]!r} already trains. Load "
                            "the other for inference (inference_mode=True) or delete it.")
        for path in targets:
            check_svd_target(unwrap(model.get_submodule(path)), path)
    for path in targets:
        if config.init_lora_weights == "loftq":
            check_loftq_target(unwrap(model.get_submodule(path)), path, full_weights(model) is not None)
        check_principal_init(unwrap(model.get_submodule(path)), config.init_lora_weights, path)
        check_conv(unwrap(model.get_submodule(path)), path)
        if isinstance(model.get_submodule(path), ModulesToSave):
            raise LoraError(f"{path!r} is trained in full by another adapter (modules_to_save); it cannot also get LoRA.")
    for path in save:
        if isinstance(model.get_submodule(path), LoraLayer):
            raise LoraError(f"{path!r} already has LoRA from another adapter; it cannot also be in modules_to_save.")
    tokens = find_token_targets(model, config)
    for target in tokens:
        module = model.get_submodule(target.path)
        if target.path in targets or isinstance(module, LoraLayer):
            raise ConfigError(f"{target.path!r} has LoRA, so its rows cannot also train as trainable tokens; leave it "
                              "out of target_modules or of trainable_token_indices.")
        if target.path in save or isinstance(module, ModulesToSave):
            raise ConfigError(f"{target.path!r} is trained in full (modules_to_save), so it cannot also train a few "
                              "rows (trainable_token_indices); choose one.")
    if config.base_model_name_or_path is None:
        name = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        config = dataclasses.replace(config, base_model_name_or_path=name)
    return InjectionPlan(config=config, targets=targets, modules_to_save=save, param_targets=param_targets,
                         token_targets=tokens)


def apply_plan(model: nn.Module, plan: InjectionPlan, adapter_name: str) -> None:
    """Add the planned adapter. Every module it creates takes the train/eval mode of the module it
    wraps (as PEFT: an adapter loaded into a model in eval mode runs without dropout)."""
    config = plan.config
    paths = [*plan.targets, *(p for p, _ in plan.param_targets), *plan.modules_to_save,
             *(t.path for t in plan.token_targets)]
    modes = {path: model.get_submodule(path).training for path in paths}
    for path in plan.targets:
        base = unwrap(model.get_submodule(path))
        layer = _wrap(model, path, layer_class_for(base))
        layer.add_adapter(adapter_name, config.rank_for(path), config.scaling_for(path),
                          config.lora_dropout, config.init_lora_weights, use_dora=config.use_dora)
        if is_adalora(config):
            add_singular_values(layer, adapter_name, config.init_lora_weights)
        if config.init_lora_weights == "loftq":  # the base then holds the quantized weight A, B complement
            quantized = isinstance(layer.base_layer, Linear4bit)
            loftq_init(layer, adapter_name, config.loftq_config, full_weights(model)(path) if quantized else None)
    for path, names in plan.param_targets:
        for name in names:
            layer = _param_wrapper(model, path, names, name)
            key = f"{path}.{name}"
            layer.add_adapter(adapter_name, config.rank_for(key), config.scaling_for(key), 0.0,
                              config.init_lora_weights)
    for path in plan.modules_to_save:
        _wrap(model, path, ModulesToSave).add_adapter(adapter_name)
    for target in plan.token_targets:  # embeddings come before the output heads tied to them
        tied = model.get_submodule(target.tied_to) if target.tied_to else None
        wrapper = model.get_submodule(target.path)
        if not isinstance(wrapper, TrainableTokens):
            wrapper = TrainableTokens(wrapper, tied_to=tied)
            replace_module(model, target.path, wrapper)
        wrapper.add_adapter(adapter_name, list(target.indices))
    for path, training in modes.items():
        model.get_submodule(path).train(training)
    reg = ensure_registry(model)
    reg.configs[adapter_name] = config
    if is_adalora(config) and not config.inference_mode and config.orth_reg_weight > 0:
        reg.hooks.append(add_penalty_hook(model))
    link_shared_inputs(model)
    if not reg.active:
        set_active(model, [adapter_name])
    else:
        apply_trainability(model)


def set_active(model: nn.Module, names: list[str]) -> None:
    check_one_token_adapter(model, list(names))
    registry(model).active = list(names)
    for _, module in adapter_wrappers(model):
        module.active_adapters = [n for n in names if n in module.adapter_names]
    apply_trainability(model)


def inject(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Add a LoRA adapter to ``model`` in place and freeze the base; returns the model.

    The first adapter becomes active; later ones are added inactive (``lk.set_adapter`` them).
    """
    apply_plan(model, plan_injection(model, config, adapter_name), adapter_name)
    return model


def _param_wrapper(model: nn.Module, path: str, names: list[str], name: str) -> LoraParam:
    """The wrapper adapting parameter ``name`` of the module at ``path``, created (outermost) if new."""
    try:
        existing = model.get_submodule(nested_path(path, names, name))
    except AttributeError:  # not wrapped that deep yet
        existing = None
    if isinstance(existing, LoraParam) and existing.parameter_name == name:
        return existing
    wrapper = LoraParam(model.get_submodule(path), name)
    replace_module(model, path, wrapper)
    return wrapper


def _wrap(model: nn.Module, path: str, wrapper_cls: type) -> nn.Module:
    module = model.get_submodule(path)
    if isinstance(module, wrapper_cls):
        return module
    wrapper = wrapper_cls(module)
    replace_module(model, path, wrapper)
    return wrapper


def link_shared_inputs(model: nn.Module) -> None:
    """Group sibling LoRA linear layers that read the same input (see SHARED_INPUT_SETS)."""
    for _, parent in walk_modules(model):
        children = dict(parent.named_children())
        for names in SHARED_INPUT_SETS:
            members = [children[n] for n in names if isinstance(children.get(n), LoraLinear)
                       and not children[n].fan_in_fan_out]
            group = SharedInputGroup(members) if len(members) > 1 else None
            for member in members:
                member.__dict__["shared_input"] = group


def materialize_adapters(model: nn.Module, device: torch.device | str = "cpu") -> None:
    """Give adapters injected into a model built on the meta device (a sharded run's skeleton,
    whose base weights are read later) their initial values on ``device``: each pair allocated and
    initialised as ``inject`` does it, layer by layer in the same order, so that under one seed the
    values equal a normal injection's. Inits that read the base weight cannot run yet: refused."""
    configs = registry(model).configs
    for name, config in configs.items():
        if is_principal_init(config.init_lora_weights) or config.init_lora_weights == "loftq" or config.use_dora \
                or is_adalora(config):
            raise ConfigError(f"adapter {name!r} starts from the base weights (PiSSA / OLoRA, DoRA's magnitude or "
                              "AdaLoRA's SVD form), which a model built on the meta device does not hold yet")
    for _, layer in lora_layers(model):
        for name in layer.adapter_names:
            A, _ = layer.lora_pair(name)  # created again on the device: building the pair draws too
            layer.create_pair(name, A.shape[0], A.dtype, device)
            layer.reset_adapter(name, configs[name].init_lora_weights)
