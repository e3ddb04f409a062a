"""Load a DSA checkpoint through the Auto classes and generate with it.

    python examples/generate.py CKPT [--prompt "def fibonacci(n):"] [--max-new-tokens 64] [--dense]

Works where mla-dsa is not installed: the checkpoint carries its modeling code (trust_remote_code=True).
"""

import argparse
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--prompt", default="def fibonacci(n):\n")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dense", action="store_true", help="attend to every token (use_sparse_attention=False)")
    parser.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-k 40) instead of greedy")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint, trust_remote_code=True)
    config = AutoConfig.from_pretrained(args.checkpoint, trust_remote_code=True)
    if hasattr(config, "use_sparse_attention"):  # ours; an export (DeepSeek-V3.2's format) always attends sparsely
        config.use_sparse_attention = not args.dense
    elif args.dense:
        parser.error(f"--dense: {config.model_type} checkpoints have no dense switch (an export: convert it back)")
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, config=config, trust_remote_code=True).eval()
    inputs = tokenizer([args.prompt], return_tensors="pt", add_special_tokens=False)
    sampling = dict(do_sample=True, temperature=0.8, top_k=40) if args.sample else dict(do_sample=False)
    start = time.time()
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **sampling)
    seconds = time.time() - start
    print(tokenizer.decode(output[0], skip_special_tokens=True))
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    print(f"\n[{new_tokens} tokens in {seconds:.2f} s, {'dense' if args.dense else 'sparse'} attention]")


if __name__ == "__main__":
    main()
