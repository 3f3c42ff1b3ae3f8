"""The typed schema of a job: one dataclass per config group, registered in Hydra's ConfigStore.

YAML files in ``conf/`` choose options and values; these dataclasses define which keys
exist and their types (Hydra rejects unknown keys and wrong types), and
:func:`validate` checks what types cannot say (ranges, allowed names) and gathers every
problem into one :class:`~bigjob.errors.ConfigError` line naming the keys to change.

Budgets are written with named keys so they work on a command line
(``placement.max_memory.cpu=2GiB``, ``placement.max_memory.gpu0=20GiB``,
``placement.max_memory.disk=50GB``); a key left ``null`` means the device's own default
(free memory, rounded down to 256 MiB, or unlimited disk).

>>> cfg = JobConfig()
>>> cfg.placement.max_memory.cpu = "2GiB"
>>> cfg.placement.max_memory.gpu1 = "10GiB"
>>> budget_overrides(cfg.placement.max_memory)
{'cpu': '2GiB', 'gpu1': '10GiB'}
>>> cfg.data.batch_size = 0
>>> validate(cfg)
Traceback (most recent call last):
...
bigjob.errors.ConfigError: data.batch_size must be at least 1, got 0
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore

from bigjob.errors import BudgetError, ConfigError

__all__ = [
    "CacheConfig",
    "CheckpointConfig",
    "DataConfig",
    "DtypeConfig",
    "JobConfig",
    "MaxMemoryConfig",
    "ModelConfig",
    "PlacementConfig",
    "RatesConfig",
    "RunnerConfig",
    "TaskConfig",
    "budget_overrides",
    "rate_overrides",
    "register_configs",
    "validate",
]

MODES = ("run", "plan")
DTYPES = ("checkpoint", "auto", "float32", "float16", "bfloat16")
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential", "explicit")
SOURCES = ("synthetic", "jsonl", "tensor", "text")
CHECKPOINT_SOURCES = ("demo", "path")
TASKS = ("logits", "score", "embed", "generate")
POOLINGS = ("mean", "last", "cls")
DECODINGS = ("greedy", "sample")
MAX_GPUS = 8
HF_TARGET = "bigjob.models.hf.empty_model"  # model=hf (bigjob.models.hf.HF_TARGET; not imported: torch-free here)


@dataclass
class ModelConfig:
    """Which ``nn.Module`` to build: a class or factory by import path, and its keyword arguments."""

    _target_: str = "bigjob.models.demo.DemoTransformer"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    # Module classes (by class name) the planner keeps whole on one device, e.g. [DemoBlock].
    no_split_module_classes: List[str] = field(default_factory=list)
    # Per-parameter dtype overrides, parameter name -> float32|float16|bfloat16.
    special_dtypes: Dict[str, str] = field(default_factory=dict)
    # A model folder, passed to _target_ as `path` (model=hf: a local Transformers model directory).
    path: Optional[str] = None


@dataclass
class CheckpointConfig:
    """Where the weights are: a safetensors/torch file, an index JSON or a folder."""

    source: str = "demo"  # demo: the demo model's seeded checkpoint, made once in the cache | path
    path: Optional[str] = None  # source=path: the checkpoint's location
    demo_seed: int = 0  # source=demo: the seed its weights are drawn from
    content_hash: bool = False  # identify the checkpoint by a hash of its bytes, not sizes + mtimes
    strict: bool = True  # tensors the model does not have are an error; false: they are logged and ignored


@dataclass
class DtypeConfig:
    """The dtype the weights are computed in; ``checkpoint`` keeps each tensor's stored dtype."""

    name: str = "checkpoint"


@dataclass
class MaxMemoryConfig:
    """Per-device budgets as sizes ('2GiB', '800MB', '90%', bytes); null = the device's default.

    GPUs are ``gpu0`` ... ``gpu7`` (``cuda:0`` ... ``cuda:7``): named fields, because Hydra
    reads ``max_memory.0=...`` as an int key and refuses new keys in a typed config.
    """

    cpu: Optional[str] = None
    disk: Optional[str] = None
    mps: Optional[str] = None
    gpu0: Optional[str] = None
    gpu1: Optional[str] = None
    gpu2: Optional[str] = None
    gpu3: Optional[str] = None
    gpu4: Optional[str] = None
    gpu5: Optional[str] = None
    gpu6: Optional[str] = None
    gpu7: Optional[str] = None


