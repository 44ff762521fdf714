"""lifelong-tickets: lifelong lottery tickets (Top-Down, Bottom-Up, lottery teaching) for class-incremental learning.

The Python API (docs/api.md), imported on first use so that `import llt` stays light:
    llt.load_ticket(path) -> (model, mask)    llt.Mask    llt.apply_mask(model, mask)
    llt.open_stream(preset, overrides) -> data          llt.evaluate(model, data, task) -> accuracy per task
"""

__version__ = "0.1.0"

_API = {"load_ticket": "llt.api", "apply_mask": "llt.api", "open_stream": "llt.api", "evaluate": "llt.api",
        "Mask": "llt.pruning.mask"}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'llt' has no attribute {name!r}")
