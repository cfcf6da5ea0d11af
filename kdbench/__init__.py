"""kdbench: a plugin-based benchmark suite for knowledge distillation and model compression."""

import pluggy

__version__ = "0.1.0"

#: Decorate a plugin's hook implementations with this marker.
hookimpl = pluggy.HookimplMarker("kdbench")

__all__ = ["__version__", "hookimpl"]