@dataclass
class RatesConfig:
    """Declared speeds for ``placement.execution=auto`` (all three or none; none: measured at load).

    Bandwidths as bytes per second ('12GB/s', '25GiB'); FLOP/s as numbers or strings ('2.5e11', '250G').
    """

    h2d: Optional[str] = None  # pinned host-to-device copies
    cpu_flops: Optional[str] = None  # CPU matmul throughput
    device_flops: Optional[str] = None  # accelerator matmul throughput
    disk: Optional[str] = None  # optional: disk reads of disk-tier units


def rate_overrides(rates: RatesConfig) -> dict[str, str]:
    """The rates the user set, by config key name."""
    return {f.name: str(getattr(rates, f.name)) for f in dataclasses.fields(rates) if getattr(rates, f.name) is not None}


@dataclass
class PlacementConfig:
    """How weights are spread over devices."""

    strategy: str = "auto"  # auto | balanced | balanced_low_0 | sequential | explicit
    # strategy=explicit: a map {module prefix: device} or the path of a device_map.json.
    device_map: Optional[Any] = None
    max_memory: MaxMemoryConfig = field(default_factory=MaxMemoryConfig)
    offload_folder: Optional[str] = None  # null: the cache's offload registry (or the run folder)
    offload_buffers: bool = False
    prefetch: int = 1  # offloaded modules fetched ahead of the one computing
    # A budget too small for 1 + prefetch offloaded modules at a time: false lowers prefetch for them, then
    # streams modules larger than the budget with a warning; true keeps it an error (a plan input).
    strict_budget: bool = False
    # Room kept free of weights on the device that runs the model, for the forward itself (activations,
    # outputs, KV cache): null (none), auto (estimated from the task's forward on the largest batch), or a size.
    working_memory: Optional[str] = None
    # How offloaded modules run on a GPU: stream (weights copied in), local (run on the CPU where they
    # live), auto (local for small batches), or per tier {cpu: ..., disk: ...}. No effect on the plan.
    execution: Any = "stream"
    rates: RatesConfig = field(default_factory=RatesConfig)
    # How disk-tier layers run on the CPU get their bytes: auto (per forward, the layers the page cache
    # has room for stay mapped, the rest are read directly into reused buffers), mapped, or direct.
    # No effect on the plan.
    disk_reads: str = "auto"
    # Linear weights of the tiers that stream (disk; CPU RAM when a GPU runs the model) stored group-wise
    # quantized: none | int8 | int4. Part of the plan's and the offload folder's keys.
    offload_compression: str = "none"


@dataclass
class DataConfig:
    """The inputs: token-id lists from a JSONL file, a tensor file, or seeded random tokens."""

    source: str = "synthetic"  # synthetic | jsonl | tensor | text (prompts: JSONL of strings or one per line)
    path: Optional[str] = None  # jsonl / tensor / text sources
    key: str = "input_ids"  # tensor source: the tensor's name in a .safetensors file or dict .pt file
    batch_size: int = 4
    limit: Optional[int] = None  # use at most this many samples
    pad_id: int = 0
    num_samples: int = 16  # synthetic
    seq_len: int = 64  # synthetic: tokens per sample (the longest)
    min_seq_len: Optional[int] = None  # synthetic: draw lengths in [min_seq_len, seq_len]
    seed: int = 0  # synthetic
    vocab_size: Optional[int] = None  # synthetic: ids below this; null = model.kwargs.vocab_size


@dataclass
class TaskConfig:
    """What to compute per batch."""

    name: str = "logits"  # logits | score | embed | generate
    # logits: ids and values of the k largest logits per position; generate (sample): draw only
    # among the k most likely tokens, 0 for all.
    top_k: int = 5
    full_logits: bool = False  # logits: also write every logit, one safetensors file per batch
    pooling: str = "mean"  # embed: mean | last | cls (over real tokens)
    normalize: bool = False  # embed: scale each embedding to unit L2 norm
    max_new_tokens: int = 32  # generate: tokens to add per prompt (fewer when it ends with EOS)
    decoding: str = "greedy"  # generate: greedy | sample
    temperature: float = 1.0  # generate (sample): logits are divided by it
    top_p: float = 1.0  # generate (sample): draw from the most likely tokens holding this probability
    seed: int = 0  # generate (sample): batch i draws from a generator seeded with seed + i


@dataclass
class CacheConfig:
    """Where plans, offload folders and the demo checkpoint are kept."""

    dir: Optional[str] = None  # null: $BIGJOB_CACHE_DIR, else $XDG_CACHE_HOME/bigjob, else ~/.cache/bigjob
    enabled: bool = True
    # Before building an offload folder and after each job, remove the least recently used
    # offload folders and demo checkpoints of other jobs until the cache folder fits this size
    # ("50GB"); null: never remove anything.
    max_size: Optional[str] = None


