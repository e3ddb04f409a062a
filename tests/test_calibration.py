"""`--indexer-init calibrate` (issue #18): each grafted indexer is fitted to its layer's attention on calibration
text before it is written. The per-layer dense pass it fits on equals transformers' own model; on the embedded model's
held-out text the calibrated indexer is good before any training; resume, sharing and the errors behave as the rest
of the converter."""

import json

import pytest
import torch
from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

import mla_dsa
import mla_dsa.conversion.calibrate as calibrate
import mla_dsa.conversion.write as write
from mla_dsa.cli import main
from mla_dsa.conversion.calibrate import CalibrationOptions, calibration_windows, dense_layer_passes
from mla_dsa.conversion.plan import ConvertOptions, target_config
from mla_dsa.conversion.source import ConversionError, SourceCheckpoint
from mla_dsa.data import byte_tokenizer, fixed_windows, read_corpus, stdlib_files
from mla_dsa.default_model import ASSET_DIR
from mla_dsa.training import evaluate_indexer

from checkpoints import file_bytes
from peers import save_peer

SEQ_LEN = 64
CALIBRATION = dict(calibration_tokens=4 * SEQ_LEN, calibration_seq_len=SEQ_LEN, calibration_steps=5)


@pytest.fixture(scope="module")
def data_files() -> list[str]:
    return [str(p) for p in stdlib_files("train")[:3]]


@pytest.fixture(scope="module")
def byte_peers(tmp_path_factory) -> dict:
    """Byte-level tiny peers written by transformers, with the byte tokenizer the calibration text goes through."""
    peers = {}
    for model_type, overrides in (("deepseek_v3", {"num_hidden_layers": 4}), ("deepseek_v2", {})):
        directory = tmp_path_factory.mktemp(model_type)
        peers[model_type] = (save_peer(model_type, directory, vocab_size=256, **overrides), directory)
        byte_tokenizer().save_pretrained(directory)
    return peers


@pytest.mark.parametrize("model_type", ["deepseek_v3", "deepseek_v2"])
def test_layer_passes_equal_transformers_model(byte_peers, data_files, model_type):
    """The fit's inputs and targets are SRC's own computation: layer by layer (experts streamed one at a time), the
    head-summed attention and each layer's output equal transformers' model run whole, eager, in float32."""
    peer, directory = byte_peers[model_type]
    source = SourceCheckpoint(directory)
    config = target_config(source, ConvertOptions())
    windows = calibration_windows(source, config, CalibrationOptions(data_files, tokens=2 * SEQ_LEN, seq_len=SEQ_LEN))
    assert windows.shape == (2, SEQ_LEN)
    model_class = DeepseekV3ForCausalLM if model_type == "deepseek_v3" else DeepseekV2ForCausalLM
    reference = model_class.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        expected = reference(windows, output_attentions=True, output_hidden_states=True)
    passes = list(dense_layer_passes(source, config, windows))
    assert [p.layer for p in passes] == list(range(config.num_hidden_layers))
    for layer_pass in passes[:-1]:  # transformers' last hidden state is after the final norm
        torch.testing.assert_close(layer_pass.output, expected.hidden_states[layer_pass.layer + 1], atol=1e-5, rtol=0)
    for layer_pass in passes:
        torch.testing.assert_close(layer_pass.attention, expected.attentions[layer_pass.layer].mean(1), atol=1e-6,
                                   rtol=0)  # fmt: skip
        assert layer_pass.query_latent.shape[-1] == (config.q_lora_rank or config.hidden_size)


