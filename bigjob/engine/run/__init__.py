"""Loading and running: the loader, dispatch, the hooks that bring weights in, and the execution policy."""
