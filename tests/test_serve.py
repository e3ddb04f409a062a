"""`mla-dsa serve`: transformers' own OpenAI-compatible server with our model behind it. The loader (the one place that
differs from `transformers serve`) loads our checkpoints and the DeepSeek-V3.2 and GLM-5 exports into our model with
the server's settings; a live server on a local port answers chat and completion requests, several at once and
streamed, with what `generate()` gives on the same prompt, and answers bad requests with HTTP errors, staying up."""

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import mla_dsa
from mla_dsa import MlaDsaForCausalLM
from mla_dsa.cli import main as cli
from mla_dsa.default_model import ASSET_DIR

serving = pytest.importorskip("mla_dsa.serve")
if serving.ModelLoader is None:
    pytest.skip("transformers' serving stack (5.25+) is not installed", allow_module_level=True)
httpx = pytest.importorskip("httpx")

# Plain turns, one per line, the assistant's after "A:": enough to route chat requests through a template.
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'][0] | upper }}: {{ m['content'] }}\n{% endfor %}" \
                "{% if add_generation_prompt %}A: {% endif %}"  # fmt: skip
PROMPTS = ["def merge(left, right):\n    ", "class Queue:\n    def __init__(self):\n        ", "import os\n\n\ndef "]
NEW_TOKENS = 12
MAX_MODEL_LEN = 256  # the server's (`--max-model-len`): the model's context is 4,096


@pytest.fixture(scope="module")
def served_checkpoint(tmp_path_factory) -> Path:
    """The embedded Python model as DSA (top-16 of its keys, so prompts past 16 tokens decode sparsely), with a chat
    template."""
    out = mla_dsa.convert_checkpoint(ASSET_DIR, tmp_path_factory.mktemp("serve") / "dsa", index_topk=16,
                                     progress=False)  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    return Path(out)


def _greedy(model, tokenizer, input_ids: torch.Tensor) -> str:
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)


def _completion_ids(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, return_tensors="pt").input_ids  # as the server's completion handler tokenizes


def _chat_ids(tokenizer, messages: list[dict]) -> torch.Tensor:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True).input_ids  # fmt: skip


def test_the_server_loader_loads_ours_and_the_exports_into_our_model_with_the_servers_settings(
    served_checkpoint, tmp_path
):
    exports = [mla_dsa.convert_checkpoint(served_checkpoint, tmp_path / export, export=export, progress=False)
               for export in ("deepseek_v32", "glm_moe_dsa")]  # fmt: skip
    tokenizer = AutoTokenizer.from_pretrained(served_checkpoint)
    ids = _completion_ids(tokenizer, PROMPTS[0] * 2)
    settings = {"index_topk": 8, "latent_cache_dtype": "fp8"}
    loader = serving.MlaDsaModelLoader.from_loader(serving.ModelLoader(device="cpu"), settings)
    reference = mla_dsa.load_checkpoint(served_checkpoint, **settings).eval()
    for checkpoint in (served_checkpoint, *exports):
        config, _ = loader.load_config(str(checkpoint))
        model = loader._load_model(str(checkpoint))
        assert type(model) is MlaDsaForCausalLM and config.index_topk == model.config.index_topk == 8
        assert model.config.latent_cache_dtype == "fp8" and not model.training
        assert _greedy(model, tokenizer, ids) == _greedy(reference, tokenizer, ids)
    untouched = mla_dsa.load_checkpoint(served_checkpoint)
    assert untouched.config.index_topk == 16  # the settings are the server's, not the checkpoint's


def test_the_server_loader_runs_large_float32_layers_on_onednn(served_checkpoint, monkeypatch):
    """`mla-dsa serve` applies `use_onednn_linear` (with its rule by the thread count, set to every layer here so that
    the test does not depend on the machine's cores)."""
    from mla_dsa import cpu_linear

    if not cpu_linear.onednn_available():
        pytest.skip("this PyTorch has no oneDNN")
    monkeypatch.setattr(cpu_linear.use_onednn_linear, "__defaults__", (0,))
    loader = serving.MlaDsaModelLoader.from_loader(serving.ModelLoader(device="cpu"), {})
    model = loader._load_model(str(served_checkpoint))
    linears = [module for module in model.modules() if type(module) is torch.nn.Linear]
    assert linears and all("forward" in vars(module) for module in linears)  # each forward replaced on the instance


def test_the_server_loader_says_when_bfloat16_is_slow_on_this_cpu(served_checkpoint, monkeypatch, caplog):
    """On a CPU without bf16 matrix instructions (AVX2) PyTorch's bf16 product is a slow reference loop: a bf16
    server says to serve in float32 instead."""
    monkeypatch.setattr(serving, "cpu_has_bf16_matmul", lambda: False)  # as on an AVX2 CPU
    for dtype, warned in (("bfloat16", True), ("float32", False)):
        caplog.clear()
        loader = serving.MlaDsaModelLoader.from_loader(serving.ModelLoader(device="cpu", dtype=dtype), {})
        with caplog.at_level(logging.WARNING, logger="mla_dsa.serve"):
            model = loader._load_model(str(served_checkpoint))
        assert model.dtype == getattr(torch, dtype)
        assert ("--dtype float32" in caplog.text) == warned, caplog.text


def test_serve_refuses_what_it_cannot_serve_in_one_line(served_checkpoint, tmp_path, capsys):
    assert cli(["serve", str(tmp_path / "nothing-here")]) == 1
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: a top-k of 0
        cli(["serve", str(served_checkpoint), "--index-topk", "0"])
    capsys.readouterr()
    with pytest.raises(ValueError, match="cannot set"):
        serving.serve(str(served_checkpoint), {"num_hidden_layers": 1})


