"""Make the bundled smoke checkpoint and its golden outputs with HF transformers (the oracle).

Writes model/data/tiny-gpt2/{config.json, model.safetensors, golden.npz, golden.json}: a small
random GPT-2 (seeded, save_pretrained layout) plus HF's float32 logits for fixed ids and HF's
greedy continuation. `python -m model.smoke` checks our loader and forward against these.
Run: .venv/bin/python -m scripts.make_tiny_checkpoint  (needs the `test` extra: torch, transformers)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import transformers

from scripts.hf_oracle import save_random_gpt2

TINY = dict(vocab_size=8192, n_positions=256, n_embd=64, n_layer=3, n_head=4)
SEED = 20261121
IDS_SHAPE = (2, 16)
NEW_TOKENS = 16


def build(out_dir: Path) -> dict:
    hf = save_random_gpt2(out_dir, SEED, **TINY)
    ids_BT = np.random.default_rng(SEED).integers(0, TINY["vocab_size"], IDS_SHAPE)
    with torch.no_grad():
        logits_BTV = hf(torch.from_numpy(ids_BT)).logits.numpy().astype(np.float32)
        greedy_BS = hf.generate(
            torch.from_numpy(ids_BT), attention_mask=torch.ones(IDS_SHAPE, dtype=torch.long),
            max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0,
        ).numpy()
    np.savez(out_dir / "golden.npz", ids_BT=ids_BT.astype(np.int32), logits_BTV=logits_BTV,
             greedy_BS=greedy_BS.astype(np.int32))
    meta = {
        "made_by": "scripts/make_tiny_checkpoint.py",
        "oracle": "transformers.GPT2LMHeadModel(attn_implementation='eager'), float32, eval",
        "transformers": transformers.__version__, "torch": torch.__version__,
        "seed": SEED, "config": TINY, "ids_shape": list(IDS_SHAPE), "new_tokens": NEW_TOKENS,
    }
    (out_dir / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
    for path in out_dir.iterdir():  # safetensors writes 0600; containers read these as non-root
        path.chmod(0o644)
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parent.parent / "model" / "data" / "tiny-gpt2"
    parser.add_argument("--out", type=Path, default=default)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps(build(args.out), indent=2))
    for path in sorted(args.out.iterdir()):
        print(f"{path.stat().st_size:>10}  {path}")


if __name__ == "__main__":
    main()
