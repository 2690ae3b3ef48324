"""A deterministic supervised fine-tuning set of small Python tasks in one fixed answer shape (issue 16).

The behaviour taught: every answer is exactly one fenced ```python block defining the asked function with
full type hints and a docstring, nothing else (:func:`eft_jax.experiments.humaneval.answer_shape`). The
tasks are templated families with parameters (lists, strings, numbers, dicts), none taken from HumanEval;
each task carries a few asserts whose expected values come from an independent Python reference of the
family (not from the emitted code), so running ``solution + asserts`` checks the emitted solution.

Half of the tasks (alternating) ask in words ("Write a function named ... that ..."), the other half in
HumanEval's chat form (:data:`humaneval.INSTRUCTION` and an unannotated stub with a docstring in a code
block), so the shape carries over to HumanEval prompts: the answer adds the type hints the stub lacks.

``write_sft(path)`` writes ``{"messages": [user, assistant], "id", "asserts"}`` JSONL records, the form
``eft_jax.train.data.jsonl_dataset`` reads (extra keys are ignored there).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eft_jax.experiments.humaneval import INSTRUCTION

_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten",
          11: "eleven", 12: "twelve"}
_ASKS = ("Write a Python function named {name}.", "Implement the Python function {name}.",
         "Please write {name} in Python.", "Define a Python function called {name}.")


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: the function ``name``, its typed ``args`` ``[(name, type, words)]``, ``returns`` (type),
    the ``doc`` (one sentence), the ``body`` (indented source lines), ``inputs`` (argument tuples for the
    asserts) and ``ref`` (an independent reference computing the expected values)."""

    name: str
    args: tuple[tuple[str, str, str], ...]
    returns: str
    doc: str
    body: tuple[str, ...]
    inputs: tuple[tuple[Any, ...], ...]
    ref: Callable[..., Any]

    def solution(self) -> str:
        sig = ", ".join(f"{a}: {t}" for a, t, _ in self.args)
        return "\n".join([f"def {self.name}({sig}) -> {self.returns}:", f'    """{self.doc}"""', *self.body]) + "\n"

    def stub(self) -> str:
        """The signature without type hints and the docstring (HumanEval's prompt form)."""
        sig = ", ".join(a for a, _, _ in self.args)
        return f'def {self.name}({sig}):\n    """{self.doc}"""\n'

    def answer(self) -> str:
        return f"```python\n{self.solution()}```"

    def asserts(self) -> list[str]:
        return [f"assert {self.name}({', '.join(repr(x) for x in args)}) == {self.ref(*args)!r}" for args in self.inputs]

    def request(self, index: int) -> str:
        if index % 2:
            return f"{INSTRUCTION}\n\n```python\n{self.stub().rstrip()}\n```"
        ask = _ASKS[(index // 2) % len(_ASKS)].format(name=self.name)
        takes = " and ".join(w for _, _, w in self.args)
        return f"{ask} It takes {takes}. {self.doc}"


LISTS = ([3, -1, 4, 1, -5, 9, 2, 6], [], [10, 20, 30], [7], [-2, -4, 0, 5, 8, 12])
STRINGS = ("hello world", "", "banana bread", "Mississippi", "a quick brown fox jumps")
L = "numbers (a list of integers)"
S = "text (a string)"


def _families() -> list[Callable[[int], Task]]:
    fams: list[Callable[[int], Task]] = []

    def family(f: Callable[[int], Task]) -> Callable[[int], Task]:
        fams.append(f)
        return f

    @family
    def scale(k: int) -> Task:
        return Task(f"multiply_each_by_{_WORDS[k]}", (("numbers", "list[int]", L),), "list[int]",
                    f"Return a new list with every number multiplied by {k}.", (f"    return [x * {k} for x in numbers]",),
                    tuple((x,) for x in LISTS), lambda xs: list(map(lambda v: v * k, xs)))  # noqa: C417

    @family
    def count_div(k: int) -> Task:
        return Task(f"count_divisible_by_{_WORDS[k]}", (("numbers", "list[int]", L),), "int",
                    f"Return how many of the numbers are divisible by {k}.",
                    (f"    return sum(1 for x in numbers if x % {k} == 0)",),
                    tuple((x,) for x in LISTS), lambda xs: len([v for v in xs if v % k == 0]))

    @family
    def above(k: int) -> Task:
        return Task(f"keep_above_{_WORDS[k]}", (("numbers", "list[int]", L),), "list[int]",
                    f"Return the numbers greater than {k}, in their original order.",
                    (f"    return [x for x in numbers if x > {k}]",),
                    tuple((x,) for x in LISTS), lambda xs: list(filter(lambda v: v > k, xs)))

    @family
    def power_sum(k: int) -> Task:
        return Task(f"sum_of_powers_{_WORDS[k]}", (("numbers", "list[int]", L),), "int",
                    f"Return the sum of each number raised to the power {k}.",
                    (f"    return sum(x ** {k} for x in numbers)",),
                    tuple((x,) for x in LISTS), lambda xs: sum(pow(v, k) for v in xs))

    @family
    def chunks(k: int) -> Task:
        return Task(f"split_into_groups_of_{_WORDS[k]}", (("items", "list[int]", "items (a list of integers)"),),
                    "list[list[int]]",
                    f"Split the items into consecutive groups of {k}; the last group may be shorter.",
                    (f"    return [items[i:i + {k}] for i in range(0, len(items), {k})]",),
                    tuple((x,) for x in LISTS),
                    lambda xs: [list(xs[i * k:(i + 1) * k]) for i in range(-(-len(xs) // k))])

    @family
    def every_kth(k: int) -> Task:
        return Task(f"every_{_WORDS[k]}_th_item", (("items", "list[int]", "items (a list of integers)"),), "list[int]",
                    f"Return every {k}-th item, starting with the first one.", (f"    return items[::{k}]",),
                    tuple((x,) for x in LISTS), lambda xs: [v for i, v in enumerate(xs) if i % k == 0])

    @family
    def clamp(k: int) -> Task:
        return Task(f"clamp_to_plus_minus_{_WORDS[k]}", (("numbers", "list[int]", L),), "list[int]",
                    f"Return the numbers with each value limited to the range from -{k} to {k}.",
                    (f"    return [min(max(x, -{k}), {k}) for x in numbers]",),
                    tuple((x,) for x in LISTS), lambda xs: [(-k if v < -k else k if v > k else v) for v in xs])  # noqa: FURB136

    @family
    def repeat_chars(k: int) -> Task:
        return Task(f"repeat_each_letter_{_WORDS[k]}_times", (("text", "str", S),), "str",
                    f"Return the text with every character repeated {k} times.",
                    (f"    return ''.join(ch * {k} for ch in text)",),
                    tuple((s,) for s in STRINGS), lambda s: "".join(c for c in s for _ in range(k)))

    @family
    def caesar(k: int) -> Task:
        return Task(f"shift_letters_by_{_WORDS[k]}", (("text", "str", S),), "str",
                    f"Shift every lowercase letter {k} places forward in the alphabet, wrapping from z to a; "
                    "keep other characters.",
                    ("    out = []", "    for ch in text:", "        if 'a' <= ch <= 'z':",
                     f"            ch = chr((ord(ch) - ord('a') + {k}) % 26 + ord('a'))", "        out.append(ch)",
                     "    return ''.join(out)"),
                    tuple((s,) for s in STRINGS),
                    lambda s: s.translate(str.maketrans("abcdefghijklmnopqrstuvwxyz",
                                                        "abcdefghijklmnopqrstuvwxyz"[k:] + "abcdefghijklmnopqrstuvwxyz"[:k])))

    @family
    def long_words(k: int) -> Task:
        return Task(f"words_longer_than_{_WORDS[k]}", (("text", "str", S),), "list[str]",
                    f"Return the words of the text (split on whitespace) that have more than {k} characters.",
                    (f"    return [w for w in text.split() if len(w) > {k}]",),
                    tuple((s,) for s in STRINGS + ("extraordinary tiny elephants",)),
                    lambda s: list(filter(lambda w: len(w) > k, s.split())))

    @family
    def pad(k: int) -> Task:
        return Task(f"pad_left_to_{_WORDS[k]}", (("text", "str", S),), "str",
                    f"Return the text padded on the left with '*' to at least {k} characters.",
                    (f"    return text.rjust({k}, '*')",),
                    tuple((s,) for s in STRINGS + ("ab",)), lambda s: "*" * max(0, k - len(s)) + s)

    @family
    def truncate(k: int) -> Task:
        return Task(f"first_{_WORDS[k]}_characters", (("text", "str", S),), "str",
                    f"Return the first {k} characters of the text (all of it when shorter).",
                    (f"    return text[:{k}]",), tuple((s,) for s in STRINGS), lambda s: "".join(list(s)[:k]))

    @family
    def digit_sum(k: int) -> Task:
        return Task(f"digit_sum_base_{_WORDS[k]}", (("n", "int", "n (a non-negative integer)"),), "int",
                    f"Return the sum of the digits of n written in base {k}.",
                    ("    total = 0", "    while n > 0:", f"        total += n % {k}", f"        n //= {k}",
                     "    return total"),
                    ((0,), (1,), (37,), (255,), (1000,)),
                    lambda n: sum(int(d, 36) for d in _to_base(n, k)))

    @family
    def is_multiple(k: int) -> Task:
        return Task(f"is_multiple_of_{_WORDS[k]}", (("n", "int", "n (an integer)"),), "bool",
                    f"Return True when n is a multiple of {k}, else False.", (f"    return n % {k} == 0",),
                    ((0,), (k,), (k + 1,), (-2 * k,), (97,)), lambda n: (n // k) * k == n)

    @family
    def triangle(k: int) -> Task:
        return Task(f"sum_of_first_multiples_of_{_WORDS[k]}", (("count", "int", "count (a non-negative integer)"),),
                    "int", f"Return the sum of the first count positive multiples of {k}.",
                    (f"    return sum({k} * i for i in range(1, count + 1))",),
                    ((0,), (1,), (4,), (10,)), lambda c: k * c * (c + 1) // 2)

    @family
    def seq(k: int) -> Task:
        return Task(f"sequence_term_start_{_WORDS[k]}", (("index", "int", "index (a non-negative integer)"),), "int",
                    f"Return term number index (from 0) of the sequence that starts {k}, {k} and continues "
                    "with the sum of the two previous terms.",
                    (f"    a, b = {k}, {k}", "    for _ in range(index):", "        a, b = b, a + b", "    return a"),
                    ((0,), (1,), (2,), (5,), (10,)), lambda i: k * _fib(i + 1))

    @family
    def dict_above(k: int) -> Task:
        return Task(f"keys_with_value_above_{_WORDS[k]}",
                    (("scores", "dict[str, int]", "scores (a dictionary from names to integers)"),), "list[str]",
                    f"Return the keys whose value is greater than {k}, sorted alphabetically.",
                    (f"    return sorted(name for name, value in scores.items() if value > {k})",),
                    (({"ann": 3, "bob": 11, "cy": 7},), ({},), ({"z": 100, "a": 100, "m": -1},)),
                    lambda d: sorted(filter(lambda key: d[key] > k, d)))

    @family
    def dict_add(k: int) -> Task:
        return Task(f"add_{_WORDS[k]}_to_values", (("counts", "dict[str, int]", "counts (a dictionary from strings to integers)"),), "dict[str, int]",
                    f"Return a new dictionary with {k} added to every value.",
                    (f"    return {{key: value + {k} for key, value in counts.items()}}",),
                    (({"a": 1, "b": -3},), ({},), ({"x": 0},)), lambda d: dict(zip(d, [v + k for v in d.values()])))

    @family
    def group_len(k: int) -> Task:
        return Task(f"group_words_by_length_up_to_{_WORDS[k]}", (("words", "list[str]", "words (a list of strings)"),),
                    "dict[int, list[str]]",
                    f"Group the words of at most {k} characters by their length, keeping their order; "
                    f"longer words are left out.",
                    ("    groups: dict[int, list[str]] = {}", "    for word in words:",
                     f"        if len(word) <= {k}:", "            groups.setdefault(len(word), []).append(word)",
                     "    return groups"),
                    ((["a", "bb", "cc", "dddddddddddddd", "e"],), ([],), (["python", "is", "fun"],)),
                    lambda ws: {n: [w for w in ws if len(w) == n] for n in sorted({len(w) for w in ws if len(w) <= k},
                                                                                  key=[len(w) for w in ws].index)})

    @family
    def window_max(k: int) -> Task:
        return Task(f"largest_sum_of_{_WORDS[k]}_in_a_row", (("numbers", "list[int]", L),), "int",
                    f"Return the largest sum of {k} consecutive numbers, or 0 when there are fewer than {k}.",
                    (f"    if len(numbers) < {k}:", "        return 0",
                     f"    return max(sum(numbers[i:i + {k}]) for i in range(len(numbers) - {k} + 1))"),
                    tuple((x,) for x in LISTS),
                    lambda xs: 0 if len(xs) < k else max(map(sum, zip(*(xs[j:] for j in range(k))))))

    return fams


def _to_base(n: int, base: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while n:
        n, r = divmod(n, base)
        out = digits[r] + out
    return out or "0"


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


PARAMETERS = tuple(range(2, 13))  # every family at 11 parameters: 20 x 11 = 220 tasks


def tasks() -> list[Task]:
    """Every task, in a fixed order (family by family)."""
    return [fam(k) for fam in _families() for k in PARAMETERS]


def records() -> list[dict[str, Any]]:
    """The chat records, deterministic: ``id``, ``messages`` (user request, assistant answer), ``asserts``."""
    return [{"id": f"code-sft/{i}", "messages": [{"role": "user", "content": t.request(i)},
                                                 {"role": "assistant", "content": t.answer()}],
             "asserts": t.asserts()} for i, t in enumerate(tasks())]


def write_sft(path: str | os.PathLike) -> int:
    """Write :func:`records` as JSONL (atomically); returns the number of records."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = records()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)
    return len(rows)
