"""Decode and prefill benchmark vs transformers' DeepseekV32: see `mla_dsa/bench.py` (also `mla-dsa bench`).

python benchmarks/bench.py [--preset small|v32-attention] [--device cpu|cuda] [--dtype float32|bfloat16]
                           [--contexts 4096 16384 65536] [--batch 1 4 16] [--prefill 8192 32768] [--out bench-out]
"""

from mla_dsa.bench import main

if __name__ == "__main__":
    main()
