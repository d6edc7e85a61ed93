"""JAX/Flax NNX GPT-2: importable on its own (the smoke container needs only this package + JAX).

Public API: `from_pretrained(path, dtype)`, `GPT2` (call on int ids [B, T] -> logits [B, T, V]),
`generate(gpt2, ids_BT, max_new_tokens, ...)`, `GPT2Config`, `CheckpointError`.
"""

from model.generate import generate
from model.gpt2 import GPT2, GPT2Config
from model.params import CheckpointError, from_pretrained

__all__ = ["GPT2", "GPT2Config", "CheckpointError", "from_pretrained", "generate"]
