"""GSM8K-style arithmetic word problems, generated from templates and deterministic by seed.

Every problem is a ``{"question", "answer"}`` row shaped like GSM8K: the answer has one line per step,
each with a calculator note ``<<expr=result>>result``, and ends with ``#### N``. All results are integers
and every number written in the question is used by some note.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

from cache.util import UserError, atomic_write_bytes

GENERATOR_VERSION = 1

_NAMES = [
    ("Maria", "she"), ("James", "he"), ("Aisha", "she"), ("Tom", "he"), ("Lena", "she"), ("Omar", "he"),
    ("Sofia", "she"), ("Ben", "he"), ("Priya", "she"), ("Leo", "he"), ("Nina", "she"), ("Carlos", "he"),
    ("Emma", "she"), ("Kenji", "he"), ("Grace", "she"), ("Ravi", "he"), ("Olivia", "she"), ("Sam", "he"),
    ("Zoe", "she"), ("Mateo", "he"), ("Chloe", "she"), ("Ivan", "he"), ("Hana", "she"), ("Noah", "he"),
]
_ITEMS = ["apples", "pencils", "stickers", "cookies", "marbles", "books", "cards", "flowers", "shells",
          "eggs", "bottles", "stamps", "cupcakes", "toy cars", "oranges", "candles"]
_SHOP_ITEMS = ["notebooks", "pens", "sandwiches", "tickets", "shirts", "mugs", "plants", "puzzles",
               "bags of rice", "pairs of socks", "candy bars", "comic books"]
_THINGS = ["bike", "lamp", "jacket", "game", "backpack", "watch", "chair", "camera", "guitar", "tent"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_JOBS = ["babysitting", "mowing lawns", "walking dogs", "tutoring", "washing cars", "painting fences"]
_ACTIVITIES = ["reading", "practicing piano", "jogging", "drawing", "studying", "gardening"]
_VEHICLES = ["car", "bus", "train", "truck", "van"]
_WIDGETS = ["toys", "bottles", "boxes", "bolts", "cans", "bricks"]
_MEALS = ["dinner", "lunch", "pizza", "breakfast"]
_MULTIPLES = {2: "twice", 3: "three times", 4: "four times"}

Problem = tuple[str, list[str], int]   # question, step lines, final answer


def _step(text: str, expr: str, value: int, tail: str, money: bool = False) -> str:
    """One answer line: ``text expr = <<expr=value>>value tail``."""
    cur = "$" if money else ""
    return f"{text}{expr} = {cur}<<{expr}={value}>>{value}{tail}"


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(_NAMES)


def _sold_multiple(rng: random.Random) -> Problem:
    name, _ = _person(rng)
    item = rng.choice(_ITEMS)
    m1, m2 = rng.sample(_MONTHS, 2)
    if rng.random() < 0.5:
        a = 2 * rng.randint(5, 60)
        second, expr, how = a // 2, f"{a}/2", "half as many"
    else:
        a = rng.randint(4, 60)
        f = rng.choice(list(_MULTIPLES))
        second, expr, how = a * f, f"{a}*{f}", f"{_MULTIPLES[f]} as many"
    total = a + second
    q = (f"{name} sold {a} {item} in {m1}, and then sold {how} {item} in {m2}. "
         f"How many {item} did {name} sell altogether in {m1} and {m2}?")
    steps = [_step(f"{name} sold ", expr, second, f" {item} in {m2}."),
             _step(f"{name} sold ", f"{a}+{second}", total, f" {item} altogether in {m1} and {m2}.")]
    return q, steps, total


def _wage_spend(rng: random.Random) -> Problem:
    name, he = _person(rng)
    r, h = rng.randint(8, 25), rng.randint(3, 20)
    earned = r * h
    s = rng.randint(5, earned - 1)
    thing = rng.choice(_THINGS)
    q = (f"{name} earns ${r} an hour {rng.choice(_JOBS)}. This week {he} worked {h} hours and then spent "
         f"${s} on a {thing}. How much money does {he} have left?")
    steps = [_step(f"{name} earned ", f"{r}*{h}", earned, " this week.", money=True),
             _step("After buying the " + thing + f", {he} has ", f"{earned}-{s}", earned - s, " left.",
                   money=True)]
    return q, steps, earned - s


def _change(rng: random.Random) -> Problem:
    name, he = _person(rng)
    item = rng.choice(_SHOP_ITEMS)
    n, p = rng.randint(2, 9), rng.randint(2, 15)
    cost = n * p
    bill = next(b for b in (20, 50, 100, 200) if b > cost)
    q = (f"{name} buys {n} {item} that cost ${p} each. {he.capitalize()} pays with a ${bill} bill. "
         f"How much change does {he} get?")
    steps = [_step(f"The {item} cost ", f"{n}*{p}", cost, " in total.", money=True),
             _step(f"{name} gets ", f"{bill}-{cost}", bill - cost, " in change.", money=True)]
    return q, steps, bill - cost


def _minutes_to_hours(rng: random.Random) -> Problem:
    name, he = _person(rng)
    act = rng.choice(_ACTIVITIES)
    m = rng.choice([15, 20, 30, 40, 45, 90])
    d = rng.choice([k for k in range(2, 31) if (m * k) % 60 == 0])
    total = m * d
    q = (f"{name} spends {m} minutes {act} every day. How many hours does {he} spend {act} "
         f"in {d} days?")
    steps = [_step(f"In {d} days {he} spends ", f"{m}*{d}", total, f" minutes {act}."),
             _step("That is ", f"{total}/60", total // 60, " hours.")]
    return q, steps, total // 60


def _distance(rng: random.Random) -> Problem:
    vehicle = rng.choice(_VEHICLES)
    s1, s2 = rng.randint(3, 14) * 5, rng.randint(3, 14) * 5
    h1, h2 = rng.randint(1, 6), rng.randint(1, 6)
    d1, d2 = s1 * h1, s2 * h2
    q = (f"A {vehicle} travels at {s1} miles per hour for {h1} hours, then at {s2} miles per hour for "
         f"{h2} hours. How many miles does it travel in total?")
    steps = [_step("First it travels ", f"{s1}*{h1}", d1, " miles."),
             _step("Then it travels ", f"{s2}*{h2}", d2, " miles."),
             _step("In total it travels ", f"{d1}+{d2}", d1 + d2, " miles.")]
    return q, steps, d1 + d2


def _give_away(rng: random.Random) -> Problem:
    name, he = _person(rng)
    item = rng.choice(_ITEMS)
    a, k = rng.randint(2, 12), rng.randint(2, 8)
    given = a * k
    x = given + rng.randint(1, 80)
    q = (f"{name} has {x} {item}. {he.capitalize()} gives {a} {item} to each of {k} friends. "
         f"How many {item} does {name} have left?")
    steps = [_step(f"{name} gives away ", f"{a}*{k}", given, f" {item}."),
             _step(f"{name} has ", f"{x}-{given}", x - given, f" {item} left.")]
    return q, steps, x - given


def _savings(rng: random.Random) -> Problem:
    name, he = _person(rng)
    s, w = rng.randint(5, 40), rng.randint(4, 20)
    saved = s * w
    t1, t2 = rng.sample(_THINGS, 2)
    c1 = rng.randint(5, saved // 2)
    c2 = rng.randint(1, saved - c1)
    spent = c1 + c2
    q = (f"{name} saves ${s} every week for {w} weeks. Then {he} buys a {t1} for ${c1} and a {t2} for "
         f"${c2}. How much money does {he} have left?")
    steps = [_step(f"{name} saves ", f"{s}*{w}", saved, ".", money=True),
             _step(f"{he.capitalize()} spends ", f"{c1}+{c2}", spent, ".", money=True),
             _step(f"{he.capitalize()} has ", f"{saved}-{spent}", saved - spent, " left.", money=True)]
    return q, steps, saved - spent


def _discount(rng: random.Random) -> Problem:
    thing = rng.choice(_THINGS)
    d = rng.choice([10, 20, 25, 30, 40, 50])
    p = rng.randint(2, 30) * 20
    off = p * d // 100
    q = f"A {thing} costs ${p}. It is on sale for {d}% off. What is the sale price of the {thing}?"
    steps = [_step("The discount is ", f"{p}*{d}/100", off, ".", money=True),
             _step("The sale price is ", f"{p}-{off}", p - off, ".", money=True)]
    return q, steps, p - off


def _compare(rng: random.Random) -> Problem:
    (a, _), (b, _), (c, _) = rng.sample(_NAMES, 3)
    item = rng.choice(_ITEMS)
    n, f = rng.randint(3, 30), rng.choice(list(_MULTIPLES))
    nb = n * f
    k = rng.randint(1, nb - 1)
    nc = nb - k
    q = (f"{a} has {n} {item}. {b} has {f} times as many {item} as {a}, and {c} has {k} fewer {item} "
         f"than {b}. How many {item} do they have in total?")
    steps = [_step(f"{b} has ", f"{n}*{f}", nb, f" {item}."),
             _step(f"{c} has ", f"{nb}-{k}", nc, f" {item}."),
             _step("Together they have ", f"{n}+{nb}+{nc}", n + nb + nc, f" {item}.")]
    return q, steps, n + nb + nc


def _boxes(rng: random.Random) -> Problem:
    item = rng.choice(_ITEMS)
    n, k = rng.randint(2, 25), rng.randint(2, 24)
    q = f"There are {n} boxes with {k} {item} in each box. How many {item} are there in all?"
    return q, [_step("There are ", f"{n}*{k}", n * k, f" {item}.")], n * k


def _machine_rate(rng: random.Random) -> Problem:
    widget = rng.choice(_WIDGETS)
    m = rng.choice([5, 10, 12, 15, 20, 30])
    r, h = rng.randint(2, 20), rng.randint(1, 8)
    minutes = h * 60
    batches = minutes // m
    q = (f"A machine makes {r} {widget} every {m} minutes. How many {widget} does it make in "
         f"{h} hours?")
    steps = [_step(f"{h} hours is ", f"{h}*60", minutes, " minutes."),
             _step("The machine runs ", f"{minutes}/{m}", batches, " times."),
             _step("It makes ", f"{batches}*{r}", batches * r, f" {widget}.")]
    return q, steps, batches * r


def _two_items_price(rng: random.Random) -> Problem:
    name, he = _person(rng)
    i1, i2 = rng.sample(_SHOP_ITEMS, 2)
    a, b, p = rng.randint(1, 12), rng.randint(1, 12), rng.randint(2, 20)
    n = a + b
    q = f"{name} bought {a} {i1} and {b} {i2}. Each one costs ${p}. How much did {he} spend?"
    steps = [_step(f"{name} bought ", f"{a}+{b}", n, " things."),
             _step(f"{he.capitalize()} spent ", f"{n}*{p}", n * p, ".", money=True)]
    return q, steps, n * p


def _split_bill(rng: random.Random) -> Problem:
    k = rng.randint(2, 8)
    meal = rng.choice(_MEALS)
    total = k * rng.randint(6, 40)
    t = rng.randint(2, total // 4)
    b = total - t
    q = (f"{k} friends share a {meal} bill of ${b} and a tip of ${t} equally. "
         f"How much does each friend pay?")
    steps = [_step("The total is ", f"{b}+{t}", total, ".", money=True),
             _step("Each friend pays ", f"{total}/{k}", total // k, ".", money=True)]
    return q, steps, total // k


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _sold_multiple, _wage_spend, _change, _minutes_to_hours, _distance, _give_away, _savings, _discount,
    _compare, _boxes, _machine_rate, _two_items_price, _split_bill,
)


def iter_problems(seed: int) -> Iterator[dict[str, str]]:
    """An endless, seed-deterministic stream of ``{"question", "answer"}`` rows (duplicates possible)."""
    rng = random.Random(f"fnet-distill-demo-problems:{GENERATOR_VERSION}:{seed}")
    while True:
        question, steps, final = rng.choice(TEMPLATES)(rng)
        yield {"question": question, "answer": "\n".join(steps) + f"\n#### {final}"}


def generate_splits(n_train: int, n_test: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """``n_train`` and ``n_test`` distinct problems; no question text appears in both splits."""
    if n_train < 1 or n_test < 1:
        raise UserError(f"n_train={n_train}, n_test={n_test}; both must be at least 1")
    seen: set[str] = set()
    rows: list[dict] = []
    budget = 20 * (n_train + n_test) + 1000
    for row in iter_problems(seed):
        budget -= 1
        if budget < 0:
            raise UserError(f"could not generate {n_train + n_test} distinct problems; ask for fewer")
        if row["question"] in seen:
            continue
        seen.add(row["question"])
        rows.append(row)
        if len(rows) == n_train + n_test:
            break
    return rows[n_test:], rows[:n_test]


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write rows as JSONL (one object per line, GSM8K's field names), atomically."""
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
