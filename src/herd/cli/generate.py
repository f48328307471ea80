"""`herd generate` and `herd chat`: talk to a model from the terminal, replies streamed."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from herd.cli.common import console, err, fail

if TYPE_CHECKING:
    from herd.infer import Llama

DEFAULT_MODEL = "smollm2"

Model = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="HF dir, Meta dir, .gguf file, or 'smollm2' (embedded, offline)."
    ),
]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")]
Temperature = Annotated[float, typer.Option(help="0 is greedy.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set this likely.")]
TopK = Annotated[int, typer.Option(help="Keep the K likeliest tokens (0: all).")]
Seed = Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")]
Dtype = Annotated[str | None, typer.Option(help="f32, bf16 or f16. Default: the checkpoint's.")]
Quantize = Annotated[
    str | None,
    typer.Option(
        help="Quantisation after loading: int8, int4 or fp8 (weight-only), or "
        "w8a8 (int8 weights and per-token int8 activations), or w4a8 (int4 weights and int8 "
        "activations per 32 inputs).",
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the decode step (static KV cache): ~1 min to compile, then faster.",
    ),
]
Adapter = Annotated[
    str | None,
    typer.Option(help="A PEFT-format LoRA adapter directory, folded into the weights at load."),
]
Draft = Annotated[
    str | None,
    typer.Option(
        help="Speculative decoding: a smaller model with the same tokenizer (a path, loaded "
        "like --model) or 'ngram' (prompt lookup). Same output, fewer target passes.",
    ),
]
DraftTokens = Annotated[
    int, typer.Option("--draft-tokens", help="Tokens drafted per speculative round.")
]
MaxSeqLen = Annotated[
    int | None,
    typer.Option(help="Context window in tokens (bounds the KV cache). Default: the model's."),
]


def load_llama(
    model: str,
    dtype: str | None,
    quantize: str | None,
    max_seq_len: int | None,
    compile: bool,
    adapter: str | None = None,
    draft: str | None = None,
    draft_tokens: int = 4,
    tp: int = 1,
) -> Llama:
    from herd.checkpoint import CheckpointError
    from herd.infer import Llama

    try:
        with console.status(f"loading {model}"):
            return Llama.load(
                model,
                dtype=dtype,
                quantize=quantize,
                max_seq_len=max_seq_len,
                compile=compile,
                adapter=adapter,
                draft=draft,
                draft_tokens=draft_tokens,
                tp=tp,
            )
    except (CheckpointError, FileNotFoundError, ValueError, NotImplementedError) as e:
        fail(str(e))


def _sampling(temperature: float, top_p: float, top_k: int, seed: int | None) -> dict[str, Any]:
    return {"temperature": temperature, "top_p": top_p, "top_k": top_k, "seed": seed}


def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")],
    model: Model = DEFAULT_MODEL,
    max_new_tokens: MaxNewTokens = 128,
    temperature: Temperature = 0.6,
    top_p: TopP = 0.9,
    top_k: TopK = 0,
    seed: Seed = None,
    dtype: Dtype = None,
    quantize: Quantize = None,
    max_seq_len: MaxSeqLen = None,
    compile: Compile = False,
    adapter: Adapter = None,
    draft: Draft = None,
    draft_tokens: DraftTokens = 4,
) -> None:
    """Continue a prompt (no chat format) and stream the continuation."""
    llama = load_llama(model, dtype, quantize, max_seq_len, compile, adapter, draft, draft_tokens)
    sampling = _sampling(temperature, top_p, top_k, seed)
    try:
        for delta in llama.stream(prompt, max_new_tokens=max_new_tokens, **sampling):
            sys.stdout.write(delta)
            sys.stdout.flush()
    except ValueError as e:
        fail(str(e))
    sys.stdout.write("\n")


def chat(
    model: Model = DEFAULT_MODEL,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    message: Annotated[
        str | None, typer.Option("--message", help="Answer this one message and exit.")
    ] = None,
    max_new_tokens: MaxNewTokens = 512,
    temperature: Temperature = 0.6,
    top_p: TopP = 0.9,
    top_k: TopK = 0,
    seed: Seed = None,
    dtype: Dtype = None,
    quantize: Quantize = None,
    max_seq_len: MaxSeqLen = None,
    compile: Compile = False,
    adapter: Adapter = None,
    draft: Draft = None,
    draft_tokens: DraftTokens = 4,
) -> None:
    """Chat with a model: replies stream as they are generated. /reset starts over, /exit quits.

    History is kept within the context window: when full, the oldest turns go, with a notice.
    """
    llama = load_llama(model, dtype, quantize, max_seq_len, compile, adapter, draft, draft_tokens)
    session = ChatSession(llama, system, max_new_tokens, _sampling(temperature, top_p, top_k, seed))
    if message is not None:
        session.reply(message)
        return
    console.print(f"[dim]chatting with {model}; /reset starts over, /exit quits[/]")
    while True:
        try:
            line = console.input("[bold green]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        command = line.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            session.reset()
            console.print("[dim]history cleared[/]")
        elif command:
            session.reply(line)


class ChatSession:
    """A conversation that fits the model's context window."""

    def __init__(
        self, llama: Llama, system: str | None, max_new_tokens: int, sampling: dict[str, Any]
    ):
        self.llama = llama
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict[str, str]] = []
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling

    def reset(self) -> None:
        self.turns = []

    def reply(self, text: str) -> str:
        self.turns.append({"role": "user", "content": text})
        self._fit()
        console.print("[bold blue]assistant>[/] ", end="")
        pieces = []
        for delta in self.llama.stream(
            self.system + self.turns, max_new_tokens=self.max_new_tokens, **self.sampling
        ):
            pieces.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        answer = "".join(pieces)
        self.turns.append({"role": "assistant", "content": answer})
        return answer

    def _fit(self) -> None:
        """Drop the oldest exchanges until the prompt leaves room for a full reply."""
        window = self.llama.max_seq_len
        dropped = 0
        encode = self.llama.chat_format.encode_dialog
        while len(encode(self.system + self.turns)) + self.max_new_tokens > window:
            if len(self.turns) <= 1:
                err.print(
                    "[yellow]note:[/] this message alone leaves less than --max-new-tokens "
                    "of the context window; the reply may be cut short"
                )
                break
            del self.turns[:2]
            dropped += 1
        if dropped:
            err.print(f"[yellow]note:[/] context window full; dropped the {dropped} oldest turn(s)")
