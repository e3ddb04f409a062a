"""GQA -> MLA, one layer's linear algebra: from a Llama-style attention (q/k/v/o projections, RoPE on every key
dimension, `G` key/value heads shared by `H / G` query heads each) to DeepSeek's MLA (one latent `c_KV` of
`kv_lora_rank`, one RoPE key of `qk_rope_head_dim` shared by every head, per-head up-projections `kv_b_proj`).

Everything is computed from two calibration statistics of the layer's attention input `x` (the hidden state after
`input_layernorm`): its second moment `E[x x^T]`, and each query head's attention distribution over the distance
`t - s` to the keys it reads.

1. **RoPE decoupling.** RoPE rotates the two dimensions of frequency pair `i` of every key head by the same angle,
   so an orthogonal mix of the `G` heads' pair `i` commutes with it (TransMLA's observation). Per frequency the mix
   is the key covariance's eigenbasis, most energetic direction first. The first `r` (`rope_heads`) directions of
   every frequency become the shared RoPE key (`qk_rope_head_dim = r * head_dim`), exact: its pair `i * r + j`
   turns at the source's frequency `i` (`rope_frequencies`; one head's worth is the source's own RoPE, a wider key
   is written as transformers' "longrope" with one factor per pair). With `r = G` every key keeps its rotation and
   the conversion is exact at any length, the latent holding the values alone: the same cache as the source. With
   `r < G` the other `G - r` directions cannot keep their rotation (the lossy step): they become position-free
   ("nope") keys, and the query reading them is multiplied by the head's expected rotation `E[R(-(t - s) f_i)]`
   under its own attention distribution (a 2 x 2 matrix per head and frequency: near the identity for slow
   frequencies, near 0 for fast ones), the least-squares stand-in for the rotation it lost; it is fitted on the
   calibration windows' distances, so its loss grows past them. With one key/value head (MQA) nothing is lost.
2. **The latent.** Keys-without-RoPE and values, `y = [k_nope; v] = W_y x`, are factored through `kv_lora_rank`
   dimensions: `c = A x`, `y ~ B c`, minimising the error where it matters: key errors as the scores they change
   (weighted by the queries' second moment), value errors as the output they change (weighted by `o_proj`), both
   under the input's own second moment (activation-aware). At the full width `(2G - r) * head_dim` it is exact.
3. **The latent norm.** MLA normalises `c` (`kv_a_layernorm`, eps 1e-6). `c` is written scaled down so that its mean
   square is far below the norm's eps, where RMSNorm is linear (`c / sqrt(eps)`), and the norm's weight scales it back
   (`latent_scale`): exact to a relative `mean(c^2) / (2 eps)`, at most 5e-6. DeepSeek-V3.2's format also compresses
   the query through a normed latent (q_a_proj -> q_a_layernorm -> q_b_proj): at rank `hidden_size` that compression is
   the identity, held in the same linear regime. Training either down-projection would leave the regime (an optimizer
   step is not scaled down), so mla-dsa's training freezes them on such models (`linear_latent_norm` in the config)
   and adapts q_b_proj, kv_b_proj, o_proj and the MLP instead.
4. **Biases** (Qwen2's q/k/v, Llama's `attention_bias`). A projection with a bias is linear in `[x; 1]`: steps 1-3
   run on that input (its second moment from `E[x]`), and the constant coordinate becomes the bias of q_a_proj and
   kv_a_proj_with_mqa (DeepSeek's `attention_bias`), so RoPE turns the keys' and queries' biases with them, exactly
   as the source's. c_Q is `[x; 1]` then (`q_lora_rank` = hidden + 1). A value bias needs no latent dimension: every
   query's attention weights sum to 1, so it adds `W_o b_v` to the output whatever the query reads: o_proj's bias.
"""

import math
from dataclasses import dataclass

import torch

NORM_EPS = 1e-6  # MlaDsaRMSNorm's default, the eps of DeepSeek's kv_a_layernorm
LINEAR_NORM_RATIO = 1e-5  # the latent's largest calibrated mean square, as a fraction of NORM_EPS


