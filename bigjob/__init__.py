"""bigjob: big-model inference that fits."""
