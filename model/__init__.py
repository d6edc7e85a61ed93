"""JAX/Flax NNX GPT-2: importable on its own (the smoke container needs only this package + JAX).

Public API: `from_pretrained(path, dtype)`, `GPT2` (call on int ids [B, T] -> logits [B, T, V]),
`generate(gpt2, ids_BT, max_new_tokens, ...)`, `GPT2Config`, `CheckpointError`.

The names are imported on first use, so that `model.report` (which envcheck reads) loads no JAX.
"""

import importlib

__all__ = ["GPT2", "GPT2Config", "CheckpointError", "from_pretrained", "generate"]
_HOME = {"GPT2": "model.gpt2", "GPT2Config": "model.gpt2", "CheckpointError": "model.params",
         "from_pretrained": "model.params", "generate": "model.generate"}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