@dataclass
class GqaGeometry:
    heads: int
    kv_heads: int
    head_dim: int
    rope_heads: int = 1  # mixed key heads kept rotated in the shared RoPE key (1..kv_heads)

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def rope_dim(self) -> int:  # the shared RoPE key: rope_heads mixed heads, every frequency of each
        return self.rope_heads * self.head_dim

    @property
    def nope_dim(self) -> int:  # keys that lose RoPE: G - rope_heads mixed heads
        return (self.kv_heads - self.rope_heads) * self.head_dim

    @property
    def full_rank(self) -> int:  # the latent width at which the factorisation is exact
        return self.nope_dim + self.kv_heads * self.head_dim


@dataclass
class LayerStats:
    """Calibration statistics of one layer: E[x x^T] [d, d] of the attention input, the largest squared norm of x
    (for the latent scale), per query head the attention mass at each distance t - s [H, T], and E[x]."""

    x_moment: torch.Tensor
    x_max_sq: float
    distance: torch.Tensor
    x_mean: torch.Tensor | None = None  # E[x] [d]: the biases' cross term (step 4)


def pairs(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two dimensions of each RoPE frequency pair in the half-split layout transformers' Llama uses."""
    half = torch.arange(head_dim // 2)
    return half, half + head_dim // 2


def expected_rotation(distance: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """[H, F, 2, 2]: E[R(-delta f)] over each head's attention distribution over delta = t - s, for each frequency
    f. R(a) rotates (x1, x2) by a; a query q and key k at distance delta score q^T R(-delta f) k after RoPE."""
    weights = distance / distance.sum(-1, keepdim=True).clamp_min(1e-30)  # [H, T]
    angles = torch.arange(distance.shape[-1], dtype=torch.float64)[:, None] * inv_freq.double()[None]  # [T, F]
    cos, sin = weights.double() @ torch.cos(angles), weights.double() @ torch.sin(angles)  # [H, F]
    return torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-a) = [[c, s], [-s, c]]


def decouple_rope(w_q, w_k, stats: LayerStats, geometry: GqaGeometry, inv_freq: torch.Tensor, fold: bool = True):
    """Splits each head's scores into one shared RoPE key and position-free keys (module docstring, step 1).

    w_q [H*D, d], w_k [G*D, d] (half-split RoPE layout). Per frequency the `rope_heads` (r) most energetic mixed
    directions keep their rotation, the other G - r lose it. `fold=False` leaves the queries of the keys that lose
    RoPE as they are (TransMLA's RoRoPE: those dims simply become position-free), for comparison. Returns, in
    float64, with the source's scores unscaled:
    q_rope [H, r*D, d] and k_rope [r*D, d] (half-split; pair p = i*r + j is frequency i's mixed direction j, see
    `rope_frequencies`), q_nope [H, (G-r)*D, d] and k_nope [(G-r)*D, d], where the nope dims are ordered (mixed head
    j, pair i, component c)."""
    heads, kv_heads, head_dim, kept = geometry.heads, geometry.kv_heads, geometry.head_dim, geometry.rope_heads
    first, second = pairs(head_dim)
    rope_half = geometry.rope_dim // 2
    wq = w_q.double().view(heads, head_dim, -1)
    wk = w_k.double().view(kv_heads, head_dim, -1)
    x_moment = stats.x_moment.double()
    rotation = expected_rotation(stats.distance if fold else _at_distance_zero(stats.distance), inv_freq)
    group_of = torch.arange(heads) // geometry.group
    q_rope = torch.zeros(heads, geometry.rope_dim, wq.shape[-1], dtype=torch.float64)
    k_rope = torch.zeros(geometry.rope_dim, wq.shape[-1], dtype=torch.float64)
    q_nope = torch.zeros(heads, kv_heads - kept, head_dim // 2, 2, wq.shape[-1], dtype=torch.float64)
    k_nope = torch.zeros(kv_heads - kept, head_dim // 2, 2, wq.shape[-1], dtype=torch.float64)
    for i in range(head_dim // 2):
        pair = torch.stack([first[i], second[i]])
        k_pair = wk[:, pair]  # [G, 2, d]
        covariance = torch.einsum("gcd,de,hce->gh", k_pair, x_moment, k_pair)  # both components: RoPE-invariant
        _, vectors = torch.linalg.eigh(covariance)
        mix = vectors.flip(-1).T  # [G (mixed head j), G]: row 0 is the most energetic direction
        mixed = torch.einsum("jg,gcd->jcd", mix, k_pair)  # [G, 2, d]
        q_pair = wq[:, pair]  # [H, 2, d]
        weight = mix[:, group_of].T  # [H, G]: how much of head h's key group each mixed head carries
        for j in range(kept):
            rope_pair = torch.tensor([i * kept + j, i * kept + j + rope_half])
            k_rope[rope_pair] = mixed[j]
            q_rope[:, rope_pair] = weight[:, j, None, None] * q_pair
        k_nope[:, i] = mixed[kept:]
        # q^T R k over the lost rotation becomes (M^T q)^T k with M = E[R(-delta f)] (2 x 2 per head)
        folded = torch.einsum("hab,had->hbd", rotation[:, i], q_pair)  # M^T q
        q_nope[:, :, i] = weight[:, kept:, None, None] * folded[:, None]
    return q_rope, k_rope, q_nope.flatten(1, 3), k_nope.flatten(0, 2)


def rope_frequencies(inv_freq: torch.Tensor, rope_heads: int) -> torch.Tensor:
    """[r*D/2]: the frequency of each pair of the shared RoPE key, frequency i repeated for its r kept directions."""
    return inv_freq.repeat_interleave(rope_heads)


def _at_distance_zero(distance: torch.Tensor) -> torch.Tensor:
    """Every head's attention mass at distance 0, whose expected rotation is the identity."""
    return torch.zeros_like(distance).index_fill_(-1, torch.tensor([0]), 1.0)


def _psd_sqrt(matrix: torch.Tensor, floor: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    values = values.clamp_min(floor * values.max().clamp_min(floor))
    return (vectors * values.sqrt()) @ vectors.T, (vectors * values.rsqrt()) @ vectors.T


def factor_latent(k_nope, q_nope, w_v, w_o, stats: LayerStats, geometry: GqaGeometry, rank: int, key_weight: float,
                  fit: str = "attention"):  # fmt: skip
    """c = A x of `rank` dims, with k_nope ~ B_k c and v ~ B_v c (module docstring, step 2). k_nope [(G-1)*D, d],
    q_nope [H, (G-1)*D, d] (already scaled as the scores are), w_v [G*D, d], w_o [hidden, H*D]. Returns A [rank, d],
    B_k [(G-1)*D, rank], B_v [G*D, rank] in float64.

    `fit="attention"` weights key errors by the queries and value errors by `o_proj`; `fit="activation"` is the
    principal subspace of the keys and values themselves, their totals balanced (TransMLA's balanced KV PCA, and
    the activation-aware SVD of CARE), for comparison."""
    heads, kv_heads, head_dim = geometry.heads, geometry.kv_heads, geometry.head_dim
    x_moment = stats.x_moment.double()
    w_y = torch.cat([k_nope, w_v.double()])  # [N, d]
    query_moment = torch.einsum("hnd,de,hme->nm", q_nope, x_moment, q_nope)  # key error e costs e^T E[q q^T] e
    wo = w_o.double().view(-1, heads, head_dim)
    groups = [wo[:, g * geometry.group : (g + 1) * geometry.group] for g in range(kv_heads)]  # [hidden, H/G, D] each
    value_moment = torch.block_diag(*[torch.einsum("ohv,ohw->vw", w, w) for w in groups])  # e_v costs |W_o e_v|^2
    value_root, value_inv = _psd_sqrt(value_moment)
    if fit == "activation":
        value_root = value_inv = torch.eye(value_moment.shape[0], dtype=torch.float64)
    if k_nope.shape[0] == 0:  # one key/value head: every key dim keeps RoPE, the latent holds values only
        weighted = value_root @ w_v.double() @ x_moment @ w_v.double().T @ value_root
        basis = torch.linalg.eigh((weighted + weighted.T) / 2)[1].flip(-1)[:, :rank]
        return basis.T @ value_root @ w_v.double(), k_nope.new_zeros(0, rank), value_inv @ basis
    key_root, key_inv = _psd_sqrt(query_moment)
    if fit == "activation":
        key_root = key_inv = torch.eye(query_moment.shape[0], dtype=torch.float64)
    # Balance the two kinds of error by their totals, then let key_weight tilt it.
    key_energy = torch.trace(key_root @ k_nope @ x_moment @ k_nope.T @ key_root)
    value_energy = torch.trace(value_root @ w_v.double() @ x_moment @ w_v.double().T @ value_root)
    scale = key_weight * (value_energy / key_energy.clamp_min(1e-30)).sqrt()
    omega = torch.block_diag(scale * key_root, value_root)
    omega_inv = torch.block_diag(key_inv / scale, value_inv)
    weighted = omega @ w_y @ x_moment @ w_y.T @ omega.T
    _, vectors = torch.linalg.eigh((weighted + weighted.T) / 2)
    basis = vectors.flip(-1)[:, :rank]  # [N, rank]
    a = basis.T @ omega @ w_y
    b = omega_inv @ basis
    return a, b[: k_nope.shape[0]], b[k_nope.shape[0] :]


def latent_scale(a: torch.Tensor, stats: LayerStats) -> float:
    """The factor that puts c = A x's largest calibrated mean square at LINEAR_NORM_RATIO * NORM_EPS."""
    largest = torch.linalg.matrix_norm(a, ord=2).item() ** 2 * stats.x_max_sq / a.shape[0]  # bound on mean(c^2)
    return math.sqrt(LINEAR_NORM_RATIO * NORM_EPS / max(largest, 1e-30))


def interleave_order(rope_dim: int) -> torch.Tensor:
    """Half-split RoPE dims -> DeepSeek's interleaved layout (pair i at dims 2i, 2i+1): new dim j reads old order[j]."""
    first, second = pairs(rope_dim)
    return torch.stack([first, second], -1).flatten()


def mla_attention_weights(w_q, w_k, w_v, w_o, stats: LayerStats, geometry: GqaGeometry, inv_freq: torch.Tensor,
                          rank: int, key_weight: float = 1.0, rope_fold: bool = True, latent_fit: str = "attention",
                          score_scale: float = 1.0) -> dict[str, torch.Tensor]:  # fmt: skip
    """One layer's MLA attention tensors (our names under `self_attn.`, float32) computing what the GQA projections
    compute: q_a_proj [d, d], q_a_layernorm.weight [d], q_b_proj [H*(dn+dr), d], kv_a_proj_with_mqa [rank+dr, d],
    kv_a_layernorm.weight [rank], kv_b_proj [H*(dn+dv), rank], o_proj (unchanged). dn = (G-r)*D, dr = r*D, dv = D
    (r = `geometry.rope_heads`); RoPE interleaved, pair p at `rope_frequencies(inv_freq, r)[p]`. `rope_fold` and
    `latent_fit`: decouple_rope's `fold` and factor_latent's `fit`; `score_scale`: what SRC's RoPE multiplies every
    score by (YaRN's attention factor, squared), taken on by the queries (RoPE and position-free alike)."""
    if latent_fit not in ("attention", "activation"):
        raise ValueError(f"latent_fit must be 'attention' or 'activation', got {latent_fit!r}")
    heads, head_dim = geometry.heads, geometry.head_dim
    q_rope, k_rope, q_nope, k_nope = decouple_rope(w_q, w_k, stats, geometry, inv_freq, fold=rope_fold)
    # Ours scales scores by 1/sqrt(dn + dr), the source by 1/sqrt(D) (and `score_scale`): the queries make up both.
    q_scale = math.sqrt((geometry.nope_dim + geometry.rope_dim) / head_dim) * score_scale
    q_rope, q_nope = q_rope * q_scale, q_nope * q_scale
    a, b_k, b_v = factor_latent(k_nope, q_nope, w_v, w_o, stats, geometry, rank, key_weight, latent_fit)
    scale = latent_scale(a, stats)
    order = interleave_order(geometry.rope_dim)
    q_proj = torch.cat([q_nope, q_rope[:, order]], dim=1)  # [H, dn + dr, d]
    group_of = torch.arange(heads) // geometry.group
    b_v = b_v.view(geometry.kv_heads, head_dim, rank)[group_of]  # [H, dv, rank]: each head reads its group's values
    kv_b = torch.cat([b_k.expand(heads, -1, -1), b_v], dim=1)  # [H, dn + dv, rank]
    # DeepSeek-V3.2's format always compresses the query (q_a_proj -> q_a_layernorm -> q_b_proj): at rank d the
    # compression is the identity, held in the norm's linear regime like the latent (step 3). c_Q is then the
    # attention input itself, which the indexer reads.
    q_scale_down = math.sqrt(LINEAR_NORM_RATIO * NORM_EPS * w_q.shape[1] / max(stats.x_max_sq, 1e-30))
    return {
        "q_a_proj.weight": torch.eye(w_q.shape[1]) * q_scale_down,
        "q_a_layernorm.weight": torch.full((w_q.shape[1],), math.sqrt(NORM_EPS) / q_scale_down, dtype=torch.float32),
        "q_b_proj.weight": q_proj.flatten(0, 1).float(),
        "kv_a_proj_with_mqa.weight": torch.cat([a * scale, k_rope[order]]).float(),
        "kv_a_layernorm.weight": torch.full((rank,), math.sqrt(NORM_EPS) / scale, dtype=torch.float32),
        "kv_b_proj.weight": kv_b.flatten(0, 1).float(),
        "o_proj.weight": w_o.float().clone(),
    }


def mla_attention_weights_with_biases(w_q, w_k, w_v, w_o, biases: dict[str, torch.Tensor], stats: LayerStats,
                                     geometry: GqaGeometry, inv_freq: torch.Tensor, rank: int, **options
                                     ) -> dict[str, torch.Tensor]:  # fmt: skip
    """`mla_attention_weights` for an attention whose projections have biases (module docstring, step 4): `biases`
    maps "q_proj", "k_proj", "v_proj", "o_proj" to theirs (a missing one is zero). The result also holds q_a_proj,
    kv_a_proj_with_mqa and o_proj biases, and q_a_proj / q_a_layernorm / q_b_proj are of rank d + 1."""
    hidden, heads, head_dim = w_q.shape[1], geometry.heads, geometry.head_dim

    def bias(name: str, weight: torch.Tensor) -> torch.Tensor:
        found = biases.get(name)
        return weight.new_zeros(weight.shape[0]) if found is None else found.to(weight.dtype)

    def affine(weight: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:  # [out, d] -> [out, d + 1]: on [x; 1]
        return torch.cat([weight, shift[:, None]], dim=1)

    group_of = torch.arange(heads) // geometry.group
    value_bias = bias("v_proj", w_v).view(geometry.kv_heads, head_dim)[group_of].flatten()  # [H * D]: each head's
    out_bias = bias("o_proj", w_o) + w_o @ value_bias
    mean = stats.x_mean.to(stats.x_moment.dtype)
    moment = torch.cat([torch.cat([stats.x_moment, mean[:, None]], 1), torch.cat([mean, mean.new_ones(1)])[None]])
    affine_stats = LayerStats(moment, stats.x_max_sq + 1.0, stats.distance, None)
    tensors = mla_attention_weights(affine(w_q, bias("q_proj", w_q)), affine(w_k, bias("k_proj", w_k)),
                                    affine(w_v, w_v.new_zeros(w_v.shape[0])), w_o, affine_stats,
                                    geometry, inv_freq, rank, **options)  # fmt: skip
    for name in ("q_a_proj", "kv_a_proj_with_mqa"):  # they read [x; 1]: the last column is their bias
        weight = tensors.pop(f"{name}.weight")
        tensors[f"{name}.weight"], tensors[f"{name}.bias"] = weight[:, :hidden].contiguous(), weight[:, hidden]
    tensors["o_proj.bias"] = out_bias.float()
    return tensors


__all__ = [
    "GqaGeometry",
    "LayerStats",
    "decouple_rope",
    "expected_rotation",
    "factor_latent",
    "latent_scale",
    "mla_attention_weights",
    "mla_attention_weights_with_biases",
    "rope_frequencies",
]
