"""The high-level inference API: `Llama.load(path).generate(prompts)`, `.chat`, `.stream`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from herd.infer.generate import Step, decode_steps
from herd.infer.parallel import shared_seed, tensor_parallel, tp_size
from herd.infer.sampling import SamplingParams
from herd.infer.speculative import (
    Drafter,
    ModelDrafter,
    NgramDrafter,
    SpeculationStats,
    check_vocab,
    speculative_steps,
)
from herd.infer.text import Completion, GeneratedText
from herd.model import Transformer
from herd.tokenizer import Tokenizer, chat_format

Prompt = str | Sequence[int]
Messages = Sequence[Mapping[str, Any]]
Draft = Transformer | Drafter | str


class Llama:
    """A model and its tokenizer, ready to generate.

    The context window is `max_seq_len` (default: the model config's): a prompt longer than it
    is an error unless `truncate=True`, and generation stops with finish_reason "length" when a
    row reaches the window, even before max_new_tokens.

    compile: run decode steps through torch.compile on a static KV cache (herd.infer.compile).
    The first generation of each (batch size, cache bucket) pays the compilation, about a
    minute for SmolLM2 on 2 CPU cores; later ones decode ~1.5-2.4x faster on the CPU.

    draft: speculative decoding (herd.infer.speculative) with a smaller model of the same
    vocabulary, "ngram" for prompt lookup, or any `Drafter`; `draft_tokens` are proposed per
    round, and `speculation` counts what was drafted and accepted. It decodes one prompt at a
    time (with compile, the model's passes after the prompt run compiled: the decode step, and
    a pass over draft_tokens + 1 tokens padded to that width); the output is what the model
    alone would give (greedy: the same tokens; sampled: the same distribution).
    """

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_seq_len: int | None = None,
        compile: bool = False,
        draft: Draft | None = None,
        draft_tokens: int = 4,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len or model.config.max_seq_len
        self.compile = compile
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
        self.drafter = _drafter(model, draft)
        self.draft_tokens = draft_tokens
        self.speculation = SpeculationStats()
        self._chat = None

    @classmethod
    def load(
        cls,
        path: str | Path,
        dtype: str | torch.dtype | None = None,
        quantize: str | None = None,
        max_seq_len: int | None = None,
        device: str | torch.device = "cpu",
        compile: bool = False,
        adapter: str | Path | None = None,
        draft: str | Path | Transformer | Drafter | None = None,
        draft_tokens: int = 4,
        tp: int = 1,
    ) -> Llama:
        """Load a checkpoint (HF dir, Meta dir, .gguf, or "smollm2") and its tokenizer.

        quantize: None, "int8" / "int4" / "fp8" weight-only quantization, "w8a8" (int8
            weights and per-token int8 activations) or "w4a8" (int4 weights and int8
            activations per 32 inputs) or "fp8-mixed" (the Llama 3 paper's FP8 recipe: fp8
            feed-forward layers in every block but the first and last; herd.quantize).
        compile: see the class docstring.
        adapter: a PEFT-format LoRA adapter directory, folded into the weights before any
            quantization.
        draft: a checkpoint path (loaded like the model, same dtype and device), "ngram", a
            model or a `Drafter`; see the class docstring.
        tp: split the weights over the `tp` processes of this torchrun job (tensor
            parallelism, herd.infer.parallel); every process then calls the same methods
            with the same arguments, and all of them get the same results.
        """
        from herd.adapters import fold_adapter
        from herd.checkpoint import load_model
        from herd.checkpoint.peft import read_peft_adapter
        from herd.tokenizer import load_tokenizer

        if quantize is not None:
            _check_quantize(quantize)  # before the slow load
        if tp > 1 and (quantize is not None or draft is not None):
            raise ValueError("tensor parallelism takes full-precision weights and no draft")
        model = load_model(path, dtype=dtype, device=device)
        if adapter is not None:
            fold_adapter(model, *read_peft_adapter(adapter, model.config))
        if quantize is not None:
            model = _quantize(model, quantize)
        if tp > 1:
            tensor_parallel(model, tp)
        if isinstance(draft, str | Path) and str(draft) != "ngram":
            draft = load_model(draft, dtype=dtype, device=device)
        return cls(model, load_tokenizer(path), max_seq_len, compile, draft, draft_tokens)

    @property
    def chat_format(self) -> Any:
        if self._chat is None:
            self._chat = chat_format(self.tokenizer)
        return self._chat

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text gets BOS when the checkpoint's tokenizer adds one (as
        transformers does); a list of ids is used exactly as given."""
        if isinstance(prompt, str):
            add_bos = getattr(self.tokenizer, "add_bos", self.tokenizer.bos_id is not None)
            return self.tokenizer.encode(prompt, bos=add_bos)
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_new_tokens: int = 256,
        temperature: float = 0.6,
        top_p: float = 0.9,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_ids: Sequence[int] | None = None,
        logprobs: bool = False,
        truncate: bool = False,
    ) -> list[Completion]:
        """Complete each prompt (a string, or a list of token ids); one Completion per prompt.

        temperature 0 is greedy. seed makes sampling reproducible (for the same batch: rows
        share one random stream). stop: strings that end a row, cut from its text. stop_ids:
        tokens that end a row, default the tokenizer's stop tokens. truncate: drop the oldest
        prompt tokens so that the prompt plus max_new_tokens fits the window (keeping at
        least one), instead of raising for a prompt longer than the window.
        """
        rows = self._complete(
            [self.encode(p) for p in _prompt_list(prompts)],
            max_new_tokens=max_new_tokens,
            seed=seed,
            stop=stop,
            stop_ids=stop_ids,
            logprobs=logprobs,
            truncate=truncate,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
        )
        return [row.completion() for row in rows]

    def chat(self, messages: Messages, **kwargs: Any) -> Completion:
        """Answer a dialog in the tokenizer's chat format; the text is the assistant content
        (the chat format's reading of the new tokens, unless a stop string cut it). Takes the
        keyword arguments of `generate`."""
        ids = self.chat_format.encode_dialog(messages, add_generation_prompt=True)
        row = self._complete([ids], **kwargs)[0]
        completion = row.completion()
        if not row.stopped_by_string:
            completion.text = self.chat_format.decode_assistant(row.ids)["content"]
        return completion

    def stream(self, prompt: Prompt | Messages, **kwargs: Any) -> Iterator[str]:
        """Yield the text of one completion as it is generated. A list of message dicts is a
        chat (encoded with the chat format; the deltas are the raw assistant text, stop token
        excluded). Takes the keyword arguments of `generate`; text that could be the start of a
        stop string is held back until it is known not to be."""
        if _is_messages(prompt):
            ids = self.chat_format.encode_dialog(prompt, add_generation_prompt=True)
        else:
            ids = self.encode(prompt)
        rows: list[GeneratedText] = []
        for _ in self._steps([ids], rows, **kwargs):
            if delta := rows[0].pending():
                yield delta
        if delta := rows[0].pending():
            yield delta

    def _complete(self, prompts: list[list[int]], **kwargs: Any) -> list[GeneratedText]:
        rows: list[GeneratedText] = []
        for _ in self._steps(prompts, rows, **kwargs):
            pass
        return rows

    def _steps(
        self,
        prompts: list[list[int]],
        rows: list[GeneratedText],
        max_new_tokens: int = 256,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_ids: Sequence[int] | None = None,
        logprobs: bool = False,
        truncate: bool = False,
        **sampling: Any,
    ) -> Iterator[Step]:
        """Run generation, filling `rows` (one per prompt) as tokens arrive."""
        params = SamplingParams(**sampling)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if any(len(ids) == 0 for ids in prompts):
            raise ValueError("a prompt must have at least one token")
        prompts = [self._fit(ids, max_new_tokens, truncate) for ids in prompts]
        rows.extend(self._rows(prompts, max_new_tokens, stop, stop_ids))
        steps = max((row.budget for row in rows), default=0)
        if steps <= 0:
            return
        generator = None
        if seed is None and tp_size(self.model) > 1:
            seed = shared_seed(self.model)  # every process must sample the same tokens
        if seed is not None:
            device = self.model.tok_embeddings.weight.device
            generator = torch.Generator(device=device).manual_seed(seed)
        for step in self._decode(prompts, steps, params, generator, logprobs):
            for i, row in enumerate(rows):
                row.add(step.tokens[i], step.logprobs[i] if step.logprobs else None)
            yield step
            if all(row.finish_reason is not None for row in rows):
                return

    def _decode(
        self,
        prompts: list[list[int]],
        steps: int,
        params: SamplingParams,
        generator: torch.Generator | None,
        logprobs: bool,
    ) -> Iterator[Step]:
        if self.drafter is None:
            return decode_steps(
                self.model, prompts, steps, params, generator, logprobs, compile=self.compile
            )
        if len(prompts) > 1:
            raise ValueError(
                f"speculative decoding takes one prompt at a time, got {len(prompts)}: call "
                "generate once per prompt, or load without draft= to decode them as a batch"
            )
        return speculative_steps(
            self.model,
            self.drafter,
            prompts[0],
            steps,
            params,
            generator,
            logprobs,
            k=self.draft_tokens,
            stats=self.speculation,
            compile=self.compile,
        )

    def _fit(self, ids: list[int], max_new_tokens: int, truncate: bool) -> list[int]:
        window = self.max_seq_len
        if truncate and len(ids) + max_new_tokens > window:
            return ids[-max(1, window - max_new_tokens) :]
        if len(ids) > window:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but the context window is {window}: shorten "
                f"it, pass truncate=True to keep its last tokens, or load with a larger "
                f"max_seq_len (the model was configured for {self.model.config.max_seq_len})"
            )
        return ids

    def _rows(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        stop: str | Sequence[str] | None,
        stop_ids: Sequence[int] | None,
    ) -> list[GeneratedText]:
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        ends = frozenset(self.tokenizer.stop_ids if stop_ids is None else stop_ids)
        return [
            GeneratedText(
                prompt_tokens=len(ids),
                budget=min(max_new_tokens, self.max_seq_len - len(ids)),
                stop_ids=ends,
                stops=tuple(s for s in stops if s),
                decoder=self.tokenizer.stream_decoder(),
            )
            for ids in prompts
        ]


def _prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt of token ids
    return prompts


def _is_messages(prompt: Any) -> bool:
    return (
        not isinstance(prompt, str)
        and isinstance(prompt, Sequence)
        and bool(prompt)
        and isinstance(prompt[0], Mapping)
    )


def _drafter(model: Transformer, draft: Draft | None) -> Drafter | None:
    if draft is None or isinstance(draft, Drafter):
        return draft
    if isinstance(draft, Transformer):
        check_vocab(model, draft)
        return ModelDrafter(draft)
    if draft == "ngram":
        return NgramDrafter()
    raise ValueError(f"draft must be a model, a checkpoint path or 'ngram', got {draft!r}")


def _check_quantize(method: str) -> None:
    from herd.quantize import METHODS

    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; choose from {list(METHODS)}")


def _quantize(model: Transformer, method: str) -> Transformer:
    from herd.quantize import quantize_model  # loaded only when asked for

    return quantize_model(model, method)