@pytest.mark.slow
def test_calibrated_indexer_is_good_before_training(tmp_path):
    """Issue #18's bar in small: on held-out text of the embedded model, at k = L/8 with every layer sparse, the
    calibrated indexer reaches recall >= 0.75 and sparse/dense <= 1.05, where `svd` alone stays near random."""
    seq_len = 256
    files = [str(p) for p in stdlib_files("train")[:20]]
    windows = fixed_windows(read_corpus(stdlib_files("held_out")), 8, seq_len)
    fit = dict(calibration_data=files, calibration_tokens=2048, calibration_seq_len=seq_len, calibration_steps=40)
    results = {}
    for init, extra in (("svd", {}), ("calibrate", fit)):
        out = mla_dsa.convert_checkpoint(ASSET_DIR, tmp_path / init, indexer_init=init, index_topk=seq_len // 8,
                                         progress=False, **extra)  # fmt: skip
        results[init] = evaluate_indexer(mla_dsa.MlaDsaForCausalLM.from_pretrained(out), windows)
    assert results["svd"]["recall"] < 0.5 and results["svd"]["loss_ratio"] > 1.5, results
    assert results["calibrate"]["recall"] >= 0.75, results
    assert results["calibrate"]["loss_ratio"] <= 1.05, results
    report = json.loads((tmp_path / "calibrate" / "indexer_calibration.json").read_text())
    assert report["tokens"] == 2048 and report["windows"] == 8
    for layer in report["layers"].values():
        assert layer["kl_after"] < layer["kl_before"] / 4, report


def test_fit_lowers_each_layers_kl_and_writes_the_fitted_tensors(byte_peers, data_files, tmp_path):
    _, directory = byte_peers["deepseek_v3"]
    out = mla_dsa.convert_checkpoint(directory, tmp_path / "dsa", indexer_init="calibrate",
                                     calibration_data=data_files, progress=False, **CALIBRATION)  # fmt: skip
    svd = mla_dsa.convert_checkpoint(directory, tmp_path / "svd", indexer_init="svd", progress=False)
    report = json.loads((out / "indexer_calibration.json").read_text())
    assert sorted(report["layers"]) == ["0", "1", "2", "3"]
    assert all(layer["kl_after"] < layer["kl_before"] for layer in report["layers"].values()), report
    weights = mla_dsa.MlaDsaForCausalLM.from_pretrained(out).state_dict()
    initial = mla_dsa.MlaDsaForCausalLM.from_pretrained(svd).state_dict()  # the fit's starting point
    for name in weights:
        changed = not torch.equal(weights[name], initial[name])
        if ".indexer." not in name:
            assert not changed, name  # every other tensor is SRC's
        elif name.endswith(("wq_b.weight", "wk.weight", "weights_proj.weight")):
            assert changed, name
    assert not any(p.name.startswith(".mla-dsa") for p in out.iterdir())  # the kept fit is removed with the state


def test_the_fit_scores_each_query_block_against_the_keys_before_its_end(byte_peers, data_files, tmp_path,
                                                                         monkeypatch):  # fmt: skip
    """The calibration windows are causal: the fit scores a block of queries against the keys before the block's end
    (blocks of a quarter of the window: 5/8 of the products of scoring every key), with the KLs of scoring them all."""
    import mla_dsa.conversion.calibrate as calibrate
    from mla_dsa import indexer_loss

    widths = []
    original = indexer_loss.differentiable_index_scores

    def recording(queries, weights, keys, softmax_scale):
        widths.append((queries.shape[1], keys.shape[1]))
        return original(queries, weights, keys, softmax_scale)

    monkeypatch.setattr(indexer_loss, "differentiable_index_scores", recording)
    _, directory = byte_peers["deepseek_v3"]
    reports = []
    for blocks in (calibrate._FIT_CAUSAL_BLOCKS, 1):
        monkeypatch.setattr(calibrate, "_FIT_CAUSAL_BLOCKS", blocks)
        widths.clear()
        out = mla_dsa.convert_checkpoint(directory, tmp_path / f"blocks-{blocks}", indexer_init="calibrate",
                                         calibration_data=data_files, progress=False, **CALIBRATION)  # fmt: skip
        reports.append(json.loads((out / "indexer_calibration.json").read_text())["layers"])
        block = SEQ_LEN // blocks
        assert set(widths) == {(block, end) for end in range(block, SEQ_LEN + 1, block)}, (blocks, sorted(set(widths)))
    assert reports[0].keys() == reports[1].keys()
    for layer, report in reports[0].items():  # after 5 Adam steps on sums taken in another order: rounding, grown
        assert report["kl_before"] == pytest.approx(reports[1][layer]["kl_before"], rel=1e-5), layer
        assert report["kl_after"] == pytest.approx(reports[1][layer]["kl_after"], rel=1e-3), layer


