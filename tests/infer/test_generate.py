"""Generation against independent references: transformers' greedy generate on SmolLM2, a full
forward pass without cache on a random GQA model, and each prompt generated alone."""

from __future__ import annotations

import pytest
import torch

import herd
from herd.infer import KVCache, Llama, SamplingParams, decode_steps
from tests.conftest import hf_llama

GREEDY = SamplingParams(temperature=0)
PROMPTS = [
    "The history of the Roman Empire",
    "def quicksort(items):",
    "Photosynthesis is the process by which green plants turn sunlight",
]


@pytest.fixture(scope="module")
def llm(smollm2_path) -> Llama:
    return Llama.load(smollm2_path, dtype=torch.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> herd.Transformer:
    path = tmp_path_factory.mktemp("tiny")
    hf_llama(n_kv_heads=2, n_heads=8).save_pretrained(path)  # GQA, 4 query heads per kv head
    return herd.load_model(path).eval()


# --- SmolLM2 against transformers ----------------------------------------------------------


def test_greedy_matches_transformers_batched(
    llm, smollm2_transformers, smollm2_transformers_tokenizer
):
    ref_tok, ref = smollm2_transformers_tokenizer, smollm2_transformers
    ids = [llm.encode(text) for text in PROMPTS]
    assert ids == [ref_tok(text).input_ids for text in PROMPTS]  # same BOS rule as transformers
    assert len({len(i) for i in ids}) == 3  # different lengths: the batch is padded

    # one batch here, one prompt at a time there
    ours = llm.generate(PROMPTS, max_new_tokens=48, temperature=0, stop_ids=[])
    for prompt_ids, completion in zip(ids, ours):
        with torch.no_grad():
            out = ref.generate(
                torch.tensor([prompt_ids]), max_new_tokens=48, do_sample=False, top_p=None
            )
        theirs = out[0, len(prompt_ids) :].tolist()
        assert len(theirs) == 48
        assert completion.token_ids == theirs
        assert completion.finish_reason == "length"
        assert completion.prompt_tokens == len(prompt_ids)
        assert completion.text == llm.tokenizer.decode(theirs)


# --- cache and batching on a random GQA model ----------------------------------------------


def test_cached_forward_matches_full_forward(tiny):
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    cache = KVCache.for_model(tiny, batch_size=2, slots=32)
    with torch.inference_mode():
        full = tiny(tokens)
        chunks = [tiny(tokens[:, :10], cache=cache), tiny(tokens[:, 10:14], cache=cache)]
        chunks += [tiny(tokens[:, i : i + 1], cache=cache) for i in range(14, 24)]
    assert cache.length == 24
    assert cache.keys[0].shape == (2, 2, 32, 8)  # n_kv_heads, not n_heads
    assert (torch.cat(chunks, dim=1) - full).abs().max().item() <= 1e-5


def test_batched_decode_logprobs_match_full_forward(tiny):
    prompts = [[5, 17, 200, 3, 99, 41, 7], [250], [8, 8, 8, 8]]
    steps = list(decode_steps(tiny, prompts, 12, GREEDY, logprobs=True))
    for row, prompt in enumerate(prompts):
        new = [s.tokens[row] for s in steps]
        with torch.inference_mode():
            logits = tiny(torch.tensor([prompt + new]))[0, len(prompt) - 1 : -1]
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
        ours = torch.tensor([s.logprobs[row] for s in steps])
        assert (ours - expected).abs().max().item() <= 1e-5
        assert new == logits.argmax(-1).tolist()  # greedy


def test_batched_equals_one_by_one(tiny):
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [300, 12], [42] * 5, [7]]
    batched = [s.tokens for s in decode_steps(tiny, prompts, 16, GREEDY)]
    for row, prompt in enumerate(prompts):
        alone = [s.tokens[0] for s in decode_steps(tiny, [prompt], 16, GREEDY)]
        assert [t[row] for t in batched] == alone


