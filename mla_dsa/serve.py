"""`mla-dsa serve CHECKPOINT`: transformers' own OpenAI-compatible server (`transformers serve`: its FastAPI app,
request handling, chat templates, streaming and model process) with our model and sparse decode behind it.

transformers' loader resolves `config.architectures[0]` on the `transformers` module, so it cannot load a remote-code
checkpoint (`module transformers has no attribute MlaDsaForCausalLM`), and a DeepSeek-V3.2 or GLM-5 export would run
in transformers' own DeepseekV32, which re-expands the whole latent cache at every step. The one change made here is
the loader: `MlaDsaModelLoader` loads every checkpoint with `mla_dsa.load_checkpoint` (ours and the exports alike),
with the server's settings (top-k, attention mode, FP8 caches) applied to its config. Everything else is transformers'.
"""

from __future__ import annotations

import inspect
import json
import logging
from typing import Any

import torch

from .cpu_linear import cpu_has_bf16_matmul, use_onednn_linear
from .loading import load_checkpoint
from .modeling.configuration_mla_dsa import MlaDsaConfig

try:  # transformers' serving stack as of 5.25 (`ModelLoader` is new there); older releases cannot serve with it
    from transformers.cli.serve import Serve
    from transformers.cli.serving import server as serving_app
    from transformers.cli.serving.model_manager import ModelLoader
    from transformers.cli.serving.utils import parse_model_id
    from transformers.utils.import_utils import is_serve_available
except ImportError as error:
    Serve = ModelLoader = None
    SERVING_IMPORT_ERROR = str(error)

logger = logging.getLogger(__name__)

# Config fields a server sets for every request it answers (`mla-dsa serve --index-topk` etc.).
SERVER_CONFIG_FIELDS = ("index_topk", "use_sparse_attention", "attention_mode", "latent_cache_dtype",
                        "indexer_cache_dtype")  # fmt: skip


def check_serving_stack() -> None:
    """An ImportError that says what to install where transformers' serving stack cannot run."""
    if ModelLoader is None:
        raise ImportError(f"mla-dsa serve needs transformers >= 5.25 (its serving stack): {SERVING_IMPORT_ERROR}")
    if not is_serve_available():
        raise ImportError(
            "mla-dsa serve needs transformers' serving extras: pip install -e '.[serve]' in a checkout of mla-dsa"
        )


class MlaDsaModelLoader(ModelLoader or object):
    """transformers' model loader, loading with ours. The API server reads the config with `MlaDsaConfig` and the
    model process (spawned: it unpickles this loader by name) loads with `load_checkpoint`; both take our checkpoints
    and the DeepSeek-V3.2 / GLM-5 exports alike, with the server's settings applied."""

    config_overrides: dict[str, Any]

    @classmethod
    def from_loader(cls, loader, config_overrides: dict[str, Any]) -> MlaDsaModelLoader:
        ours = cls.__new__(cls)
        ours.__dict__.update(loader.__dict__)  # its device, dtype, attention implementation, quantization
        ours.config_overrides = dict(config_overrides)
        return ours

    def load_config(self, model_id: str):
        from transformers import GenerationConfig

        repo, revision, _ = parse_model_id(model_id)
        config = MlaDsaConfig.from_pretrained(repo, revision=revision, **self.config_overrides)
        try:  # as transformers' loader: the checkpoint's generation config, else the model config's
            generation_config = GenerationConfig.from_pretrained(repo, revision=revision)
        except OSError:
            generation_config = GenerationConfig.from_model_config(config)
        return config, generation_config

    def _load_model(self, model_id: str, tqdm_class: type | None = None, progress_callback=None):
        from . import register_with_transformers

        # The model process is spawned with the server's argv: started as `mla-dsa`, importing the package there
        # registered nothing (the command registers once its arguments parse, in the server's process only), and
        # the exports' config.json would not read as ours, nor would the CPU-tuned attention be in place.
        register_with_transformers()
        repo, revision, gguf_file = parse_model_id(model_id)
        if gguf_file is not None:
            raise ValueError(f"{model_id}: GGUF is llama.cpp's format; mla-dsa serve serves safetensors checkpoints")
        if progress_callback is not None:
            progress_callback({"status": "loading", "model": model_id, "stage": "config"})
        kwargs = {"revision": revision, "dtype": self.dtype, "device_map": self.device, "tqdm_class": tqdm_class}
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        model = load_checkpoint(repo, **kwargs, **self.config_overrides).eval()
        use_onednn_linear(model)  # float32 on a CPU: projections on every core (see mla_dsa.cpu_linear)
        if model.device.type == "cpu" and model.dtype == torch.bfloat16 and not cpu_has_bf16_matmul():
            logger.warning(f"{model_id} runs in bfloat16 on a CPU without bf16 matrix instructions (AVX-512 or AMX), "
                           "where PyTorch multiplies bf16 matrices several times slower than float32: serve it with "
                           "--dtype float32")  # fmt: skip
        return model


