"""Training options: defaults < YAML file < command-line flags, resolved once and saved with the run."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class TrainOptions:
    model: str = "minilm"
    data: str = "rotten-tomatoes"
    task: str = "classify"
    output: str = "lorakit-run"
    # LoRA (PEFT's names where PEFT has one)
    r: int = 8
    alpha: float | None = None          # lora_alpha; None means 2 * r
    dropout: float = 0.05
    targets: list[str] | str | None = None  # None: the task's default (TASK_DEFAULTS)
    modules_to_save: list[str] | None = None  # trained in full besides the adapters (classify adds its head)
    add_tokens: list[str] | None = None  # new tokens: added to the tokenizer, the embedding resized, their rows trained
    trainable_tokens: list[str] | None = None  # existing tokens (ids or token strings) whose embedding rows train
    use_dora: bool = False              # DoRA: a learned magnitude per output feature
    init: str | None = None             # init_lora_weights: pissa, pissa_niter_K, olora, gaussian (None: default)
    rslora: bool = False                # scaling alpha/sqrt(r)
    loraplus_ratio: float | None = None  # LoRA+: lr of B = ratio x lr of A (PEFT's groups)
    method: str = "lora"                # lora or adalora
    init_r: int = 12                    # adalora: triplets per layer at the start (PEFT's default)
    target_r: int = 8                   # adalora: average triplets per layer at the end (PEFT's default)
    tinit: int | None = None            # adalora: steps before pruning starts (None: 10% of the run)
    tfinal: int | None = None           # adalora: steps after pruning ends (None: 20% of the run)
    delta_t: int = 1                    # adalora: re-allocate the budget every N steps
    full: bool = False                  # full fine-tuning with the same loop, for comparison
    qlora: bool = False
    bf16: bool = False
    # loop
    epochs: float = 1.0
    max_steps: int | None = None        # overrides epochs
    min_steps: int | None = None       # at least this many steps (several epochs on small data); None: task default
    lr: float | None = None             # None: the task's default (TASK_DEFAULTS)
    warmup_steps: int = 30
    warmup_ratio: float | None = None   # warmup as a share of the run's steps (overrides warmup_steps)
    lr_scheduler: str = "linear"        # linear, cosine, constant, constant_with_warmup (transformers')
    optim: str = "adamw"                # adamw, adamw8bit (bitsandbytes), sgd, adafactor
    head_lr: float | None = None        # lr of modules trained in full beside the adapters (a classifier head)
    grad_checkpointing: bool = False    # recompute activations in backward (transformers' checkpointing)
    packing: bool = False               # lm / sft: several examples per row, attention kept within each
    compile: bool = False               # torch.compile the training step's model
    fsdp: bool = False                  # torchrun: FSDP2 shards the base and adapters across processes
    report_to: str | list[str] | None = None  # trackers: tensorboard, mlflow, wandb (commas or spaces)
    weight_decay: float = 0.0
    batch_size: int | None = None       # per process; None: the task's default (TASK_DEFAULTS)
    grad_accum: int = 1
    seq_len: int = 128
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_steps: int | None = None       # None: once per epoch
    eval_examples: int | None = None    # cap validation/test size for speed
    early_stopping_patience: int | None = None  # stop after N evaluations without improvement of the metric
    neftune_noise_alpha: float | None = None  # NEFTune: noise on the input embeddings while training (TRL's name)
    save_steps: int | None = None       # checkpoint every N steps (always at the end and on Ctrl-C)
    # preference and RL (TRL's names; see training/objectives/)
    adapter: str | None = None          # start from this trained adapter; its frozen copy is the reference
    loss_type: str | None = None        # dpo: sigmoid, ipo, hinge, robust, simpo; grpo: dapo, grpo, bnpo, dr_grpo
    beta: float | None = None           # None: the task's default (TRL's: 0.1; grpo 0.0 = no reference pass)
    label_smoothing: float = 0.0        # robust DPO: the probability a preference is flipped; SimPO likewise
    precompute_ref: bool = False        # reference log-probabilities once before training (precompute_ref_log_probs)
    simpo_gamma: float = 0.5            # SimPO's target reward margin
    cpo_alpha: float = 0.0              # SimPO: weight of the chosen NLL (TRL's CPO default is 1.0; SimPO uses 0)
    desirable_weight: float = 1.0       # kto
    undesirable_weight: float = 1.0     # kto
    num_generations: int = 8            # grpo: completions per prompt (G)
    max_completion_length: int = 64     # grpo: tokens per completion
    temperature: float = 1.0            # grpo: sampling temperature (log-probabilities are taken at it too)
    top_p: float = 1.0                  # grpo
    num_iterations: int = 1             # grpo: optimizer steps per generation (the clipped ratio's μ)
    epsilon: float = 0.2                # grpo: clip range
    epsilon_high: float | None = None   # grpo: upper clip (None: epsilon)
    scale_rewards: str = "group"        # grpo: group, batch or none
    rewards: list[str] | None = None    # grpo: NAME[=WEIGHT], built-in or module:function (default answer_match)
    answer_column: str | None = None    # grpo answer_match: the column holding the right answer ("answer" / "label")
    answer_pattern: str | None = None   # grpo answer_match: regex extracting the answer (default: the first word)
    format_pattern: str | None = None   # grpo format reward: regex the whole completion must match
    # data columns and templates
    text_column: str = "text"
    label_column: str = "label"
    prompt_template: str | None = None     # sft: e.g. "Review: {text}" formats a row into the user turn
    response_template: str | None = None   # sft: e.g. "{label}"
    # run control
    resume: bool = False
    overwrite: bool = False
    log_every: int = 1
    extra: dict = field(default_factory=dict)  # free-form, recorded only

    @property
    def lora_alpha(self) -> float:
        # LoftQ's A, B are not divided by the scaling (as PEFT), so they compensate the quantization
        # error exactly at scaling 1: alpha = r
        if self.alpha is None and self.init == "loftq":
            return float(self.r)
        return self.alpha if self.alpha is not None else 2.0 * self.r

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def lora_config(self, total_steps: int | None = None, token_indices=None):
        """The adapter config this run trains, built here only: the trainer, the memory estimate and
        the option checks all use it, and its own checks are the only ones (their messages name the
        command-line flags). ``total_steps``: the run's length, which AdaLoRA's schedule needs
        (--max-steps when not given); ``token_indices``: trainable_token_indices, the ids that
        --add-tokens / --trainable-tokens name once the tokenizer has resolved them (setup.py)."""
        from ..config import LOFTQ_DEFAULTS, LoraConfig
        from ..variants.adalora import AdaLoraConfig

        fields = dict(lora_alpha=self.lora_alpha, lora_dropout=self.dropout, target_modules=self.targets,
                      task_type="SEQ_CLS" if self.task == "classify" else "CAUSAL_LM",
                      modules_to_save=self.modules_to_save,  # SEQ_CLS adds the classifier head, as PEFT does
                      use_rslora=self.rslora, trainable_token_indices=token_indices)
        try:
            if self.method == "adalora":
                steps = total_steps or self.max_steps or 1
                return AdaLoraConfig(init_r=self.init_r, target_r=self.target_r, total_step=steps,
                                     tinit=self.tinit if self.tinit is not None else steps // 10,
                                     tfinal=self.tfinal if self.tfinal is not None else steps // 5,
                                     deltaT=self.delta_t, **fields)
            # LoftQ, one round on the 4-bit base as loaded (PEFT's replace_lora_weights_loftq): the base
            # stays NF4(W), so the adapter loads on any QLoRA load of the same base
            loftq = dict(LOFTQ_DEFAULTS, loftq_iter=1) if self.init == "loftq" else {}
            return LoraConfig(r=self.r, use_dora=self.use_dora, loftq_config=loftq,
                              init_lora_weights=self.init if self.init is not None else True, **fields)
        except ConfigError as exc:
            raise ConfigError(in_flag_terms(str(exc))) from None


# LoraConfig's field names as `lorakit train` spells them
CONFIG_FLAGS = {"lora_alpha": "--alpha", "lora_dropout": "--dropout", "target_r": "--target-r",
                "init_r": "--init-r", "tinit": "--tinit", "tfinal": "--tfinal", "total_step": "--max-steps",
                "deltaT": "--delta-t", "init_lora_weights": "--init", "r": "--r", "target_modules": "--targets"}


def in_flag_terms(message: str) -> str:
    """A LoraConfig message with its field names replaced by the flags that set them."""
    return re.sub(r"(?<![\w-])(" + "|".join(sorted(CONFIG_FLAGS, key=len, reverse=True)) + r")(?![\w(])",
                  lambda m: CONFIG_FLAGS[m.group(1)], message)


FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions)}

# Defaults per task, chosen by the defaults study (benchmarks/defaults_study.py, BENCHMARKS.md):
# tuned on the embedded data, validated on corpora no default was tuned on.
TASK_DEFAULTS = {
    "classify": {"lr": 2e-3, "targets": "all-linear", "min_steps": 150, "batch_size": 32},
    "sft": {"lr": 1e-3, "targets": "all-linear", "min_steps": 100, "batch_size": 8},
    "lm": {"lr": 5e-4, "targets": "all-linear", "min_steps": 100, "batch_size": 8},
    # preference and RL: TRL's beta and loss defaults. lr: TRL's 1e-6 is meant for full fine-tuning;
    # LoRA moves fewer weights and takes a higher rate. These are the rates of the quality runs in
    # BENCHMARKS.md ("Preference and RL"), not yet validated on a second corpus (said there).
    "dpo": {"lr": 5e-5, "targets": "all-linear", "min_steps": 1, "batch_size": 8, "beta": 0.1, "loss_type": "sigmoid"},
    "orpo": {"lr": 5e-5, "targets": "all-linear", "min_steps": 1, "batch_size": 8, "beta": 0.1},
    "kto": {"lr": 5e-5, "targets": "all-linear", "min_steps": 1, "batch_size": 8, "beta": 0.1},
    "grpo": {"lr": 1e-4, "targets": "all-linear", "min_steps": 1, "batch_size": 4, "beta": 0.0, "loss_type": "dapo"},
}
FULL_FINE_TUNE_LR = 5e-5  # --full: every weight moves, so a LoRA learning rate would wreck the model
DEFAULTS_WHY = (
    "defaults per task (from a study tuned on the embedded data and validated on 3 corpora nobody tuned on, "
    "see BENCHMARKS.md): classify lr 2e-3 and batch 32, sft lr 1e-3 and lm lr 5e-4 with batch 8; every linear "
    "layer adapted (all-linear); at least 150 (classify) / 100 (sft, lm) optimizer steps however small the data, "
    "the best validation checkpoint kept")


def resolve_options(config_file: str | None = None, overrides: dict | None = None) -> TrainOptions:
    """Merge a YAML file and explicit overrides (flags given on the command line win)."""
    values: dict = {}
    if config_file:
        values.update(_read_yaml(config_file))
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(FIELDS))}")
    _check_task(values.get("task", TrainOptions.task))
    defaults = TASK_DEFAULTS[values.get("task", TrainOptions.task)]
    lr_given = values.get("lr") is not None
    for name, value in defaults.items():
        if values.get(name) is None:
            values[name] = FULL_FINE_TUNE_LR if name == "lr" and values.get("full") else value
    options = TrainOptions(**values)
    _check(options)
    if not lr_given and options.lr >= 1e-3 and (options.loraplus_ratio or str(options.init).startswith(("pissa", "olora"))):
        import warnings

        # evidence: benchmarks/variants_quality.py (BENCHMARKS.md, issue 13)
        warnings.warn(f"the default lr {options.lr:g} was tuned for plain LoRA; with --init pissa/olora or "
                      "--loraplus-ratio the same lr moves the weights much further (A and B carry W0's principal "
                      "part, or B steps ratio x faster), and on rotten-tomatoes all three stayed at the majority "
                      "class at 2e-3 while 2e-4 learned: pass a lower --lr, e.g. 2e-4")
    return options


def _read_yaml(path: str) -> dict:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value, got {type(data).__name__}")
    return {key.replace("-", "_"): value for key, value in data.items()}


def _check_task(task: str) -> None:
    from ..hub.models import TASK_KINDS
    from .objectives import OBJECTIVE_TASKS

    if task not in TASK_KINDS + OBJECTIVE_TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASK_KINDS + OBJECTIVE_TASKS)}")


def _check(options: TrainOptions) -> None:
    for name in ("batch_size", "grad_accum", "seq_len", "min_steps"):
        if getattr(options, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(options, name)}")
    if not (math.isfinite(options.lr) and options.lr > 0):
        raise ConfigError(f"--lr must be a positive finite number, got {options.lr}; LoRA usually trains at 1e-4 to "
                          "2e-3 (leave it out for the task's default)")
    for name in ("head_lr", "max_grad_norm", "weight_decay", "epochs"):
        value = getattr(options, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if options.head_lr is not None and options.head_lr <= 0:
        raise ConfigError(f"--head-lr must be positive, got {options.head_lr}")
    if options.max_steps is not None and options.max_steps < 1:
        raise ConfigError(f"--max-steps must be at least 1, got {options.max_steps}; leave it out to train for "
                          "--epochs instead")
    if options.max_steps is None and options.epochs <= 0:
        raise ConfigError("give a positive --epochs or --max-steps")
    if options.loraplus_ratio is not None and options.loraplus_ratio <= 0:
        raise ConfigError(f"--loraplus-ratio must be > 0, got {options.loraplus_ratio}; the LoRA+ paper uses 16")
    if options.method not in ("lora", "adalora"):
        raise ConfigError(f"--method must be lora or adalora, got {options.method!r}")
    if options.method == "adalora":
        if options.full or options.use_dora or options.init:
            raise ConfigError("--method adalora trains its own SVD-form adapter: drop --full, --use-dora and --init")
        if options.resume:
            raise ConfigError("--resume does not restore AdaLoRA's importance scores yet; rerun the AdaLoRA run whole")
    if options.full and (options.use_dora or options.init or options.loraplus_ratio):
        raise ConfigError("--use-dora, --init and --loraplus-ratio configure adapters; --full trains no adapter")
    if options.init == "loftq" and not options.qlora:
        raise ConfigError("--init loftq starts the adapter by absorbing the 4-bit quantization error, so it needs "
                          "--qlora (without it there is no quantization error to absorb)")
    from .optim import check_choices

    if options.packing and options.task == "classify":
        raise ConfigError("--packing lays several lm / sft examples into one row; a classify row is one example "
                          "with one label: drop --packing")

    check_choices(options)
    _check_objective(options)
    if not options.full:  # the adapter config's own checks; AdaLoRA's schedule once the run's length is known
        options.lora_config(options.max_steps or (options.tinit or 0) + (options.tfinal or 0) + 1)
    if options.neftune_noise_alpha is not None and not options.neftune_noise_alpha > 0:
        raise ConfigError(f"--neftune-noise-alpha must be > 0 (the paper uses 5), got {options.neftune_noise_alpha}")
    if options.early_stopping_patience is not None and options.early_stopping_patience < 1:
        raise ConfigError(f"--early-stopping-patience counts evaluations: give 1 or more, got "
                          f"{options.early_stopping_patience}")
    from .data import check_mixture
    from .trackers import check_trackers

    check_mixture(options.data)
    check_trackers(options.report_to)
    _check_tokens(options)
    if options.full and options.qlora:
        raise ConfigError("--full and --qlora exclude each other (QLoRA trains adapters on a frozen 4-bit base)")
    if options.fsdp:
        import os

        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise ConfigError("--fsdp shards the model across processes: launch it with torchrun, e.g. "
                              "torchrun --nproc_per_node 2 -m lorakit train ... --fsdp")
        if options.method == "adalora" or options.compile:
            raise ConfigError("--fsdp does not combine with --method adalora or --compile yet; drop one of them")


def _check_tokens(options: TrainOptions) -> None:
    if not (options.add_tokens or options.trainable_tokens):
        return
    if options.task == "classify":
        raise ConfigError("--add-tokens / --trainable-tokens train rows of a language model's embedding; classify "
                          "runs train a head instead: drop them")
    if options.full and options.trainable_tokens:
        raise ConfigError("--trainable-tokens picks embedding rows to train, and --full trains every weight: drop one")
    if options.fsdp or options.method == "adalora":
        raise ConfigError("--add-tokens / --trainable-tokens do not combine with --fsdp or --method adalora yet")
    for flag, tokens in (("--add-tokens", options.add_tokens), ("--trainable-tokens", options.trainable_tokens)):
        if tokens is not None and (not tokens or any(not str(t).strip() for t in tokens)):
            raise ConfigError(f"{flag} needs one or more tokens, got {tokens!r}")


LOSS_TYPES = {"dpo": ("sigmoid", "ipo", "hinge", "robust", "simpo"), "grpo": ("dapo", "grpo", "bnpo", "dr_grpo")}


def _check_objective(options: TrainOptions) -> None:
    """The preference / RL options, checked before anything is loaded or written."""
    from .objectives import OBJECTIVE_TASKS

    task = options.task
    if task not in OBJECTIVE_TASKS:
        if options.adapter:
            raise ConfigError(f"--adapter (start from a trained adapter) is for --task {' | '.join(OBJECTIVE_TASKS)}")
        return
    if options.full:
        raise ConfigError(f"--task {task} trains an adapter: its reference policy is the adapter switched off, "
                          "which --full has none of; drop --full")
    if options.fsdp or options.packing or options.method != "lora":
        raise ConfigError(f"--task {task} does not combine with --fsdp, --packing or --method adalora yet; use DDP "
                          "(torchrun without --fsdp) and plain LoRA / DoRA")
    if options.loss_type is not None and task in LOSS_TYPES and options.loss_type not in LOSS_TYPES[task]:
        raise ConfigError(f"--loss {options.loss_type!r} is not a {task} loss; choose one of {', '.join(LOSS_TYPES[task])}")
    if options.loss_type is not None and task not in LOSS_TYPES and options.loss_type != task:
        raise ConfigError(f"--task {task} has one loss; drop --loss")
    if options.beta is None or not math.isfinite(options.beta) or options.beta < 0 or (options.beta == 0 and task != "grpo"):
        raise ConfigError(f"--beta must be {'>= 0' if task == 'grpo' else '> 0'} and finite, got {options.beta} "
                          f"(TRL's default is {'0.0' if task == 'grpo' else '0.1'})")
    if task == "dpo":
        smoothing_used = options.loss_type in ("robust", "simpo")
        if options.label_smoothing and not smoothing_used:
            raise ConfigError(f"--label-smoothing applies to --loss robust (and simpo), not {options.loss_type}, as in TRL")
        if not 0 <= options.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must lie in [0, 0.5), got {options.label_smoothing}")
    if options.precompute_ref and (task in ("orpo", "grpo") or options.loss_type == "simpo"):
        raise ConfigError(f"--precompute-ref: {'--loss simpo' if options.loss_type == 'simpo' else '--task ' + task} "
                          "uses no fixed reference log-probabilities; drop it")
    if task == "grpo":
        if options.num_generations < 2:
            raise ConfigError(f"--num-generations must be at least 2 (advantages compare completions of one prompt), "
                              f"got {options.num_generations}")
        if options.max_completion_length < 1:
            raise ConfigError(f"--max-completion-length must be at least 1, got {options.max_completion_length}")
        if not (math.isfinite(options.temperature) and options.temperature > 0) or not 0 < options.top_p <= 1:
            raise ConfigError(f"--temperature must be > 0 and --top-p in (0, 1], got {options.temperature} and "
                              f"{options.top_p}: GRPO learns from differences between sampled completions")
        if options.num_iterations < 1 or not options.epsilon > 0 or (options.epsilon_high is not None
                                                                     and options.epsilon_high < options.epsilon):
            raise ConfigError("--num-iterations must be >= 1, --epsilon > 0 and --epsilon-high >= --epsilon")
        if options.scale_rewards not in ("group", "batch", "none"):
            raise ConfigError(f"--scale-rewards must be group, batch or none, got {options.scale_rewards!r}")
        from .objectives.rewards import load_rewards

        load_rewards(options)  # unknown names, bad weights, imports that fail: refused now
    if options.adapter:
        from ..io.peft_format import CONFIG_FILE

        if not (Path(options.adapter) / CONFIG_FILE).is_file():
            raise ConfigError(f"--adapter {options.adapter}: no {CONFIG_FILE} there; give an adapter directory "
                              "(a run's adapter/ folder)")


def save_options(options: TrainOptions, path: Path) -> None:
    import yaml

    path.write_text(yaml.safe_dump(options.to_dict(), sort_keys=False))
