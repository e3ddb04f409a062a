"""Initial weights of the lightning indexer grafted onto a dense MLA layer.

- `random`: as the DeepSeek-V3.2 paper (and transformers' init): normal(0, initializer_range) projections,
  LayerNorm at identity.
- `svd`: derived from the layer's own attention, so index scores start correlated with the head-summed attention
  logits. Main head h scores key s from query t with

      q_nope,h . k_nope,h  +  q_rope,h . k_R    =  c_Q^T M_h h_s  +  (W_QR,h c_Q) . (W_KR h_s)

  where M_h = W_UQ,h^T W_UK,h diag(g) W_DKV maps the key's hidden state through the latent. The indexer has one key
  head shared by its query heads, so its key basis V (D x Dn) is the top eigenspace of sum_h M_h^T M_h (computed in the
  rank-R latent space, never D x D), its key is k = [W_KR ; V^T] h, and query head j (a group of main heads) is
  [sum_h W_QR,h ; sum_h (M_h V)^T] c_Q. The rope rows are permuted from the main attention's interleaved pairs to the
  indexer's half-split pairs, so both rotate by the same angles. `weights_proj` stays random (it has no bias, so no
  data-free choice makes the head weights positive); the LayerNorm and ReLU are approximated away.
- `calibrate`: `svd`, then fitted to the layer's attention on calibration text (`calibrate.py`).
"""

import torch

INDEXER_INITS = ("random", "svd", "calibrate")
_DATA_FREE_INITS = ("random", "svd")


def init_indexer(config, layer_idx: int, method: str, seed: int, read) -> dict[str, torch.Tensor]:
    """Float32 tensors for `model.layers.{layer_idx}.self_attn.indexer.*`, named by their suffix.

    `read(name)` returns one source tensor (dequantized) by its full checkpoint name; `config` is the target
    MlaDsaConfig. Deterministic in (seed, layer_idx)."""
    if method not in _DATA_FREE_INITS:
        raise ValueError(f"indexer init must be one of {_DATA_FREE_INITS} (calibrate: calibrate.py), got {method!r}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer_idx)
    tensors = _random_indexer(config, generator)
    if method == "svd":
        prefix = f"model.layers.{layer_idx}.self_attn."
        tensors.update(_svd_indexer(config, lambda name: read(prefix + name).double()))
    return tensors


def _random_indexer(config, generator: torch.Generator) -> dict[str, torch.Tensor]:
    n_heads, head_dim, hidden = config.index_n_heads, config.index_head_dim, config.hidden_size
    query_input = config.q_lora_rank or hidden
    std = config.initializer_range

    def normal(*shape):
        return torch.randn(*shape, generator=generator) * std

    return {
        "wq_b.weight": normal(n_heads * head_dim, query_input),
        "wk.weight": normal(head_dim, hidden),
        "k_norm.weight": torch.ones(head_dim),
        "k_norm.bias": torch.zeros(head_dim),
        "weights_proj.weight": normal(n_heads, hidden),
    }


def _svd_indexer(config, read) -> dict[str, torch.Tensor]:
    heads, nope, rope = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim
    rank, value_dim = config.kv_lora_rank, config.v_head_dim
    n_index_heads, index_dim = config.index_n_heads, config.index_head_dim

    q_weight = read("q_b_proj.weight" if config.q_lora_rank else "q_proj.weight")  # [H * (dn + dr), Qin]
    q_weight = q_weight.view(heads, nope + rope, -1)
    w_uq, w_qr = q_weight[:, :nope], q_weight[:, nope:]  # [H, dn, Qin], [H, dr, Qin]
    kv_a = read("kv_a_proj_with_mqa.weight")  # [R + dr, D]
    latent_down = read("kv_a_layernorm.weight")[:, None] * kv_a[:rank]  # diag(g) W_DKV: [R, D]
    w_kr = kv_a[rank:]  # [dr, D]
    w_uk = read("kv_b_proj.weight").view(heads, nope + value_dim, rank)[:, :nope]  # [H, dn, R]

    absorbed = torch.einsum("hnq,hnr->hqr", w_uq, w_uk)  # A_h = W_UQ,h^T W_UK,h: [H, Qin, R]
    latent_gram = torch.einsum("hqr,hqs->rs", absorbed, absorbed)  # sum_h A_h^T A_h: [R, R]
    basis, triangle = torch.linalg.qr(latent_down.T)  # latent_down^T = basis @ triangle: [D, R], [R, R]
    eigvals, eigvecs = torch.linalg.eigh(triangle @ latent_gram @ triangle.T)
    key_dims = min(index_dim - rope, rank)
    top = eigvecs[:, eigvals.argsort(descending=True)[:key_dims]]
    key_basis = _fix_signs(basis @ top)  # V: [D, key_dims]

    perm = _rope_permutation(rope, config.rope_interleave)
    groups = _head_groups(heads, n_index_heads)
    projected = absorbed @ (latent_down @ key_basis)  # M_h V: [H, Qin, key_dims]
    wq_b = torch.zeros(n_index_heads, index_dim, q_weight.shape[-1], dtype=torch.float64)
    for index_head, group in enumerate(groups):
        wq_b[index_head, :rope] = w_qr[group][:, perm].sum(0)
        wq_b[index_head, rope : rope + key_dims] = projected[group].sum(0).T
    wk = torch.zeros(index_dim, kv_a.shape[-1], dtype=torch.float64)
    wk[:rope] = w_kr[perm]
    wk[rope : rope + key_dims] = key_basis.T
    return {"wq_b.weight": wq_b.reshape(n_index_heads * index_dim, -1).float(), "wk.weight": wk.float()}


def _rope_permutation(rope_dim: int, interleaved: bool) -> torch.Tensor:
    """Main-attention rope dims reordered into the indexer's half-split layout (pairs 2i,2i+1 -> i,i+d/2)."""
    if not interleaved:
        return torch.arange(rope_dim)
    return torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)])


def _head_groups(heads: int, index_heads: int) -> list[torch.Tensor]:
    """Main heads each indexer head stands for: contiguous groups, or one (cycled) head when there are fewer."""
    if index_heads <= heads:
        return list(torch.arange(heads).tensor_split(index_heads))
    return [torch.tensor([j % heads]) for j in range(index_heads)]


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Eigenvectors are defined up to sign: make each column's largest entry positive, for determinism."""
    pivots = vectors.abs().argmax(dim=0)
    signs = vectors[pivots, torch.arange(vectors.shape[1])].sign()
    return vectors * torch.where(signs == 0, 1.0, signs)


__all__ = ["INDEXER_INITS", "init_indexer"]