# Errors a handler raises reading a malformed request body (a string where the messages list goes, a message without
# its role) before anything reaches the model: the request's fault. Failures in the model's process arrive as others.
MALFORMED_REQUEST_ERRORS = (TypeError, KeyError, AttributeError, IndexError)


async def error_with_its_message(request, error: Exception):
    """The answer to a request a handler failed on: transformers' server answers a plain-text "Internal Server Error"
    and logs the reason; this says it, as 400 where the request could not be read, 500 otherwise."""
    from fastapi.responses import JSONResponse

    status = 400 if isinstance(error, MALFORMED_REQUEST_ERRORS) else 500
    problem = "the request could not be read" if status == 400 else "the server failed on this request"
    return JSONResponse({"detail": f"{problem}: {type(error).__name__}: {error}"}, status_code=status)


# Generation settings transformers' handlers use as given, bounded as the OpenAI API bounds them: (field, low, high)
SETTING_BOUNDS = (("top_p", 0, 1), ("frequency_penalty", -2, 2))
# OpenAI fields transformers' handlers accept and drop (with a log line): the values that ask for nothing
IGNORED_FIELDS = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False, 0),
                  "top_logprobs": (None, 0), "presence_penalty": (None, 0),
                  "response_format": (None, {"type": "text"})}  # fmt: skip


def request_value_problem(body: dict) -> str | None:
    """What is wrong with a request's generation settings, by the OpenAI API's rules, or None. transformers' handlers
    check the field names and some values (`max_tokens`, `temperature`) and pass the others on: `stop: 5` failed
    inside `generate()` (500), `top_p: 3` was used as given, and `n`, `logprobs`, `echo`, a JSON `response_format`
    were dropped with a log line: a client asking for several choices, log-probabilities or JSON got one choice,
    none and free text, silently."""
    for name, low, high in SETTING_BOUNDS:
        value = body.get(name)
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
        ):
            return f"`{name}` must be a number from {low} to {high}, got {value!r}"
    stop = body.get("stop")
    if not (
        stop is None or isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        return f"`stop` must be a string or a list of strings, got {stop!r}"
    for name, accepted in IGNORED_FIELDS.items():
        if body.get(name) not in accepted:
            return f"this server cannot honour `{name}: {json.dumps(body[name])}` (it takes {accepted[-1]!r} or none)"
    return None


def checking_request_values(validate):
    """A handler's `_validate_request`, also refusing bad generation settings (`request_value_problem`) with 422."""

    def validate_request(body: dict) -> None:
        from fastapi import HTTPException

        validate(body)
        problem = request_value_problem(body)
        if problem is not None:
            raise HTTPException(status_code=422, detail=problem)

    return validate_request


def build_app_with_error_messages(*args, **kwargs):
    """transformers' `build_server`, answering a failed request with its reason (`error_with_its_message`), its chat
    and completion handlers refusing bad generation settings with theirs (`request_value_problem`)."""
    build_server = build_app_with_error_messages.transformers_build_server
    handlers = inspect.signature(build_server).bind(*args, **kwargs).arguments
    for name in ("chat_handler", "completion_handler"):
        handlers[name]._validate_request = checking_request_values(handlers[name]._validate_request)
    app = build_server(*args, **kwargs)
    app.add_exception_handler(Exception, error_with_its_message)
    return app


def serve(checkpoint: str, config_overrides: dict[str, Any] | None = None, **serve_options) -> None:
    """Runs transformers' server (`transformers serve`, with its options: `host`, `port`, `device`, `dtype`,
    `log_level`, ...) on `checkpoint` with our loader, until stopped."""
    check_serving_stack()
    overrides = {name: value for name, value in (config_overrides or {}).items() if value is not None}
    unknown = sorted(set(overrides) - set(SERVER_CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"mla-dsa serve cannot set {unknown}; it sets {list(SERVER_CONFIG_FIELDS)}")
    MlaDsaConfig.from_pretrained(checkpoint, **overrides)  # a bad checkpoint or setting fails here, in one line

    class MlaDsaServe(Serve):
        def run(self, *args, **kwargs) -> None:  # `Serve.__init__` builds transformers' loader, then runs
            self.loader = MlaDsaModelLoader.from_loader(self.loader, overrides)
            # `Serve.run` imports `build_server` from its module as it runs: this process serves with ours.
            build_app_with_error_messages.transformers_build_server = serving_app.build_server
            serving_app.build_server = build_app_with_error_messages
            super().run(*args, **kwargs)

    MlaDsaServe(checkpoint, **serve_options)