def test_shared_layers_fit_their_source_indexer_to_every_layer_it_serves(byte_peers, data_files, tmp_path):
    """With --index-share 2 (GLM's rule on 4 layers: F F S F), layer 1's indexer is fitted to layers 1 and 2's
    attention: it differs from the fit to layer 1 alone, and layer 2 has no indexer to write."""
    _, directory = byte_peers["deepseek_v3"]
    shared = mla_dsa.convert_checkpoint(directory, tmp_path / "shared", indexer_init="calibrate", index_share=2,
                                        calibration_data=data_files, progress=False, **CALIBRATION)  # fmt: skip
    alone = mla_dsa.convert_checkpoint(directory, tmp_path / "alone", indexer_init="calibrate",
                                       calibration_data=data_files, progress=False, **CALIBRATION)  # fmt: skip
    report = json.loads((shared / "indexer_calibration.json").read_text())
    assert {layer: r["shared_layers"] for layer, r in report["layers"].items()} == {"0": 0, "1": 1, "3": 0}
    fitted = mla_dsa.MlaDsaForCausalLM.from_pretrained(shared).state_dict()
    single = mla_dsa.MlaDsaForCausalLM.from_pretrained(alone).state_dict()
    assert not any(name.startswith("model.layers.2.self_attn.indexer.") for name in fitted)
    for layer, same in ((0, True), (1, False), (3, True)):  # the same data and steps: only the target differs
        name = f"model.layers.{layer}.self_attn.indexer.wq_b.weight"
        assert torch.equal(fitted[name], single[name]) == same, name


def test_resume_reuses_the_fit_and_gives_the_same_bytes(byte_peers, data_files, tmp_path, monkeypatch):
    _, directory = byte_peers["deepseek_v3"]
    options = dict(indexer_init="calibrate", calibration_data=data_files, progress=False, max_shard_size="40KB",
                   **CALIBRATION)  # fmt: skip
    whole = mla_dsa.convert_checkpoint(directory, tmp_path / "whole", **options)
    saved, calls = write.save_file, []

    def fail_on_second_shard(tensors, path, **kwargs):
        if write.CALIBRATED_NAME not in path:  # each fitted layer's file is saved this way too
            calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return saved(tensors, path, **kwargs)

    monkeypatch.setattr(write, "save_file", fail_on_second_shard)
    with pytest.raises(ConversionError, match="--resume"):
        mla_dsa.convert_checkpoint(directory, tmp_path / "resumed", **options)
    monkeypatch.setattr(write, "save_file", saved)

    def no_second_fit(*args, **kwargs):
        raise AssertionError("--resume fitted the indexers again")

    monkeypatch.setattr(write, "calibrate_indexers", no_second_fit)
    resumed = mla_dsa.convert_checkpoint(directory, tmp_path / "resumed", resume=True, **options)
    assert file_bytes(resumed) == file_bytes(whole)


