"""GSM8K-style arithmetic word problems, generated from templates and deterministic by seed.

Every problem is a ``{"question", "answer"}`` row shaped like GSM8K: the answer has one line per step,
each with a calculator note ``<<expr=result>>result``, and ends with ``#### N``. All results are integers
and every number written in the question is used by some note.

The problems are short and their numbers small (one step of addition or subtraction below 50, or of a
product or quotient of numbers 2-6; two-step problems chain two of those), so that a teacher of a few million
parameters trained for minutes on a CPU solves most of them, while the answer still has to be computed from
numbers that are read out of the question. Like GSM8K's, the solutions are not one fixed text per question:
each line picks one of two phrasings and a commutative product or sum one of its two operand orders, so
the reference answer is one sample of several correct ones. ``GENERATOR_VERSION`` is part of every
fingerprint that depends on the text (the demo assets and the shipped teacher): bump it whenever the output
of a seed changes.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from cache.util import UserError, atomic_write_bytes

GENERATOR_VERSION = 4
TEST_SHARE = 8

_NAMES = [
    ("Maria", "she"), ("James", "he"), ("Aisha", "she"), ("Tom", "he"), ("Lena", "she"), ("Omar", "he"),
    ("Sofia", "she"), ("Ben", "he"), ("Priya", "she"), ("Leo", "he"), ("Nina", "she"), ("Carlos", "he"),
    ("Emma", "she"), ("Kenji", "he"), ("Grace", "she"), ("Ravi", "he"), ("Olivia", "she"), ("Sam", "he"),
]
_ITEMS = ["apples", "pencils", "stickers", "cookies", "marbles", "books", "cards", "flowers", "shells",
          "eggs", "stamps", "oranges"]
_SHOP_ITEMS = ["notebooks", "pens", "sandwiches", "tickets", "mugs", "plants", "puzzles", "candy bars"]
_CONTAINERS = ["boxes", "bags", "baskets", "jars"]

Problem = tuple[str, list[str], int]   # question, step lines, final answer


def _step(text: str, expr: str, value: int, tail: str, money: bool = False) -> str:
    """One answer line: ``text expr = <<expr=value>>value tail``."""
    cur = "$" if money else ""
    return f"{text}{expr} = {cur}<<{expr}={value}>>{value}{tail}"


def _either(rng: random.Random, a: int, op: str, b: int) -> str:
    """``a op b``, or ``b op a`` half of the time for a commutative ``op`` (solutions vary like GSM8K's)."""
    return f"{b}{op}{a}" if op in "+*" and rng.random() < 0.5 else f"{a}{op}{b}"


# Level 1: one step.

def _finds_more(rng: random.Random) -> Problem:
    (name, he), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    q = f"{name} has {a} {item}. {he.capitalize()} finds {b} more. How many {item} does {name} have now?"
    text = rng.choice([f"{name} has ", "Now there are "])
    return q, [_step(text, _either(rng, a, "+", b), a + b, f" {item}.")], a + b


def _gives_away(rng: random.Random) -> Problem:
    (name, _), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a = rng.randint(5, 30)
    b = rng.randint(2, a - 1)
    q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
    text = rng.choice([f"{name} has ", "There are "])
    return q, [_step(text, f"{a}-{b}", a - b, f" {item} left.")], a - b


def _containers(rng: random.Random) -> Problem:
    item, box = rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    n, k = rng.randint(2, 6), rng.randint(2, 6)
    q = f"There are {n} {box} with {k} {item} in each. How many {item} are there in all?"
    text = rng.choice(["There are ", "In all there are "])
    return q, [_step(text, _either(rng, n, "*", k), n * k, f" {item}.")], n * k


def _share(rng: random.Random) -> Problem:
    (name, _), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    k, each = rng.randint(2, 6), rng.randint(2, 6)
    total = k * each
    q = f"{name} shares {total} {item} equally among {k} friends. How many {item} does each friend get?"
    text = rng.choice(["Each friend gets ", "Each gets "])
    return q, [_step(text, f"{total}/{k}", each, f" {item}.")], each


# Level 2: two steps, each of level 1.

def _change(rng: random.Random) -> Problem:
    (name, he), item = rng.choice(_NAMES), rng.choice(_SHOP_ITEMS)
    n, p = rng.randint(2, 6), rng.randint(2, 6)
    cost = n * p
    bill = next(b for b in (20, 50) if b > cost)
    q = f"{name} buys {n} {item} at ${p} each and pays with ${bill}. How much change does {he} get?"
    steps = [_step(rng.choice([f"The {item} cost ", "The cost is "]), _either(rng, n, "*", p), cost, ".",
                   money=True),
             _step(rng.choice([f"{name} gets ", "The change is "]), f"{bill}-{cost}", bill - cost, ".",
                   money=True)]
    return q, steps, bill - cost


def _bags_and_loose(rng: random.Random) -> Problem:
    (name, _), item, box = rng.choice(_NAMES), rng.choice(_ITEMS), rng.choice(_CONTAINERS)
    n, k, c = rng.randint(2, 6), rng.randint(2, 6), rng.randint(2, 15)
    q = f"{name} has {n} {box} of {k} {item} and {c} loose {item}. How many {item} does {name} have?"
    steps = [_step(rng.choice([f"The {box} hold ", f"In the {box} there are "]),
                   _either(rng, n, "*", k), n * k, f" {item}."),
             _step(rng.choice([f"{name} has ", "In all there are "]), _either(rng, n * k, "+", c), n * k + c,
                   f" {item}.")]
    return q, steps, n * k + c


def _buys_then_gives(rng: random.Random) -> Problem:
    (name, he), item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    c = rng.randint(2, a + b - 1)
    q = (f"{name} has {a} {item}. {he.capitalize()} buys {b} more and then gives away {c}. "
         f"How many {item} does {name} have now?")
    steps = [_step(rng.choice(["After buying, ", f"{name} then has "]), _either(rng, a, "+", b), a + b,
                   f" {item}."),
             _step(rng.choice([f"{name} has ", "Now there are "]), f"{a + b}-{c}", a + b - c, f" {item}.")]
    return q, steps, a + b - c


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _finds_more, _gives_away, _containers, _share, _change, _bags_and_loose, _buys_then_gives,
)


