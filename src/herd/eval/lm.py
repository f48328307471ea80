"""herd as an lm-eval model: `HerdLM`, registered as "herd" when `herd.eval` is imported.

    herd lm-eval --model herd --model_args pretrained=PATH --tasks arc_easy
    lm_eval.simple_evaluate(model="herd", model_args="pretrained=PATH", tasks=[...])

Requests are scored the way `herd eval` scores them: log-likelihood requests that share a
context (a multiple-choice question's choices) go through one shared-context row, rolling
log-likelihoods are lm-eval's disjoint windows scored the same way, and generation requests
all go to the serving engine at once (continuous batching, prefix cache). Tokenisation,
truncation and stop-sequence handling follow lm-eval's `hf` backend, so the two give the same
scores on the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm import tqdm

from herd.eval.batch import complete
from herd.eval.score import score_rows
from herd.infer import Llama
from herd.infer.sampling import SamplingParams

ROWS_PER_CALL = 64  # rows per score_rows call: the unit of progress


class HerdLM(TemplateLM):
    """Any checkpoint herd loads, for lm-eval.

    model_args: pretrained (a path or "smollm2"), dtype, quantize (int8/int4/fp8), adapter (a
    PEFT directory), max_length (the window; default the model's), add_bos_token (default:
    the tokenizer's own habit), max_tokens (padded tokens per scoring forward pass), seed.
    batch_size bounds how many sequences decode together.
    """

    def __init__(
        self,
        pretrained: str = "smollm2",
        dtype: str | None = None,
        quantize: str | None = None,
        adapter: str | None = None,
        max_length: int | None = None,
        add_bos_token: bool | None = None,
        max_tokens: int = 1024,
        seed: int = 1234,
        batch_size: int | str | None = None,
        max_batch_size: int | None = None,
        device: str | None = None,
    ):
        super().__init__()
        self.llama = Llama.load(
            pretrained, dtype=dtype, quantize=quantize, max_seq_len=_int(max_length),
            device=_device(device), adapter=adapter,
        )  # fmt: skip
        self.pretrained = str(pretrained)
        tokenizer = self.llama.tokenizer
        if add_bos_token is None:
            add_bos_token = getattr(tokenizer, "add_bos", tokenizer.bos_id is not None)
        self.add_bos_token = _bool(add_bos_token)
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        batch = (
            32 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else batch_size
        )
        self.max_batch = int(batch)
        self.chat_applied = False  # contexts then hold the template's special-token text

    @property
    def max_length(self) -> int:
        return self.llama.max_seq_len

    @property
    def eot_token_id(self) -> int:
        return self.llama.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        tokenizer = self.llama.tokenizer
        return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.llama.tokenizer.chat_template or "llama3"

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        self.chat_applied = True
        return self.llama.chat_format.render(chat_history, add_generation_prompt)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs
    ) -> list[int]:
        bos = self.add_bos_token if add_special_tokens is None else add_special_tokens
        tokenizer = self.llama.tokenizer
        if bos and tokenizer.bos_id is not None:
            # a rendered chat template already starts with it
            bos = not string.startswith(tokenizer.decode([tokenizer.bos_id]))
        return tokenizer.encode(
            string, bos=bos and tokenizer.bos_id is not None, special=self.chat_applied
        )

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.llama.tokenizer.decode(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """Requests with the same context ids become one row of choices."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, _) in enumerate(requests):
            groups.setdefault(tuple(context), []).append(i)
        keys = sorted(groups, key=lambda k: -(len(k) + sum(len(requests[i][2]) for i in groups[k])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="herd: log-likelihoods", disable=disable_tqdm)
        for at in range(0, len(keys), ROWS_PER_CALL):
            part = keys[at : at + ROWS_PER_CALL]
            rows = [(list(k), [requests[i][2] for i in groups[k]]) for k in part]
            for key, scores in zip(
                part, score_rows(self.llama.model, rows, self.max_length, self.max_tokens)
            ):
                for i, lp, greedy in zip(groups[key], scores.logprobs, scores.greedy):
                    results[i] = (lp, greedy)
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
                bar.update(len(groups[key]))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """lm-eval's disjoint rolling windows of each string, each token predicted once."""
        windows, owner = [], []
        for r, (string,) in enumerate(req.args for req in requests):
            for context, cont in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    self.tok_encode(string), self.prefix_token_id, self.max_length, 1
                ),
            ):
                windows.append((None, context, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[r] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Every request of one generation setting goes to the engine together."""
        eos = self.tok_decode([self.eot_token_id])
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        results: list[str | None] = [None] * len(requests)
        for indices in by_kwargs.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], 256)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = kwargs.pop("max_gen_toks")
            if max_gen >= self.max_length:
                raise ValueError(
                    f"max_gen_toks {max_gen} leaves no room for a prompt in the model's "
                    f"{self.max_length}-token window"
                )
            params = SamplingParams(
                temperature=kwargs.get("temperature", 0.0) if kwargs.get("do_sample") else 0.0,
                top_p=kwargs.get("top_p", 1.0),
                top_k=kwargs.get("top_k", 0) or 0,
            )
            # lm-eval's hf backend keeps a prompt's last (window - max_gen_toks) tokens
            prompts = [
                self.tok_encode(requests[i].args[0])[-(self.max_length - max_gen) :]
                for i in indices
            ]
            done = complete(self.llama, prompts, max_gen, until, params, self.seed, self.max_batch)
            for i, d in zip(indices, done):
                results[i] = postprocess_generated_text(d.text, until, None)
                self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results


def _device(device: str | None) -> str:
    """lm-eval's CLI asks for "cuda" by default; as its hf backend does, a machine without
    one runs on the CPU."""
    if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _int(value: Any) -> int | None:
    return None if value in (None, "") else int(value)


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)
