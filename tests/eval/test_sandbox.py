"""The code sandbox: HumanEval's canonical solutions all pass, wrong ones fail, and hostile
programs (endless loops, fork bombs, writes outside the sandbox, memory bombs, sockets, native
code) are stopped and counted as failures without harming the run; pass@k against the
binomial formula."""

from __future__ import annotations

import math
import time

import pytest

from herd.eval.sandbox import run_program
from herd.eval.score import pass_at_k
from herd.eval.tasks import humaneval


def test_canonical_humaneval_solutions_pass_and_wrong_ones_fail():
    problems = humaneval(0)
    assert len(problems) == 164
    assert all(run_program(p.program(p.canonical)).passed for p in problems)
    wrong = [run_program(p.program("    return None\n")) for p in problems[:10]]
    assert not any(o.passed for o in wrong)


@pytest.mark.parametrize(
    "program, reason",
    [
        ("while True:\n    pass\n", None),  # stopped at the time limit
        ("import os\nwhile True:\n    os.fork()\n", "sandbox: os.fork"),
        ("import subprocess\nsubprocess.run(['true'], check=True)\n", "sandbox: subprocess"),
        ("import os\nassert os.system('true') == 0\n", "sandbox: os.system"),
        ("x = bytearray(10 * 2**30)\n", "MemoryError"),
        ("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "sandbox: socket"),
        ("import ctypes\nctypes.CDLL(None)\n", "sandbox: ctypes"),
    ],
)
def test_hostile_programs_fail_in_time(program, reason):
    start = time.monotonic()
    outcome = run_program(program, timeout=3)
    assert not outcome.passed
    assert outcome.status == "timeout" if reason is None else reason in outcome.output
    assert time.monotonic() - start < 10


def test_writes_outside_the_sandbox_are_refused(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("keep me")
    for program in (
        f"open({str(target)!r}, 'w').write('gone')\n",
        f"import os\nos.remove({str(target)!r})\n",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_TRUNC)\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
    ):
        assert not run_program(program).passed
    assert target.read_text() == "keep me"
    # inside its own directory a program may write
    assert run_program(
        "open('scratch.txt', 'w').write('ok')\nassert open('scratch.txt').read() == 'ok'\n"
    ).passed


def test_pass_at_k_is_the_unbiased_estimator():
    for n, c, k in [(10, 3, 1), (10, 3, 5), (20, 0, 3), (5, 5, 2), (200, 17, 10), (7, 6, 3)]:
        expected = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)


def test_code_metrics_score_what_the_model_completes():
    """The canonical solution for even problems and a wrong body for odd ones: pass@1 is
    exactly one half."""
    from herd.eval.score import code_metrics

    problems = humaneval(0)[:6]
    outputs = [p.canonical if i % 2 == 0 else "    return 0\n" for i, p in enumerate(problems)]
    result = code_metrics(problems, outputs)
    assert result["pass@1"]["mean"] == 0.5 and result["pass@1"]["n"] == 6
    assert [r["status"] for r in result["records"]] == ["passed", "failed"] * 3


def test_chat_replies_run_their_fenced_code():
    """A reply that writes the whole function in a fenced block replaces the prompt's stub;
    prose around the block is ignored; a reply with the wrong function leaves the stub."""
    from herd.eval.score import code_metrics

    problems = humaneval(0)[:4]
    replies = [f"Here it is:\n```python\n{p.prompt}{p.canonical}```\nDone." for p in problems]
    assert code_metrics(problems, replies, replies=True)["pass@1"]["mean"] == 1.0
    wrong = ["Sure!\n```python\ndef unrelated():\n    return 1\n```"] * 4
    assert code_metrics(problems, wrong, replies=True)["pass@1"]["mean"] == 0.0
