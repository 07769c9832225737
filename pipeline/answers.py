"""GSM8K answer extraction and scoring (no model code).

- reference: the text after ``####`` in the dataset's ``answer`` field;
- strict match: the output contains ``#### <number>`` (the first such marker counts; a longer run of ``#``
  such as ``##### 5`` is the same marker) equal to the reference;
- flexible match: the last number anywhere in the output equals the reference, also when it is glued to
  the text before it (``The answer is72``, ``所以答案是72``, the ``3`` in ``7x3=21``).

Numbers compare as exact decimals after removing thousands separators and a ``$`` sign, so ``1,000`` ==
``1000``, ``3.50`` == ``3.5``, ``$12`` == ``12`` and ``18.`` (a sentence-final period) == ``18``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from cache.util import UserError

# Digits not continuing a number on the left (no digit or decimal point just before them; a letter may be:
# "is72", "答案是72", "7x3"). A "-" or "$" sign counts only when it is not glued to a word or number on the
# left (so "3-4" is 3 and 4, not 3 and -4); the sign may come before or after "$". Digits with proper
# thousands groups ("1,234,567") or none; optional decimals. A trailing "." with no digit after it (end of
# a sentence) is not part of the number.
_NUMBER = re.compile(r"(?:(?<![\w.])(-)?\$(-)?|(?<![\w.])(-)|(?<![\d.]))"  # sign / "$" / bare digits
                     r"(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d)")
_MARKER = re.compile(r"#{4,}\s*")


def parse_number(text: str) -> Decimal | None:
    """The number a whole answer string denotes (``"$1,000.50"`` -> 1000.50), or None if it is not one."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not s:
        return None
    try:
        value = Decimal(s)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def _numbers(text: str) -> list[tuple[int, Decimal]]:
    """(start offset, value) of every number in ``text``, in order."""
    out = []
    for m in _NUMBER.finditer(text):
        negative = sum(m.group(g) is not None for g in (1, 2, 3)) % 2 == 1
        value = Decimal(m.group(4).replace(",", "") + (m.group(5) or ""))
        out.append((m.start(), -value if negative else value))
    return out


def extract_reference(answer: str) -> Decimal:
    """The reference number of a GSM8K ``answer`` field (after ``####``)."""
    if "####" not in answer:
        raise UserError(f"GSM8K answer has no '####' marker: {answer[-80:]!r}; pass the dataset's 'answer' "
                        f"field")
    value = parse_number(answer.rsplit("####", 1)[1])
    if value is None:
        raise UserError(f"GSM8K answer after '####' is not a number: {answer.rsplit('####', 1)[1]!r}")
    return value


def strict_answer(output: str) -> Decimal | None:
    """The number right after the first ``####`` in a model output, or None."""
    m = _MARKER.search(output)
    if m is None:
        return None
    found = _numbers(output[m.end():])
    return found[0][1] if found and found[0][0] == 0 else None


def flexible_answer(output: str) -> Decimal | None:
    """The last number in a model output, or None."""
    found = _numbers(output)
    return found[-1][1] if found else None


@dataclass(frozen=True)
class Scored:
    strict: bool
    flexible: bool
    strict_answer: Decimal | None
    flexible_answer: Decimal | None


def score_output(output: str, reference: Decimal | str) -> Scored:
    """Score one output against a reference number (or a raw GSM8K answer field)."""
    ref = reference if isinstance(reference, Decimal) else extract_reference(reference)
    s, f = strict_answer(output), flexible_answer(output)
    return Scored(strict=s is not None and s == ref, flexible=f is not None and f == ref,
                  strict_answer=s, flexible_answer=f)


@dataclass(frozen=True)
class GSM8KScore:
    n: int
    strict_correct: int
    flexible_correct: int

    @property
    def strict_accuracy(self) -> float:
        return self.strict_correct / self.n if self.n else 0.0

    @property
    def flexible_accuracy(self) -> float:
        return self.flexible_correct / self.n if self.n else 0.0

    def to_json(self) -> dict:
        return {"n": self.n, "strict_correct": self.strict_correct, "flexible_correct": self.flexible_correct,
                "strict_accuracy": self.strict_accuracy, "flexible_accuracy": self.flexible_accuracy}


def score_all(outputs: Iterable[str], references: Iterable[Decimal | str]) -> GSM8KScore:
    """Strict and flexible accuracy over paired outputs and references (raw answer fields or numbers)."""
    outputs, references = list(outputs), list(references)
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs but {len(references)} references")
    scored = [score_output(o, r) for o, r in zip(outputs, references)]
    return GSM8KScore(n=len(scored), strict_correct=sum(s.strict for s in scored),
                      flexible_correct=sum(s.flexible for s in scored))
