"""HF transformers as the oracle: build and save random GPT-2 checkpoints (save_pretrained layout).

Used by scripts/make_tiny_checkpoint.py, scripts/bench_model.py and the parity tests, so the real
loader always reads files that HF itself wrote. Needs the `test` extra (torch, transformers).
"""

from __future__ import annotations

from pathlib import Path


def save_random_gpt2(out_dir: Path, seed: int, **config):
    """A seeded random GPT2LMHeadModel (eager attention, float32, eval), saved to `out_dir`.
    Returns the HF model. `config` overrides GPT2Config fields; defaults are the 124M model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    vocab = config.get("vocab_size", 50257)
    hf_config = transformers.GPT2Config(
        **config, bos_token_id=vocab - 1, eos_token_id=vocab - 1, attn_implementation="eager"
    )
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    return model
