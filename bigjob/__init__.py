"""bigjob: run models that do not fit in memory, and keep the runs reproducible.

The engine's public names follow the big-model-inference tutorial:

>>> import torch
>>> from bigjob import init_empty_weights, infer_auto_device_map
>>> with init_empty_weights():
...     model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])  # 4 MiB each
>>> dict(infer_auto_device_map(model, max_memory={"cpu": "14MiB"}))  # room kept to stream 2 layers back
{'0': 'cpu', '1': 'disk', '2': 'disk', '3': 'disk'}
"""

__version__ = "0.1.0"

from bigjob import engine as _engine  # noqa: E402
from bigjob.engine import *  # noqa: E402,F403 - the engine's public names are bigjob's


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    """``bigjob.from_pretrained``: the Hugging Face adapter, imported on first use (Transformers stays optional)."""
    if name == "from_pretrained":
        from bigjob.models.hf import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'bigjob' has no attribute {name!r}")


def __dir__() -> list[str]:
    """``dir(bigjob)`` lists ``from_pretrained`` too, though it is imported on first use."""
    return sorted({*globals(), "from_pretrained"})


__all__ = ["__version__", "from_pretrained", *_engine.__all__]
