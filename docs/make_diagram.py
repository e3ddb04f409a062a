"""Draws docs/dsa_mla.png, the README's picture of DeepSeek Sparse Attention on Multi-head Latent Attention.

python docs/make_diagram.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BOXES = {
    # name: (x, y, width, height, text, colour)
    "h": (0.2, 4.2, 1.6, 0.8, "hidden h_t", "#dddddd"),
    "cq": (2.6, 5.6, 2.2, 0.8, "c_Q = RMSNorm(q_a_proj h)", "#cfe2f3"),
    "q": (5.6, 5.6, 2.6, 0.8, "q_b_proj -> [q_nope | q_rope]\nper head", "#cfe2f3"),
    "qabs": (9.0, 5.6, 2.8, 0.8, "absorbed query\n[W_UK^T q_nope | q_rope]", "#cfe2f3"),
    "kv": (2.6, 3.9, 2.6, 0.8, "kv_a_proj_with_mqa\n-> [c_KV (512) | k_R (64)]", "#d9ead3"),
    "cache": (
        6.0,
        3.2,
        2.6,
        1.5,
        "MlaDsaCache, per token\nlatent 576 numbers\n+ indexer key 128\n(1,284 B bf16+FP8)",
        "#fff2cc",
    ),
    "qi": (5.6, 7.1, 2.6, 0.8, "indexer.wq_b -> q_I\n(index heads)", "#f4cccc"),
    "ki": (2.6, 2.3, 2.6, 0.8, "indexer.wk -> LayerNorm -> k_I", "#f4cccc"),
    "score": (9.0, 7.1, 2.8, 0.8, "I(t,s) = sum_j w_j ReLU(q_I,j . k_I(s))\ntop-k over s", "#f4cccc"),
    "gather": (9.0, 3.6, 2.8, 0.8, "gather the k selected\nlatent rows only", "#fff2cc"),
    "attn": (12.6, 4.6, 2.6, 1.0, "softmax over k rows\n-> sum of c_KV -> W_UV\n-> o_proj", "#d9d2e9"),
}
ARROWS = [
    ("h", "cq"), ("cq", "q"), ("q", "qabs"), ("h", "kv"), ("kv", "cache"), ("cq", "qi"), ("h", "ki"),
    ("ki", "cache"), ("qi", "score"), ("cache", "score"), ("score", "gather"), ("cache", "gather"),
    ("gather", "attn"), ("qabs", "attn"),
]  # fmt: skip


def centre(name: str, side: str) -> tuple[float, float]:
    x, y, w, h, *_ = BOXES[name]
    return {"right": (x + w, y + h / 2), "left": (x, y + h / 2), "top": (x + w / 2, y + h),
            "bottom": (x + w / 2, y)}[side]  # fmt: skip


OUT = Path(__file__).with_name("dsa_mla.png")


def main(out: Path = OUT) -> Path:
    fig, ax = plt.subplots(figsize=(13, 6.2))
    for x, y, w, h, text, colour in BOXES.values():
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#444444"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=8.5)
    for start, end in ARROWS:
        sx, sy, sw, sh, *_ = BOXES[start]
        ex, ey, ew, eh, *_ = BOXES[end]
        if ex >= sx + sw - 0.01:
            a, b = centre(start, "right"), centre(end, "left")
        elif ey > sy:
            a, b = centre(start, "top"), centre(end, "bottom")
        else:
            a, b = centre(start, "bottom"), centre(end, "top")
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, color="#555555", lw=1))
    ax.text(0.2, 0.9, "MLA: keys and values live in one latent per token; the up-projections are absorbed into the "
            "query (W_UK) and the output (W_UV).\nDSA: a cheap ReLU indexer scores every previous token; the main "
            "attention reads only the top-k latent rows: O(L k) instead of O(L^2).", fontsize=9)  # fmt: skip
    ax.set_xlim(0, 15.4)
    ax.set_ylim(0.5, 8.2)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    print(main())