def iter_problems(seed: int, stream: str = "") -> Iterator[dict[str, str]]:
    """An endless, seed-deterministic stream of ``{"question", "answer"}`` rows (duplicates possible).

    ``stream`` names another independent stream of the same seed (the teacher's training pool uses one)."""
    rng = random.Random(f"fnet-distill-demo-problems:{GENERATOR_VERSION}:{seed}:{stream}")
    while True:
        question, steps, final = rng.choice(TEMPLATES)(rng)
        yield {"question": question, "answer": "\n".join(steps) + f"\n#### {final}"}


def is_test_question(question: str) -> bool:
    """Whether a question belongs to the held-out side (about 1 in ``TEST_SHARE``), by a hash of its text.

    A fixed rule rather than a position in a stream, so no training set of any size or stream (the students'
    split, the teacher's pool) can contain a question of any test split."""
    return int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) % TEST_SHARE == 0


def generate_splits(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``n_train`` and ``n_test`` distinct problems of the stream of ``seed``, the test ones held out
    (``is_test_question``), so no question text appears in both splits."""
    if n_train < 1 or n_test < 1:
        raise UserError(f"n_train={n_train}, n_test={n_test}; both must be at least 1")
    seen: set[str] = set()
    train: list[dict] = []
    test: list[dict] = []
    budget = 20 * TEST_SHARE * (n_train + n_test) + 1000
    for row in iter_problems(seed):
        budget -= 1
        if budget < 0:
            raise UserError(f"could not generate {n_train} + {n_test} distinct problems; ask for fewer")
        if row["question"] in seen:
            continue
        seen.add(row["question"])
        side, want = (test, n_test) if is_test_question(row["question"]) else (train, n_train)
        if len(side) < want:
            side.append(row)
        if len(train) == n_train and len(test) == n_test:
            break
    return train, test


def teacher_pool(n: int, seed: int) -> list[dict]:
    """``n`` problems (repeats possible) of an independent stream of ``seed`` with every held-out question
    left out: the teacher's own training data, larger than the students' training split."""
    pool = (row for row in iter_problems(seed, stream="teacher") if not is_test_question(row["question"]))
    return [next(pool) for _ in range(n)]


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSONL (one object per line, GSM8K's field names), atomically."""
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def written_questions(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` distinct problems of another independent stream of ``seed`` for the teacher to answer: no
    held-out question and none of ``exclude`` (the students' training split). Their answers are kept so a
    report can measure the teacher's accuracy on what it wrote; the demo does not use them to keep
    solutions."""
    seen: set[str] = set(exclude)
    out: list[dict] = []
    budget = 50 * n + 1000
    for row in iter_problems(seed, stream="written"):
        budget -= 1
        if budget < 0:
            raise UserError(f"could not generate {n} distinct questions to write on; ask for fewer")
        q = row["question"]
        if q in seen or is_test_question(q):
            continue
        seen.add(q)
        out.append(row)
        if len(out) == n:
            break
    return out