@dataclass
class RunnerConfig:
    """How a job's work is run (never what it computes: not part of the job's key)."""

    # Run the job's work in a fresh child process, so its peak memory and CUDA state are its
    # own. null: on for the runs of a sweep (-m), except under launchers that already start one
    # process per job (submitit); off for single runs and mode=plan.
    isolate: Optional[bool] = None
    # Isolated jobs are forked from one process per sweep that imported torch, bigjob and the
    # model's library once, instead of each starting Python and importing them (2-5 s a job).
    warm_start: bool = False
    # Keep that process between commands (one per environment, exiting after daemon_idle_s idle
    # seconds): a rerun skips the imports too. Single runs are then isolated as well.
    daemon: bool = False
    daemon_idle_s: float = 600.0


@dataclass
class JobConfig:
    """A whole job. ``mode=plan`` only plans; ``mode=run`` loads the weights and runs the task."""

    mode: str = "run"
    quiet: bool = False  # no progress bar (it is also off when stderr is not a terminal)
    skip_completed: bool = True  # in sweeps, skip a job already completed with the same config
    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dtype: DtypeConfig = field(default_factory=DtypeConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    runner: RunnerConfig = field(default_factory=RunnerConfig)


def budget_overrides(max_memory: MaxMemoryConfig) -> dict[str, str]:
    """The budgets the user set, by config key name (``gpuN`` keys are GPU indices)."""
    return {f.name: str(getattr(max_memory, f.name)) for f in dataclasses.fields(max_memory) if getattr(max_memory, f.name) is not None}


def _choice(problems: list[str], key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        from bigjob.job.nearest import did_you_mean

        problems.append(f"{key} must be one of {', '.join(allowed)}, got {value!r}{did_you_mean(str(value), allowed)}")


def validate(cfg: JobConfig) -> None:
    """Raises one :class:`ConfigError` listing every invalid value, or returns None."""
    from bigjob.engine.plan.compression import COMPRESSIONS
    from bigjob.engine.plan.devices import parse_size  # sizes are the engine's vocabulary
    from bigjob.engine.run.dispatch import DISK_READS
    from bigjob.engine.run.execution import ExecutionRates, resolve_policy

    unknown = {key: f"unknown config key {key}; {_known_keys(key)}" for key in _unknown_keys(cfg)}
    problems: list[str] = list(unknown.values())
    _choice(problems, "mode", cfg.mode, MODES)
    _choice(problems, "dtype.name", cfg.dtype.name, DTYPES)
    _choice(problems, "placement.strategy", cfg.placement.strategy, STRATEGIES)
    _choice(problems, "data.source", cfg.data.source, SOURCES)
    _choice(problems, "checkpoint.source", cfg.checkpoint.source, CHECKPOINT_SOURCES)
    if cfg.model._target_ == HF_TARGET and not cfg.model.path:
        problems.append("model=hf needs model.path (the local Transformers model folder holding config.json and the weights)")
    elif cfg.checkpoint.source == "path" and not cfg.checkpoint.path:
        problems.append("checkpoint.source=path needs checkpoint.path (a checkpoint file, index or folder)")
    _choice(problems, "task.name", cfg.task.name, TASKS)
    _choice(problems, "task.pooling", cfg.task.pooling, POOLINGS)
    for name, dtype in cfg.model.special_dtypes.items():
        if dtype not in DTYPES[1:]:
            problems.append(f"model.special_dtypes.{name} must be one of {', '.join(DTYPES[1:])}, got {dtype!r}")
    if not cfg.model._target_:
        problems.append("model._target_ is empty; set it to an nn.Module class or factory such as bigjob.models.demo.DemoTransformer")
    budget_problems = [text for key, text in unknown.items() if key.startswith("placement.max_memory.")]
    for key, value in budget_overrides(cfg.placement.max_memory).items():
        try:
            # Percentages are checked against a nominal capacity: only the syntax matters here.
            parse_size(value, capacity=2**40, key=f"placement.max_memory.{key}")
        except BudgetError as err:
            budget_problems.append(str(err))
            problems.append(str(err))
    if cfg.cache.max_size is not None:
        try:
            parse_size(cfg.cache.max_size, key="cache.max_size")
        except BudgetError as err:
            problems.append(f"{err}; or cache.max_size=null to never prune")
    if cfg.placement.strategy == "explicit" and cfg.placement.device_map is None:
        problems.append("placement.strategy=explicit needs placement.device_map (a map or a device_map.json path)")
    if cfg.placement.prefetch < 0:
        problems.append(f"placement.prefetch must be at least 0, got {cfg.placement.prefetch}")
    if cfg.placement.working_memory is not None and cfg.placement.strategy == "explicit":
        problems.append(
            "placement.working_memory only shapes a plan bigjob makes; with placement.strategy=explicit the map is used as given "
            "(remove placement.working_memory, or plan with placement.strategy=auto)"
        )
    if cfg.placement.working_memory not in (None, "auto"):
        try:
            parse_size(cfg.placement.working_memory, key="placement.working_memory")
        except BudgetError as err:
            problems.append(f"{err}; or use placement.working_memory=auto (estimated for the job's batches) or null (none)")
    try:
        resolve_policy(cfg.placement.execution, key="placement.execution")
    except ConfigError as err:
        problems.append(str(err))
    _choice(problems, "placement.disk_reads", cfg.placement.disk_reads, DISK_READS)
    _choice(problems, "placement.offload_compression", cfg.placement.offload_compression, COMPRESSIONS)
    rates = rate_overrides(cfg.placement.rates)
    if rates:
        try:
            ExecutionRates.from_mapping(rates, key="placement.rates")
        except ConfigError as err:
            problems.append(str(err))
    if cfg.runner.daemon and cfg.runner.isolate is False:
        problems.append("runner.daemon=true runs each job in a process forked from the daemon; it cannot be combined with runner.isolate=false")
    if not cfg.runner.daemon_idle_s > 0:
        problems.append(f"runner.daemon_idle_s must be a positive number of seconds, got {cfg.runner.daemon_idle_s}")
    data = cfg.data
    if data.batch_size < 1:
        problems.append(f"data.batch_size must be at least 1, got {data.batch_size}")
    if data.limit is not None and data.limit < 0:
        problems.append(f"data.limit must be at least 0 (or null for all), got {data.limit}")
    if data.source in ("jsonl", "tensor", "text") and not data.path:
        problems.append(f"data.source={data.source} needs data.path")
    if data.source == "synthetic":
        if data.num_samples < 1:
            problems.append(f"data.num_samples must be at least 1, got {data.num_samples}")
        if data.seq_len < 1:
            problems.append(f"data.seq_len must be at least 1, got {data.seq_len}")
        if data.min_seq_len is not None and not 1 <= data.min_seq_len <= data.seq_len:
            problems.append(f"data.min_seq_len must be between 1 and data.seq_len={data.seq_len}, got {data.min_seq_len}")
    task = cfg.task
    if task.name == "generate":
        _choice(problems, "task.decoding", task.decoding, DECODINGS)
        if task.max_new_tokens < 1:
            problems.append(f"task.max_new_tokens must be at least 1, got {task.max_new_tokens}")
        if task.top_k < 0:
            problems.append(f"task.top_k must be at least 0 (0: no top-k filter), got {task.top_k}")
        if not task.temperature > 0:
            problems.append(f"task.temperature must be above 0, got {task.temperature}")
        if not 0 < task.top_p <= 1:
            problems.append(f"task.top_p must be in (0, 1], got {task.top_p}")
    elif task.top_k < 1:
        problems.append(f"task.top_k must be at least 1, got {task.top_k}")
    if problems:
        raise (BudgetError if set(problems) <= set(budget_problems) else ConfigError)("; ".join(problems))


def _unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Keys added with Hydra's ``+`` that the schema does not have (OmegaConf.to_object keeps them as attributes)."""
    if not dataclasses.is_dataclass(node):
        return []
    names = [f.name for f in dataclasses.fields(node)]
    extra = [f"{prefix}{name}" for name in vars(node) if name not in names]
    for name in names:
        extra += _unknown_keys(getattr(node, name), f"{prefix}{name}.")
    return extra


def _known_keys(key: str) -> str:
    parent, _, _ = key.rpartition(".")
    node: Any = JobConfig
    for part in filter(None, parent.split(".")):
        node = {f.name: f for f in dataclasses.fields(node)}[part].type
        node = globals()[node] if isinstance(node, str) else node
    where = parent or "the top level"
    return f"{where} takes {', '.join(f.name for f in dataclasses.fields(node))}"


def register_configs(store: ConfigStore | None = None) -> None:
    """Registers the schema as ``bigjob_schema`` (the primary config's first default)."""
    store = store or ConfigStore.instance()
    store.store(name="bigjob_schema", node=JobConfig)


register_configs()
