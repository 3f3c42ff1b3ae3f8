"""bigjob: big-model inference that fits."""

__version__ = "0.1.0"
