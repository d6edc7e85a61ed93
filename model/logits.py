"""`python -m model.logits --checkpoint DIR --ids IDS.npy --out LOGITS.npy`: int ids [B, T] in,
float32 logits [B, T, V] out. Scripts and benchmarks use it to get our logits for any input."""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from model._cli import EXIT_OK, add_impl_option, load_ids, run_main, save_npy_atomic
from model.gpt2 import check_ids
from model.params import from_pretrained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.logits", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="HF GPT-2 directory or hub id")
    parser.add_argument("--ids", required=True, type=Path, help=".npy int array [B, T]")
    parser.add_argument("--out", required=True, type=Path, help=".npy float32 [B, T, V] to write")
    add_impl_option(parser)
    args = parser.parse_args(argv)
    if not args.out.parent.is_dir():
        raise ValueError(f"--out {args.out}: directory {args.out.parent} does not exist")
    ids_BT = load_ids(args.ids)
    jax.config.update("jax_default_matmul_precision", "highest")
    gpt2 = from_pretrained(args.checkpoint)
    check_ids(ids_BT, gpt2.config)
    logits_BTV = jax.jit(lambda m, ids: m(ids, impl=args.impl))(gpt2, ids_BT)
    save_npy_atomic(args.out, np.asarray(logits_BTV, np.float32))
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
