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
    "TaskConfig",
    "budget_overrides",
    "register_configs",
    "validate",
]

MODES = ("run", "plan")
DTYPES = ("checkpoint", "float32", "float16", "bfloat16")
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential", "explicit")
SOURCES = ("synthetic", "jsonl", "tensor")
CHECKPOINT_SOURCES = ("demo", "path")
TASKS = ("logits", "score", "embed", "generate")
POOLINGS = ("mean", "last")
MAX_GPUS = 8


@dataclass
class ModelConfig:
    """Which ``nn.Module`` to build: a class or factory by import path, and its keyword arguments."""

    _target_: str = "bigjob.models.demo.DemoTransformer"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    # Module classes (by class name) the planner keeps whole on one device, e.g. [DemoBlock].
    no_split_module_classes: List[str] = field(default_factory=list)
    # Per-parameter dtype overrides, parameter name -> float32|float16|bfloat16.
    special_dtypes: Dict[str, str] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    """Where the weights are: a safetensors/torch file, an index JSON or a folder."""

    source: str = "demo"  # demo: the demo model's seeded checkpoint, made once in the cache | path
    path: Optional[str] = None  # source=path: the checkpoint's location
    demo_seed: int = 0  # source=demo: the seed its weights are drawn from
    content_hash: bool = False  # identify the checkpoint by a hash of its bytes, not sizes + mtimes


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
class PlacementConfig:
    """How weights are spread over devices."""

    strategy: str = "auto"  # auto | balanced | balanced_low_0 | sequential | explicit
    # strategy=explicit: a map {module prefix: device} or the path of a device_map.json.
    device_map: Optional[Any] = None
    max_memory: MaxMemoryConfig = field(default_factory=MaxMemoryConfig)
    offload_folder: Optional[str] = None  # null: the cache's offload registry (or the run folder)
    offload_buffers: bool = False
    prefetch: int = 1  # offloaded modules fetched ahead of the one computing


@dataclass
class DataConfig:
    """The inputs: token-id lists from a JSONL file, a tensor file, or seeded random tokens."""

    source: str = "synthetic"  # synthetic | jsonl | tensor
    path: Optional[str] = None  # jsonl / tensor sources
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

    name: str = "logits"  # logits | score | embed
    top_k: int = 5  # logits: ids and values of the k largest logits per position
    full_logits: bool = False  # logits: also write every logit, one safetensors file per batch
    pooling: str = "mean"  # embed: mean | last (over real tokens)


@dataclass
class CacheConfig:
    """Where plans, offload folders and the demo checkpoint are kept."""

    dir: Optional[str] = None  # null: $BIGJOB_CACHE_DIR, else $XDG_CACHE_HOME/bigjob, else ~/.cache/bigjob
    enabled: bool = True


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


def budget_overrides(max_memory: MaxMemoryConfig) -> dict[str, str]:
    """The budgets the user set, by config key name (``gpuN`` keys are GPU indices)."""
    return {f.name: str(getattr(max_memory, f.name)) for f in dataclasses.fields(max_memory) if getattr(max_memory, f.name) is not None}


def _choice(problems: list[str], key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{key} must be one of {', '.join(allowed)}, got {value!r}")


def validate(cfg: JobConfig) -> None:
    """Raises one :class:`ConfigError` listing every invalid value, or returns None."""
    from bigjob.engine.devices import parse_size  # sizes are the engine's vocabulary

    problems: list[str] = []
    _choice(problems, "mode", cfg.mode, MODES)
    _choice(problems, "dtype.name", cfg.dtype.name, DTYPES)
    _choice(problems, "placement.strategy", cfg.placement.strategy, STRATEGIES)
    _choice(problems, "data.source", cfg.data.source, SOURCES)
    _choice(problems, "checkpoint.source", cfg.checkpoint.source, CHECKPOINT_SOURCES)
    if cfg.checkpoint.source == "path" and not cfg.checkpoint.path:
        problems.append("checkpoint.source=path needs checkpoint.path (a checkpoint file, index or folder)")
    _choice(problems, "task.name", cfg.task.name, TASKS)
    _choice(problems, "task.pooling", cfg.task.pooling, POOLINGS)
    for name, dtype in cfg.model.special_dtypes.items():
        if dtype not in DTYPES[1:]:
            problems.append(f"model.special_dtypes.{name} must be one of {', '.join(DTYPES[1:])}, got {dtype!r}")
    if not cfg.model._target_:
        problems.append("model._target_ is empty; set it to an nn.Module class or factory such as bigjob.models.demo.DemoTransformer")
    for key, value in budget_overrides(cfg.placement.max_memory).items():
        try:
            # Percentages are checked against a nominal capacity: only the syntax matters here.
            parse_size(value, capacity=2**40, key=f"placement.max_memory.{key}")
        except BudgetError as err:
            problems.append(str(err))
    if cfg.placement.strategy == "explicit" and cfg.placement.device_map is None:
        problems.append("placement.strategy=explicit needs placement.device_map (a map or a device_map.json path)")
    if cfg.placement.prefetch < 0:
        problems.append(f"placement.prefetch must be at least 0, got {cfg.placement.prefetch}")
    data = cfg.data
    if data.batch_size < 1:
        problems.append(f"data.batch_size must be at least 1, got {data.batch_size}")
    if data.limit is not None and data.limit < 0:
        problems.append(f"data.limit must be at least 0 (or null for all), got {data.limit}")
    if data.source in ("jsonl", "tensor") and not data.path:
        problems.append(f"data.source={data.source} needs data.path")
    if data.source == "synthetic":
        if data.num_samples < 1:
            problems.append(f"data.num_samples must be at least 1, got {data.num_samples}")
        if data.seq_len < 1:
            problems.append(f"data.seq_len must be at least 1, got {data.seq_len}")
        if data.min_seq_len is not None and not 1 <= data.min_seq_len <= data.seq_len:
            problems.append(f"data.min_seq_len must be between 1 and data.seq_len={data.seq_len}, got {data.min_seq_len}")
    if cfg.task.top_k < 1:
        problems.append(f"task.top_k must be at least 1, got {cfg.task.top_k}")
    if cfg.task.name == "generate":
        problems.append("task.name=generate is not available yet (it arrives with the Hugging Face adapter); use logits, score or embed")
    if problems:
        raise ConfigError("; ".join(problems))


def register_configs(store: ConfigStore | None = None) -> None:
    """Registers the schema as ``bigjob_schema`` (the primary config's first default)."""
    store = store or ConfigStore.instance()
    store.store(name="bigjob_schema", node=JobConfig)


register_configs()
