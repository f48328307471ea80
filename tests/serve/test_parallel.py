"""Tensor-parallel inference on the CPU (gloo, torchrun, 2 processes): greedy output, offline
and served, is the one-process output token for token; sampling agrees across the ranks; each
rank holds about half the weights."""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from herd.infer import Llama
from herd.infer.parallel import tensor_parallel, weight_bytes
from tests.conftest import hf_llama
from tests.serve.test_api import free_port
from tests.serve.tp_worker import NEW, PROMPTS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp-model")
    hf_llama(vocab_size=128256, n_heads=8, n_kv_heads=4).save_pretrained(path)
    ranks = importlib.resources.files("llama_models.llama3") / "tokenizer.model"
    shutil.copy(str(ranks), path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def ranks(model_dir, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("tp-out") / "result"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "tests.serve.tp_worker", str(model_dir), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(out.with_name(f"result.{r}.json").read_text()) for r in range(2)]


def test_greedy_output_equals_one_process(model_dir, ranks):
    alone = Llama.load(model_dir)
    expected = [
        c.token_ids for c in alone.generate(PROMPTS, max_new_tokens=NEW, temperature=0, stop_ids=())
    ]
    assert all(len(ids) == NEW for ids in expected)
    for rank in ranks:
        assert rank["greedy"] == expected
    assert ranks[0]["served"] == expected


def test_sampling_agrees_across_ranks(model_dir, ranks):
    assert ranks[0]["unseeded"] == ranks[1]["unseeded"]
    assert ranks[0]["seeded"] == ranks[1]["seeded"]
    alone = Llama.load(model_dir)
    seeded = alone.generate(PROMPTS, NEW, temperature=1.0, top_p=1.0, seed=5, stop_ids=())
    assert ranks[0]["seeded"] == [c.token_ids for c in seeded]


def test_each_rank_holds_half_the_weights(model_dir, ranks):
    full = weight_bytes(Llama.load(model_dir).model)
    for rank in ranks:
        assert 0.45 * full < rank["weight_bytes"] < 0.55 * full


def test_tensor_parallel_needs_a_matching_torchrun_job(model_dir):
    with pytest.raises(ValueError, match="torchrun job of 2"):
        tensor_parallel(Llama.load(model_dir).model, 2)


def test_herd_serve_tp_answers_like_one_process_and_stops_cleanly(model_dir):
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node=2", "-m", "herd", "serve", "--tp", "2", "--model"]
    command += [str(model_dir), "--port", str(port), "--max-seq-len", "64", "--kv-cache-mib", "8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "herd serve --tp 2 did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        body = {"prompt": PROMPTS[1], "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
        served = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        # SIGTERM to rank 0 stops the server; to torchrun, which then kills every rank.
        os.kill(rank_zero(proc.pid), signal.SIGTERM)
        assert proc.wait(60) == 0, proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    alone = Llama.load(model_dir).generate(
        [PROMPTS[1]], max_new_tokens=NEW, temperature=0, stop_ids=()
    )
    assert served["choices"][0]["text"] == alone[0].text
    assert served["usage"]["completion_tokens"] == NEW


def rank_zero(launcher: int) -> int:
    """The pid of the worker with RANK=0 among torchrun's children."""
    for proc in Path("/proc").iterdir():
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if parent == launcher and b"RANK=0" in environ:
            return int(proc.name)
    raise AssertionError("no rank-0 worker found")
