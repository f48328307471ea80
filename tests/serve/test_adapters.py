"""Multi-LoRA serving: adapters made by PEFT, attached to one engine over shared base weights;
each request's greedy tokens equal PEFT + transformers' `generate` with that adapter, whether
its batch mixes adapters or not, and a prompt cached under one adapter is never reused for
another. Over HTTP, `model` picks the adapter and an unknown name gets a 404."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.adapters import attach_adapters
from herd.checkpoint.peft import read_peft_adapter
from herd.serve.engine import Engine, Request, run_to_completion
from tests.conftest import hf_llama

PROMPT = list(range(300, 340))  # 40 tokens: two full cache blocks of 16, shared by every request
NEW = 8
ADAPTERS = {  # name: (PEFT target modules, rank, seed)
    "attn": (["q_proj", "k_proj", "v_proj", "o_proj"], 4, 1),
    "mlp": (["gate_proj", "up_proj", "down_proj"], 8, 2),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The base model, its PEFT adapters on disk, and PEFT's greedy tokens for each (and the
    base's) after PROMPT and after PROMPT with a different last token."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("multi-lora")
    hf_llama(vocab_size=512).save_pretrained(root / "base")
    prompts = [PROMPT, PROMPT[:-1] + [7]]
    expected = {}
    reference = LlamaForCausalLM.from_pretrained(root / "base").eval()
    expected[None] = [_greedy(reference, p) for p in prompts]
    for name, (targets, rank, seed) in ADAPTERS.items():
        torch.manual_seed(seed)
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False
        )
        peft = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"), config).eval()
        with torch.no_grad():  # adapters large enough to change the greedy path
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        peft.save_pretrained(root / name)
        expected[name] = [_greedy(peft, p) for p in prompts]
    assert expected["attn"] != expected[None] and expected["mlp"] != expected[None]
    return root, prompts, expected


def _greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW
        )
    return out[0, len(prompt) :].tolist()


def engine_with_adapters(root) -> tuple[Engine, dict[str, int]]:
    model = herd.load_model(root / "base")
    names = {name: i for i, name in enumerate(ADAPTERS)}
    attach_adapters(model, [read_peft_adapter(root / n, model.config) for n in ADAPTERS])
    tokenizer = herd.load_tokenizer("smollm2")
    return Engine(model, tokenizer, max_seq_len=128, block_size=16, cache_bytes=2**22), names


@pytest.mark.parametrize("together", [False, True])
def test_each_request_gets_its_adapter(served, together):
    root, prompts, expected = served
    engine, names = engine_with_adapters(root)
    jobs = [
        (f"{name}-{i}", name, prompt)
        for name in [None, "attn", "mlp"]
        for i, prompt in enumerate(prompts)
    ]

    def request(rid, name, prompt):
        return Request(
            rid, prompt, NEW, stop_ids=frozenset(), adapter=None if name is None else names[name]
        )

    engine.start()
    try:
        if together:  # one batch mixing the base and both adapters
            events = run_to_completion(engine, [request(*job) for job in jobs])
        else:  # one by one: the base caches the prompt's blocks first, then they are offered
            events = {}
            for job in jobs:
                events.update(run_to_completion(engine, [request(*job)]))
    finally:
        engine.stop()
    for rid, name, prompt in jobs:
        tokens = [e.token for e in events[rid][0] if e.token is not None]
        assert tokens == expected[name][prompts.index(prompt)], (rid, name)
    if not together:  # the cache did serve repeated prompts, each within its own adapter
        assert engine.stats.cached_prompt_tokens > 0


def test_http_model_name_picks_the_adapter(served):
    from fastapi.testclient import TestClient

    from herd.infer import Llama
    from herd.serve.api import ServerConfig, create_app

    root, _, expected = served
    engine, names = engine_with_adapters(root)
    llama = Llama(engine.model, engine.tokenizer, max_seq_len=128)
    app = create_app(llama, engine, ServerConfig("base", adapters=names))
    with TestClient(app) as http:
        listed = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert listed == ["base", "attn", "mlp"]
        for model in ["base", "attn", "mlp"]:
            body = {"model": model, "prompt": PROMPT, "max_tokens": NEW, "temperature": 0}
            reply = http.post("/v1/completions", json={**body, "ignore_eos": True})
            assert reply.status_code == 200, reply.text
            assert reply.json()["model"] == model
            want = expected[None if model == "base" else model][0]
            assert reply.json()["choices"][0]["text"] == engine.tokenizer.decode(want)
        missing = http.post("/v1/completions", json={**body, "model": "other"})
        assert missing.status_code == 404
        assert "'other' is not served here; models: base, attn, mlp" in missing.text


def test_an_adapter_for_another_model_is_refused(served, tmp_path):
    root, _, _ = served
    hf_llama(vocab_size=512, n_kv_heads=4).save_pretrained(tmp_path / "other")
    other = herd.load_model(tmp_path / "other")
    adapter = read_peft_adapter(root / "attn", herd.load_model(root / "base").config)
    with pytest.raises(ValueError, match="layers.0.attention.wk .* another model"):
        attach_adapters(other, [adapter])
