"""`python -m model.generate --checkpoint DIR --prompt-ids 1,2,3 --max-new-tokens N [--greedy]
[--json]`: generate token ids (no tokenizer is bundled, so ids in and ids out)."""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from model._cli import EXIT_OK, add_impl_option, parse_ids, run_main
from model.generate import generate
from model.params import from_pretrained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="HF GPT-2 directory or hub id")
    parser.add_argument("--prompt-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--max-new-tokens", required=True, type=int)
    parser.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    add_impl_option(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    prompt_BT = parse_ids(args.prompt_ids)
    gpt2 = from_pretrained(args.checkpoint)
    start_s = time.perf_counter()
    ids_BS = generate(
        gpt2, prompt_BT, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, greedy=args.greedy,
        seed=args.seed, impl=args.impl,
    )
    elapsed_s = time.perf_counter() - start_s  # includes compilation: this is a one-shot command
    new_ids = ids_BS[0, prompt_BT.shape[1]:].tolist()
    if args.json:
        print(json.dumps({
            "prompt_ids": prompt_BT[0].tolist(), "new_ids": new_ids, "ids": ids_BS[0].tolist(),
            "greedy": args.greedy, "seed": args.seed, "impl": args.impl,
            "elapsed_s_with_compile": round(elapsed_s, 4),
        }))
    else:
        print(",".join(str(i) for i in np.asarray(ids_BS[0])))
    return EXIT_OK


if __name__ == "__main__":
    run_main(main)
