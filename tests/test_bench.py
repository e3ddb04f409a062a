"""`mla-dsa bench` runs end to end in every shape a user can ask for (decode only, prefill only, bfloat16, batched,
no transformers rows), its correctness columns hold (speed is not asserted), its rooflines count what they claim
(checked against hand counts), and `--device cuda` without CUDA is one line, not a traceback."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import DeepseekV32Config

from mla_dsa import bench
from mla_dsa.cli import main

from subprocesses import own_stderr

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_bench(tmp_path, *options: str) -> dict:
    assert main(["bench", *options, "--out", str(tmp_path)]) == 0
    return json.loads((tmp_path / "results.json").read_text())


def test_bench_smoke(tmp_path):
    results = run_bench(tmp_path, "--contexts", "512", "--prefill", "--steps", "1")
    assert results["prefill_logit_max_abs_diff_600_tokens"] < 1e-3  # ours vs transformers, DSA active (k=256)
    (row,) = results["decode"]
    assert row["context"] == 512 and row["batch"] == 1 and row["logit_max_abs_diff"] < 1e-3
    assert row["ours_dsa_ms"] > 0 and row["ours_dense_mqa_ms"] > 0 and row["theirs_ms"] > 0
    assert row["ours_dsa_vs_roofline"] == pytest.approx(row["ours_dsa_ms"] / row["roofline_dsa_ms"])
    # the BLAS floor multiplies by every weight the roofline counts, bar the norms' few vectors
    gemv_bytes = row["weights_gemv_gb_s"] * row["weights_gemv_ms"] * 1e6
    assert 0.99 * results["decode_weight_bytes"] < gemv_bytes <= results["decode_weight_bytes"]
    assert results["cache_bytes_per_token_per_layer"] == {"fp32": 2816, "bf16": 1408}
    assert results["dtype"] == "float32" and results["device"] == "cpu" and results["preset"] == "small"
    assert results["device_name"] and results["bandwidth_gb_s"] > 0 and results["gemm_tflop_s"] > 0
    assert results["prefill"] == [] and (tmp_path / "decode.png").exists() == HAS_MATPLOTLIB
    assert not (tmp_path / "prefill.png").exists()  # no prefill rows: no prefill plot


@pytest.mark.slow  # a subprocess or a full script: over 6 s on 2 cores
def test_bench_prefill_only(tmp_path):
    """--no-decode used to crash in the plot (log scale of no data); with one layer and no transformers rows too."""
    results = run_bench(tmp_path, "--no-decode", "--prefill", "300", "--theirs-prefill-max", "0", "--layers", "1")
    assert results["decode"] == [] and results["config"]["num_hidden_layers"] == 1
    (row,) = results["prefill"]
    assert row["length"] == 300 and row["index_topk"] == 256 and "theirs" not in row
    assert row["ours"]["seconds"] > 0 and row["ours"]["peak_rss_gb"] > 0
    assert row["roofline_s"] == pytest.approx(row["flops"] / (results["gemm_tflop_s"] * 1e12))
    assert row["ours_vs_roofline"] == pytest.approx(row["ours"]["seconds"] / row["roofline_s"])
    assert not (tmp_path / "decode.png").exists()
    assert (tmp_path / "prefill.png").exists() == HAS_MATPLOTLIB


@pytest.mark.slow  # two implementations in bf16: 5-17 s on 2 cores
def test_bench_bfloat16_batched(tmp_path):
    results = run_bench(tmp_path, "--dtype", "bfloat16", "--contexts", "512", "--batch", "1", "2", "--prefill",
                        "--steps", "1")  # fmt: skip
    assert results["dtype"] == "bfloat16"
    # bf16: the two implementations pick a few different keys where index scores nearly tie, so the max difference
    # is a fraction of the logit scale (about 0.13 here) while the mean stays near bf16 rounding (about 0.003)
    scale = results["prefill_logit_max_abs_600_tokens"]
    assert results["prefill_logit_max_abs_diff_600_tokens"] < 0.3 * scale
    assert results["prefill_logit_mean_abs_diff_600_tokens"] < 0.01 * scale
    assert [row["batch"] for row in results["decode"]] == [1, 2]
    bandwidth = results["bandwidth_gb_s"] * 1e9
    for row in results["decode"]:
        assert row["logit_max_abs_diff"] < 0.1 * row["logit_max_abs"]
        # by hand, bf16 (2 bytes), 2 layers, context 512, k 256: the weights once, then per sequence and layer
        # DSA reads 512 indexer keys x 128 + 256 latent rows x 576, dense reads 512 latent rows x 576
        dsa, dense = 2 * (512 * 128 * 2 + 256 * 576 * 2), 2 * 512 * 576 * 2
        weights = results["decode_weight_bytes"]
        assert row["roofline_dsa_ms"] == pytest.approx(1000 * (weights + row["batch"] * dsa) / bandwidth)
        assert row["roofline_dense_ms"] == pytest.approx(1000 * (weights + row["batch"] * dense) / bandwidth)


def tiny_config() -> DeepseekV32Config:
    return DeepseekV32Config(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, index_n_heads=2, index_head_dim=16, index_topk=4, first_k_dense_replace=1,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32, n_group=1,
        topk_group=1,
    )  # fmt: skip


def test_prefill_flops_by_hand():
    """L = 10 tokens, k = 4; layer 0 dense MLP, layer 1 MoE; 2 FLOPs per multiply-add. Per layer:
    q_a 10x64x32, q_b 10x32x(2x24), kv_a 10x64x24, kv_b 10x16x(2x32), o_proj 10x32x64
        -> 2 x (20480 + 15360 + 15360 + 10240 + 20480) = 163840
    indexer: wq_b 10x32x32, wk 10x64x16, weights_proj 10x64x2 -> 2 x (10240 + 10240 + 1280) = 43520;
        55 causal pairs x 2 heads x (16 + 1) -> 2 x 1870 = 3740                                      -> 47260
    attention: keys read 1 + 2 + 3 + 4 x 7 = 34, x 2 heads x (24 + 16) -> 2 x 2720                  -> 5440
    MLP: dense 3 x 10x64x128 -> 491520; MoE router 10x64x4 -> 5120 and 3 experts (2 routed + 1 shared)
        x 3 x 10x64x32 -> 368640
    lm_head (the last position): 1x64x100 -> 12800"""
    per_layer = 163840 + 47260 + 5440
    expected = 2 * per_layer + 491520 + 5120 + 368640 + 12800
    assert expected == 1311160
    assert bench.prefill_flops(tiny_config(), length=10, k=4) == expected


def test_prefill_flops_dense_below_k():
    """L = 3 <= k = 4: every query reads all earlier keys, 1 + 2 + 3 = 6 of them (as the indexer's pairs)."""
    config = tiny_config()
    projections = 2 * 3 * (64 * 32 + 32 * 48 + 64 * 24 + 16 * 64 + 32 * 64)
    indexer = 2 * 3 * (32 * 32 + 64 * 16 + 64 * 2) + 2 * 6 * 2 * (16 + 1)
    attention = 2 * 6 * 2 * (24 + 16)
    mlps = 2 * 3 * 3 * 64 * 128 + 2 * 3 * 64 * 4 + 3 * 2 * 3 * 3 * 64 * 32
    assert bench.prefill_flops(config, length=3, k=4) == 2 * (projections + indexer + attention) + mlps + 2 * 64 * 100


def test_v32_attention_preset_is_deepseek_v32_attention():
    """The preset's attention and indexer are DeepSeek-V3.2's (transformers' DeepseekV32Config defaults are V3.2's),
    every layer has a dense MLP, and two layers stay modest (built on the meta device: no memory)."""
    preset = bench.PRESETS["v32-attention"]
    ours, v32 = DeepseekV32Config(**preset.config), DeepseekV32Config()
    for name in ("hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
                 "qk_nope_head_dim", "v_head_dim", "index_n_heads", "index_head_dim", "index_topk"):  # fmt: skip
        assert getattr(ours, name) == getattr(v32, name), name
    assert ours.mlp_layer_types == ["dense", "dense"]
    assert bench.topk_for(4096, preset) == bench.topk_for(65536, preset) == 2048
    from transformers import DeepseekV32ForCausalLM

    with torch.device("meta"):
        parameters = sum(p.numel() for p in DeepseekV32ForCausalLM(ours).parameters())
    assert 0.5e9 < parameters < 0.6e9


def test_plots_draw_only_what_exists(tmp_path):
    results = {"decode": [], "prefill": [], "device": "cpu", "device_name": "x", "threads": 2, "preset": "small",
               "dtype": "float32", "config": {"num_hidden_layers": 2}}  # fmt: skip
    assert not bench.plot_decode(results, tmp_path / "d.png") and not bench.plot_prefill(results, tmp_path / "p.png")
    assert list(tmp_path.iterdir()) == []
    pytest.importorskip("matplotlib")
    # a decode row without transformers columns, and a prefill row whose run failed
    results["decode"] = [dict(context=512, batch=1, ours_dsa_ms=1.0, ours_dense_mqa_ms=2.0, roofline_dsa_ms=0.5,
                              roofline_dense_ms=0.6)]  # fmt: skip
    results["prefill"] = [dict(length=300, roofline_s=0.1, ours={"error": "out of memory"})]
    assert bench.plot_decode(results, tmp_path / "d.png") and bench.plot_prefill(results, tmp_path / "p.png")
    assert (tmp_path / "d.png").stat().st_size > 0 and (tmp_path / "p.png").stat().st_size > 0


def test_cuda_without_cuda_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--device", "cuda", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("mla-dsa bench: error: --device cuda") and "--device cpu" in line
    assert not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.slow  # a subprocess or a full script: over 6 s on 2 cores
def test_cuda_without_cuda_from_the_shell(tmp_path):
    """The same from the command line, with no traceback (CUDA hidden, so this holds on a GPU machine too)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "mla_dsa", "bench", "--device", "cuda", "--out", str(tmp_path)],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    stderr = own_stderr(result.stderr).strip()  # less other packages' import-time logs
    assert stderr.splitlines() == [stderr] and "no CUDA device" in stderr


@pytest.mark.parametrize(("seconds_per_call", "measured_size"), [(1e-4, 2048), (0.2, 256)])
def test_gemm_throughput_grows_the_matmul_only_while_it_is_fast(monkeypatch, seconds_per_call, measured_size):
    """The prefill roofline's matmul: 2048^3 on CPU where the dtype runs fast, but a dtype without instructions here
    (bf16 on an AVX2-only CPU, about 1 GFLOP/s) stops at the first size whose call takes over 50 ms, so a bf16 bench
    does not spend minutes measuring."""
    sizes = []

    def timed(work, device, repeats):
        sizes.append(work().shape[0])
        return seconds_per_call

    monkeypatch.setattr(bench, "best_seconds", timed)
    flops = bench.measure_gemm_flops(torch.device("cpu"), torch.float32)
    assert sizes[-1] == measured_size and sizes == [256 * 2**i for i in range(len(sizes))]
    assert flops == pytest.approx(2 * measured_size**3 / seconds_per_call)


@pytest.mark.compat
def test_their_cache_decodes_like_ours_in_float32(tmp_path):
    """The bench fills transformers' cache by hand in the layout the running release's DeepseekV32 reads: the
    latent (5.25) or per-head keys and values expanded through kv_b_proj (5.17; filling those with the latent made
    DeepseekV32 attend to garbage, and passing the cache as `cache=`, a name 5.17 ignores, made it decode with none:
    the first GPU runs' 'transformers' figures). One decode step over the same random cache, DSA active, float32:
    the same logits as ours."""
    config = dict(bench.BENCH_CONFIG, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
                  kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, index_n_heads=4,
                  index_head_dim=16, intermediate_size=64, vocab_size=128)  # fmt: skip
    directory = bench.build_model(tmp_path / "model", config)
    theirs, ours = bench.load_models(directory, torch.device("cpu"), torch.float32)
    context, k = 48, 16
    bench.set_their_topk(theirs, k)
    contents = bench.random_cache_contents(context, config)
    _, mine = bench.time_decode(ours, bench.our_cache(ours, contents, 2), context, 1, 2, index_topk=k)
    _, their = bench.time_decode(theirs, bench.their_cache(theirs, contents, 2), context, 1, 2)
    torch.testing.assert_close(mine, their, rtol=0, atol=1e-4)
