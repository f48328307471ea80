"""`herd serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import signal
import time
from typing import Annotated

import typer

from herd.cli.common import console, fail
from herd.cli.generate import DEFAULT_MODEL, Dtype, MaxSeqLen, Model, Quantize


def serve(
    model: Model = DEFAULT_MODEL,
    host: Annotated[
        str, typer.Option(help="Address to bind. The default serves this machine only.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="HERD_API_KEY",
            help="Require 'Authorization: Bearer KEY' on /v1 requests (401 otherwise).",
        ),
    ] = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", help="Sequences decoded together per step.")
    ] = 32,
    max_queue: Annotated[
        int,
        typer.Option("--max-queue", help="Waiting requests beyond which new ones get a 429."),
    ] = 64,
    kv_cache_mib: Annotated[
        int, typer.Option("--kv-cache-mib", help="Memory for the paged KV cache.")
    ] = 512,
    block_size: Annotated[int, typer.Option(help="Tokens per KV cache block.")] = 16,
    prefill_chunk: Annotated[
        int, typer.Option(help="Most prompt tokens prefilled per engine step.")
    ] = 256,
    served_name: Annotated[
        str | None, typer.Option(help="Model name reported by /v1/models. Default: --model.")
    ] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--adapter",
            help="Serve a PEFT LoRA adapter as NAME=PATH (repeatable); a request's `model` "
            "picks it by NAME. All adapters share the base weights.",
        ),
    ] = None,
    compile: Annotated[
        bool,
        typer.Option(
            "--compile",
            help="Decode small batches through torch.compile: batch 1 compiles at start-up, "
            "each other (batch, length) bucket on first use (tens of seconds each; inductor "
            "caches them on disk, so restarts are quicker).",
        ),
    ] = False,
    compile_batch: Annotated[
        int,
        typer.Option(
            "--compile-batch",
            help="With --compile, the largest decode batch that runs compiled (batches "
            "of 1, 2, 4, 8, ... each compile once); larger batches run eager.",
        ),
    ] = 8,
    draft: Annotated[
        str | None,
        typer.Option(
            "--draft",
            help="'ngram': speculative decoding by prompt lookup (the tokens that followed the "
            "latest earlier occurrence of a sequence's last tokens, checked in one pass; "
            "outputs unchanged). Pays when outputs copy their input.",
        ),
    ] = None,
    draft_tokens: Annotated[
        int, typer.Option("--draft-tokens", help="Tokens drafted per sequence and step.")
    ] = 4,
    tp: Annotated[
        int,
        typer.Option(
            "--tp",
            help="Split the weights over N processes (tensor parallelism): run as torchrun "
            "--nproc-per-node N -m herd serve --tp N ...; rank 0 serves HTTP and drives the "
            "others; SIGTERM to rank 0 stops it cleanly.",
        ),
    ] = 1,
    dtype: Dtype = None,
    quantize: Quantize = None,
    max_seq_len: MaxSeqLen = None,
) -> None:
    """Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models),
    with continuous batching, a paged KV cache with prefix caching, /health and /metrics.

    SIGTERM or Ctrl-C stops accepting requests, lets in-flight ones finish (up to 30 s), and
    exits 0.
    """
    import torch.distributed
    import uvicorn

    from herd.cli.generate import load_llama
    from herd.serve.api import ServerConfig, create_app
    from herd.serve.engine import Engine, in_passing_thread

    if adapter and quantize:
        fail("--adapter serves adapters over full-precision base weights; drop --quantize")
    if tp > 1 and (adapter or compile or draft):
        fail("--tp serves one set of weights, eagerly: drop --adapter, --compile and --draft")
    if draft not in (None, "ngram"):
        fail(f"--draft {draft}: the server drafts by prompt lookup only (--draft ngram)")

    def setup():
        llama = load_llama(model, dtype, quantize, max_seq_len, compile=False, tp=tp)
        names = _attach(llama.model, adapter or [])
        engine_type = Engine
        if tp > 1:
            from herd.serve.parallel import TensorParallelEngine as engine_type
        try:
            engine = engine_type(
                llama.model,
                llama.tokenizer,
                max_batch=max_batch,
                block_size=block_size,
                prefill_chunk=prefill_chunk,
                max_seq_len=llama.max_seq_len,
                cache_bytes=kv_cache_mib * 2**20,
                compile_batch=compile_batch if compile else 0,
                draft=draft,
                draft_tokens=draft_tokens,
            )
        except ValueError as e:
            fail(str(e))
        if compile and names:
            console.print(
                "[yellow]--compile: adapters switch per request, so decoding stays eager[/]"
            )
        if engine.compiled is not None:
            with console.status("compiling the decode step (batch 1)"):
                started = time.perf_counter()
                engine.compiled.warm_up()
            console.print(
                f"[dim]compiled the batch-1 decode step in {time.perf_counter() - started:.0f} s[/]"
            )
        return llama, names, engine

    # Off the main thread, so that the engine thread is the only one with OpenMP workers.
    llama, names, engine = in_passing_thread(setup)
    if tp > 1 and torch.distributed.get_rank() != 0:
        # torchrun's SIGTERM reaches every rank: this one waits for rank 0 to finish and
        # send its stop instead of dying in the middle of a pass.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        engine.follow()
        return
    config = ServerConfig(
        served_name or model, api_key=api_key, max_queue=max_queue, adapters=names
    )
    app = create_app(llama, engine, config)
    console.print(
        f"[dim]herd serving {config.model_name} on http://{host}:{port}/v1 "
        f"({engine.total_blocks} KV blocks of {block_size} tokens, batch {max_batch}"
        f"{f', tensor-parallel over {tp} processes' if tp > 1 else ''})"
        f"{'; adapters ' + ', '.join(names) if names else ''}[/]"
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal again through
    # the handlers it found on entry; these make that a clean exit 0 instead of death by signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=30)


def _attach(model, specs: list[str]) -> dict[str, int]:
    """Attach the NAME=PATH adapters to the model; returns their indices by name."""
    from herd.adapters import attach_adapters
    from herd.checkpoint.base import CheckpointError
    from herd.checkpoint.peft import read_peft_adapter

    names, adapters = {}, []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            fail(f"--adapter {spec!r}: expected NAME=PATH")
        if name in names:
            fail(f"--adapter {name!r} is given twice")
        try:
            adapters.append(read_peft_adapter(path, model.config))
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            fail(f"--adapter {name}: {e}")
        names[name] = len(names)
    try:
        attach_adapters(model, adapters)
    except ValueError as e:
        fail(str(e))
    return names