def test_resume_fits_only_the_layers_an_interrupted_fit_had_not_finished(byte_peers, data_files, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """Each layer's fit is kept as it ends: a conversion stopped inside the fit (the most of its time) and resumed
    fits the remaining layers only, and writes the bytes of an uninterrupted one."""
    _, directory = byte_peers["deepseek_v3"]
    options = dict(indexer_init="calibrate", calibration_data=data_files, progress=False, **CALIBRATION)
    whole = mla_dsa.convert_checkpoint(directory, tmp_path / "whole", **options)
    fit, fitted = calibrate._Pending.fit, []

    def stopped_at_the_third_fit(self, *args, **kwargs):
        fitted.append(self.layer)
        if len(fitted) == 3:
            raise KeyboardInterrupt
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(calibrate._Pending, "fit", stopped_at_the_third_fit)
    with pytest.raises(KeyboardInterrupt):
        mla_dsa.convert_checkpoint(directory, tmp_path / "resumed", **options)
    assert fitted == [0, 1, 2]
    fitted.clear()

    def counted(self, *args, **kwargs):
        fitted.append(self.layer)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(calibrate._Pending, "fit", counted)
    resumed = mla_dsa.convert_checkpoint(directory, tmp_path / "resumed", resume=True, **options)
    assert fitted == [2, 3]
    assert file_bytes(resumed) == file_bytes(whole)


def test_errors_name_the_problem(byte_peers, data_files, tmp_path):
    _, directory = byte_peers["deepseek_v3"]
    with pytest.raises(ConversionError, match="calibrate needs --calibration-data"):
        mla_dsa.convert_checkpoint(directory, tmp_path / "a", indexer_init="calibrate", progress=False)
    with pytest.raises(ConversionError, match="only with --indexer-init calibrate"):
        mla_dsa.convert_checkpoint(directory, tmp_path / "b", calibration_data=data_files, progress=False)
    with pytest.raises(ConversionError, match="calibration data file not found"):
        mla_dsa.convert_checkpoint(directory, tmp_path / "c", indexer_init="calibrate",
                                   calibration_data=[str(tmp_path / "missing.py")], progress=False)  # fmt: skip
    short = tmp_path / "short.py"
    short.write_text("x = 1\n")
    with pytest.raises(ConversionError, match="has 7 tokens, fewer than one window"):
        mla_dsa.convert_checkpoint(directory, tmp_path / "d", indexer_init="calibrate",
                                   calibration_data=[str(short)], progress=False, **CALIBRATION)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.py"]  # the refusals left nothing behind


def test_refused_without_a_tokenizer_or_with_nothing_to_fit(data_files, tmp_path):
    bare = tmp_path / "bare"
    save_peer("deepseek_v3", bare, vocab_size=256)
    with pytest.raises(ConversionError, match="calibrate reads the text with this checkpoint's tokenizer"):
        mla_dsa.convert_checkpoint(bare, tmp_path / "a", indexer_init="calibrate", calibration_data=data_files,
                                   progress=False, **CALIBRATION)  # fmt: skip
    v32 = tmp_path / "v32"
    save_peer("deepseek_v32", v32, vocab_size=256)
    with pytest.raises(ConversionError, match="--indexer-init calibrate makes only the indexers a conversion grafts"):
        mla_dsa.convert_checkpoint(v32, tmp_path / "b", indexer_init="calibrate", calibration_data=data_files,
                                   progress=False)  # fmt: skip
    with pytest.raises(ConversionError, match="--indexer-init svd makes only the indexers"):  # it had been ignored
        mla_dsa.convert_checkpoint(v32, tmp_path / "c", indexer_init="svd", progress=False)


def test_cli_reports_the_fit(byte_peers, data_files, tmp_path, capsys):
    _, directory = byte_peers["deepseek_v3"]
    code = main(["convert", str(directory), str(tmp_path / "dsa"), "--indexer-init", "calibrate",
                 "--calibration-data", *data_files, "--calibration-tokens", str(4 * SEQ_LEN),
                 "--calibration-seq-len", str(SEQ_LEN), "--calibration-steps", "5", "--no-progress"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert f"calibrated 4 indexers on {4 * SEQ_LEN} tokens" in printed and "KL to the attention" in printed
    assert main(["convert", str(directory), str(tmp_path / "x"), "--indexer-init", "calibrate", "--no-progress"]) != 0
    assert "--calibration-data" in capsys.readouterr().err


def test_the_calibration_bar_counts_the_fits_too(tmp_path, monkeypatch):
    """The bar counts fit steps as well as dense layer passes: it reached 100 % after the last pass, while the last
    layer's fit (minutes on a large model) ran with nothing shown; now it ends exactly when the last fit does."""
    import tqdm.auto

    from mla_dsa.conversion import calibrate

    bars = []

    class Recorded(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(calibrate, "tqdm", Recorded)
    data = tmp_path / "data.py"
    data.write_text("\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(400)))
    mla_dsa.convert_checkpoint(ASSET_DIR, tmp_path / "out", indexer_init="calibrate", calibration_data=[str(data)],
                               calibration_steps=3, calibration_tokens=512, calibration_seq_len=128,
                               progress=True)  # fmt: skip
    (bar,) = [bar for bar in bars if bar.desc.startswith("calibrating")]
    layers = json.loads((ASSET_DIR / "config.json").read_text())["num_hidden_layers"]
    assert bar.total == layers + layers * 3 and bar.n == bar.total
