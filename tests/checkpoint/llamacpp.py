"""Logits from the real llama.cpp (the prebuilt llama-cpp-cffi wheel), for comparison tests.

The package's own `llama/__init__` imports heavy optional dependencies, so the compiled CPU
module is loaded directly and driven through llama.cpp's C API."""

from __future__ import annotations

import glob
import importlib.util
import os
import sysconfig
from pathlib import Path

import numpy as np

_lib = _ffi = None
_log_callback = None


def _load():
    global _lib, _ffi, _log_callback
    if _lib is None:
        matches = glob.glob(
            os.path.join(sysconfig.get_paths()["purelib"], "llama", "_llama_cpp_cpu.*.so")
        )
        if not matches:
            raise RuntimeError("llama.cpp is not installed: run `make install` (llama-cpp-cffi)")
        spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", matches[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _lib, _ffi = module.lib, module.ffi

        @_ffi.callback("void(enum ggml_log_level, const char *, void *)")
        def quiet(level, text, user_data):
            pass

        _log_callback = quiet  # keep a reference: llama.cpp holds the pointer
        _lib.llama_log_set(quiet, _ffi.NULL)
        _lib.llama_backend_init()
    return _lib, _ffi


def llamacpp_logits(path: Path, tokens: list[int]) -> np.ndarray:
    """(len(tokens), vocab) float32 logits llama.cpp computes for `tokens` at positions 0..n-1,
    with a float32 KV cache."""
    lib, ffi = _load()
    params = lib.llama_model_default_params()
    params.n_gpu_layers = 0
    model = lib.llama_model_load_from_file(str(path).encode(), params)
    if model == ffi.NULL:
        raise RuntimeError(f"llama.cpp could not load {path}")
    n = len(tokens)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = max(n, 32)
    cparams.n_threads = cparams.n_threads_batch = min(2, os.cpu_count() or 1)
    cparams.type_k = cparams.type_v = 0  # GGML_TYPE_F32
    ctx = lib.llama_init_from_model(model, cparams)
    batch = lib.llama_batch_init(n, 0, 1)
    try:
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        batch.n_tokens = n
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        rows = [
            np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, i), 4 * vocab), np.float32)
            for i in range(n)
        ]
        return np.stack(rows).copy()
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)