def test_seeded_sampling_is_reproducible(tiny):
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50)

    def run(seed: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(seed)
        return [s.tokens for s in decode_steps(tiny, [[1, 2, 3], [4]], 16, params, gen)]

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_penalties_steer_generation(tiny):
    plain = [s.tokens[0] for s in decode_steps(tiny, [[42] * 5], 16, GREEDY)]
    assert len(set(plain)) < 16  # the random model repeats itself
    params = SamplingParams(temperature=0, presence_penalty=100.0)
    penalised = [s.tokens[0] for s in decode_steps(tiny, [[42] * 5], 16, params)]
    assert len(set(penalised)) == 16  # a huge presence penalty forbids any repeat


# --- the high-level API on SmolLM2 ----------------------------------------------------------


def test_seeded_generate_is_reproducible(llm):
    def run(seed: int) -> list[int]:
        out = llm.generate(
            "Once upon a time", 5, temperature=1.0, top_p=1.0, seed=seed, stop_ids=[]
        )
        return out[0].token_ids

    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.fixture(scope="module")
def greedy_run(llm):
    prompt = "The three primary colors are"
    completion = llm.generate(prompt, max_new_tokens=16, temperature=0, stop_ids=[])[0]
    return prompt, completion


def test_length_and_logprobs(llm, greedy_run):
    prompt, completion = greedy_run
    assert completion.finish_reason == "length" and len(completion.token_ids) == 16
    again = llm.generate(prompt, max_new_tokens=16, temperature=0, stop_ids=[], logprobs=True)[0]
    assert again.token_ids == completion.token_ids
    assert len(again.logprobs) == 16 and all(lp <= 0 for lp in again.logprobs)
    assert completion.logprobs is None


def test_stop_token_ends_generation(llm, greedy_run):
    prompt, completion = greedy_run
    ids = completion.token_ids
    cut = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    stopped = llm.generate(prompt, max_new_tokens=16, temperature=0, stop_ids=[ids[cut]])[0]
    assert stopped.token_ids == ids[: cut + 1]  # the stop token is kept in the ids ...
    assert stopped.text == llm.tokenizer.decode(ids[:cut])  # ... but not in the text
    assert stopped.finish_reason == "stop"


def test_stop_string_is_cut_from_text(llm, greedy_run):
    prompt, completion = greedy_run
    text = completion.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    stopped = llm.generate(prompt, max_new_tokens=16, temperature=0, stop=[stop, "never seen"])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == text[: text.index(stop)]
    assert len(stopped.token_ids) < 16
    streamed = list(llm.stream(prompt, max_new_tokens=16, temperature=0, stop=stop))
    assert "".join(streamed) == stopped.text


def test_stream_yields_the_same_text(llm, greedy_run):
    prompt, completion = greedy_run
    deltas = list(llm.stream(prompt, max_new_tokens=16, temperature=0, stop_ids=[]))
    assert len(deltas) > 1
    assert "".join(deltas) == completion.text


def test_token_id_prompt_is_used_as_given(llm, greedy_run):
    prompt, completion = greedy_run
    ids = llm.encode(prompt)
    same = llm.generate([ids], max_new_tokens=16, temperature=0, stop_ids=[])[0]
    assert same.token_ids == completion.token_ids
    with_bos = llm.generate([[llm.tokenizer.bos_id, *ids]], max_new_tokens=1, temperature=0)[0]
    assert with_bos.prompt_tokens == len(ids) + 1


def test_chat_returns_assistant_content(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = llm.chat(messages, max_new_tokens=24, temperature=0)
    assert "Paris" in reply.text
    assert reply.finish_reason == "stop"
    assert reply.token_ids[-1] in llm.tokenizer.stop_ids
    assert "<|im_end|>" not in reply.text
    streamed = "".join(llm.stream(messages, max_new_tokens=24, temperature=0))
    assert streamed.strip() == reply.text.strip()


def test_prompt_longer_than_window_raises(llm):
    small = Llama(llm.model, llm.tokenizer, max_seq_len=8)
    long_prompt = list(range(100, 120))
    with pytest.raises(ValueError, match=r"20 tokens .* context window is 8.*truncate=True"):
        small.generate([long_prompt], max_new_tokens=2)
    truncated = small.generate([long_prompt], max_new_tokens=3, temperature=0, truncate=True)[0]
    assert truncated.prompt_tokens == 5 and len(truncated.token_ids) <= 3


def test_generation_is_capped_at_the_window(llm):
    small = Llama(llm.model, llm.tokenizer, max_seq_len=8)
    out = small.generate([[100, 101, 102, 103, 104, 105]], max_new_tokens=10, temperature=0)
    assert len(out[0].token_ids) <= 2
    capped = small.generate([[100, 101, 102, 103, 104, 105]], 10, temperature=0, stop_ids=[])
    assert len(capped[0].token_ids) == 2 and capped[0].finish_reason == "length"
    full = small.generate([list(range(100, 108))], max_new_tokens=4, temperature=0)[0]
    assert full.token_ids == [] and full.finish_reason == "length"


def test_last_only_returns_the_last_logits(tiny):
    tokens = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = tiny(tokens)
        last = tiny(tokens, last_only=True)
        cached = tiny(tokens, cache=KVCache.for_model(tiny, 2, 9), last_only=True)
    assert last.shape == cached.shape == (2, 1, 320)
    assert (last - full[:, -1:]).abs().max().item() <= 1e-5
    assert (cached - last).abs().max().item() <= 1e-5


def test_degenerate_requests(llm):
    assert llm.generate([], max_new_tokens=4) == []
    with pytest.raises(ValueError, match="at least one token"):
        llm.generate([[]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        llm.generate("Hi", max_new_tokens=-1)
    zero = llm.generate("Hi", max_new_tokens=0)[0]
    assert zero.token_ids == [] and zero.finish_reason == "length"


def test_load_quantized(smollm2_path):
    from herd.quantize import Int8Linear

    llm = Llama.load(smollm2_path, quantize="int8")
    assert isinstance(llm.model.layers["0"].attention.wq, Int8Linear)
    out = llm.generate("The capital of France is", max_new_tokens=4, temperature=0)[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    with pytest.raises(ValueError, match="int3"):
        Llama.load(smollm2_path, quantize="int3")