def test_requests_for_what_transformers_would_drop_or_misuse_are_refused_with_the_reason():
    fine = {"prompt": "x", "n": 1, "echo": False, "top_p": 0.9, "stop": ["\n"], "response_format": {"type": "text"},
            "presence_penalty": 0}  # fmt: skip
    assert serving.request_value_problem(fine) is None
    refused = [{"n": 2}, {"best_of": 3}, {"echo": True}, {"logprobs": 2}, {"top_logprobs": 1}, {"top_p": 3},
               {"top_p": True}, {"frequency_penalty": -3}, {"presence_penalty": 0.5}, {"stop": 5}, {"stop": ["a", 1]},
               {"response_format": {"type": "json_object"}}]  # fmt: skip
    for body in refused:
        name = next(iter(body))
        assert f"`{name}" in serving.request_value_problem(body), body


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served_export(served_checkpoint, tmp_path_factory) -> Path:
    """The checkpoint in DeepSeek-V3.2's format (`--export deepseek_v32`): the same model, which the server loads into
    ours."""
    return mla_dsa.convert_checkpoint(served_checkpoint, tmp_path_factory.mktemp("serve") / "export",
                                      export="deepseek_v32", progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def server(served_export, tmp_path_factory):
    """`mla-dsa serve` (the console script, as users start it) in a process of its own on a free local port, stopped
    (with its model process) at the end. It serves the DeepSeek-V3.2 export of the checkpoint, the same model: under
    the console script the model process (spawned with the server's argv) had registered nothing, and an export did
    not load there."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    script = shutil.which("mla-dsa", path=str(Path(sys.executable).parent)) or shutil.which("mla-dsa")
    command = [script, "serve", str(served_export), "--port", str(port), "--device", "cpu", "--log-level", "warning",
               "--max-model-len", str(MAX_MODEL_LEN)]  # fmt: skip
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://localhost:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server stopped: {log.read_text()[-2000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        raise AssertionError(f"no answer in 180 s: {log.read_text()[-2000:]}")
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _post(url: str, path: str, body: dict | str) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers={"content-type": "application/json"}, timeout=120)


def _streamed_text(url: str, body: dict) -> str:
    text = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.extend(choice.get("text", "") for choice in json.loads(line[6:])["choices"])
    return "".join(text)


@pytest.mark.slow
def test_serve_answers_concurrent_chat_and_completion_requests_as_generate_does(server, served_checkpoint,
                                                                              served_export):  # fmt: skip
    model, tokenizer = (
        mla_dsa.load_checkpoint(served_checkpoint).eval(),
        AutoTokenizer.from_pretrained(served_checkpoint),
    )
    messages = [{"role": "user", "content": "Write a function that merges two sorted lists."}]
    expected_chat = _greedy(model, tokenizer, _chat_ids(tokenizer, messages))
    expected = [_greedy(model, tokenizer, _completion_ids(tokenizer, prompt)) for prompt in PROMPTS]
    assert all(len(_completion_ids(tokenizer, prompt)[0]) + NEW_TOKENS > 16 for prompt in PROMPTS)  # sparse decode

    greedy = {"max_tokens": NEW_TOKENS, "temperature": 0}
    with ThreadPoolExecutor(max_workers=6) as pool:  # all at once: the server queues them
        completions = [
            pool.submit(_post, server, "/v1/completions", {"prompt": prompt, **greedy}) for prompt in PROMPTS
        ]
        chat = pool.submit(_post, server, "/v1/chat/completions", {"messages": messages, **greedy})
        streamed = pool.submit(_streamed_text, server, {"prompt": PROMPTS[0], **greedy})
        for future, want in zip(completions, expected, strict=True):
            response = future.result()
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["text"] == want
            assert response.json()["usage"]["completion_tokens"] <= NEW_TOKENS
        assert chat.result().status_code == 200, chat.result().text
        assert chat.result().json()["choices"][0]["message"]["content"] == expected_chat
        assert streamed.result() == expected[0]
    listed = httpx.get(f"{server}/v1/models", timeout=10).json()["data"]
    assert str(served_export) in [entry["id"] for entry in listed]


@pytest.mark.slow
def test_serve_answers_bad_requests_with_http_errors_and_stays_up(server, served_checkpoint):
    bad = [
        ("/v1/completions", "{not json"),
        ("/v1/completions", {"model": "someone/else", "prompt": "x", "max_tokens": 2}),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}),
        ("/v1/chat/completions", {"messages": "not a list", "max_tokens": 2}),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}], "max_tokens": 2}),
        # values transformers' handlers pass on unchecked (their names are valid)
        ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stop": 5}),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": "hot"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "top_p": 3}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "n": 2}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": True}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2, "echo": True}),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "max_tokens": 2,
                "response_format": {"type": "json_object"},
            },
        ),  # fmt: skip
        ("/v1/completions", {"prompt": PROMPTS[0] * MAX_MODEL_LEN, "max_tokens": 2}),  # longer than --max-model-len
    ]
    for path, body in bad:
        response = _post(server, path, body)
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
        assert response.json()["detail"]  # a message, not a bare status
    assert "--max-model-len" in response.json()["detail"]  # the last: the option the server was started with
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    nothing_asked = {"n": 1, "logprobs": None, "echo": False}  # the refused fields' values that ask for nothing
    ok = _post(server, "/v1/completions", {"prompt": PROMPTS[1], "max_tokens": 2, "temperature": 0, **nothing_asked})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"]
