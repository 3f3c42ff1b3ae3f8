"""bigjob: run models that do not fit in memory, and keep the runs reproducible.

The engine's public names follow the big-model-inference tutorial:

>>> import torch
>>> from bigjob import init_empty_weights, infer_auto_device_map
>>> with init_empty_weights():
...     model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])  # 4 MiB each
>>> dict(infer_auto_device_map(model, max_memory={"cpu": "14MiB"}))  # room kept to stream 2 layers back
{'0': 'cpu', '1': 'disk', '2': 'disk', '3': 'disk'}
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # imported on first use below: `bigjob --help` and `--version` must not wait for torch
    from bigjob.engine import *  # noqa: F403 - the engine's public names are bigjob's
    from bigjob.models.hf import from_pretrained


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """The engine's names (and ``__all__``) import the engine, and torch, on first use; ``bigjob.from_pretrained``
    the Hugging Face adapter (Transformers stays optional)."""
    if name == "from_pretrained":
        from bigjob.models.hf import from_pretrained

        return from_pretrained
    if name.startswith("__") and name != "__all__":
        raise AttributeError(f"module 'bigjob' has no attribute {name!r}")
    import importlib

    engine = importlib.import_module("bigjob.engine")  # not `from bigjob import engine`: that asks this hook again
    if name == "__all__":
        return ["__version__", "from_pretrained", *engine.__all__]
    if name in engine.__all__:
        return getattr(engine, name)
    raise AttributeError(f"module 'bigjob' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__getattr__("__all__")})
