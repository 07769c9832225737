"""GSM8K answer extraction and strict/flexible scoring on tricky strings and on the real dataset."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from cache.util import UserError
from pipeline.answers import (
    extract_reference,
    flexible_answer,
    parse_number,
    score_all,
    score_output,
    strict_answer,
)


@pytest.mark.parametrize("text,value", [
    ("72", "72"), (" 1,000 ", "1000"), ("$12", "12"), ("-5", "-5"), ("3.50", "3.5"), ("18.", "18"),
    ("$1,234.50", "1234.5"), ("-$3", "-3"), ("abc", None), ("", None), ("1.2.3", None), ("inf", None),
])
def test_parse_number(text, value):
    got = parse_number(text)
    assert got == (None if value is None else Decimal(value))


def test_extract_reference():
    assert extract_reference("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7") == 7
    assert extract_reference("...\n#### 1,000") == 1000
    assert extract_reference("#### -12") == -12
    with pytest.raises(UserError, match="####"):
        extract_reference("no marker 5")
    with pytest.raises(UserError, match="not a number"):
        extract_reference("#### seven")


@pytest.mark.parametrize("output,strict,flexible", [
    ("So the total is 18.\n#### 18", "18", "18"),
    ("#### 1,000", "1000", "1000"),
    ("The answer: #### $12.", "12", "12"),
    ("#### -3\nthen 4 more", "-3", "4"),
    ("She owes -7 dollars.", None, "-7"),
    ("It costs 3.50 each", None, "3.50"),
    ("Pages 3-4 are torn, so 4", None, "4"),
    ("The answer is 12,500.", None, "12500"),
    ("#### The answer is 5", None, "5"),
    ("#### 5 #### 6", "5", "6"),
    ("I cannot solve this.", None, None),
    ("", None, None),
    ("Step 1: 2x = 10. Step 2: x = 5", None, "5"),
    # a longer run of "#" is the same marker
    ("##### 5", "5", "5"),
    ("Total: 9\n###### $1,200", "1200", "1200"),
    # numbers glued to the text before them
    ("The answer is72", None, "72"),
    ("所以答案是72", None, "72"),
    ("所以答案是72元。", None, "72"),
    ("7x3", None, "3"),
    ("7x3=21", None, "21"),
    ("v2 of the plan costs $-4", None, "-4"),
    ("Answer:-6", None, "-6"),
    ("up to 3.14159", None, "3.14159"),
])
def test_strict_and_flexible_extraction(output, strict, flexible):
    assert strict_answer(output) == (None if strict is None else Decimal(strict))
    assert flexible_answer(output) == (None if flexible is None else Decimal(flexible))


def test_every_number_of_glued_text_is_found():
    from pipeline.answers import _numbers

    assert [v for _, v in _numbers("7x3=21")] == [7, 3, 21]
    assert [v for _, v in _numbers("is72, 所以答案是8, 12-3")] == [72, 8, 12, 3]  # "12-3" is 12 and 3


def test_scoring_compares_numerically():
    ref = "Each costs $3.5.\n#### 3.5"
    assert score_output("#### 3.50", ref).strict
    assert score_output("Each costs $3.50.", ref).flexible
    assert not score_output("Each costs $3.50.", ref).strict
    s = score_output("Total $1,000.", Decimal(1000))
    assert s.flexible and not s.strict and s.flexible_answer == 1000
    assert not score_output("#### 35", ref).strict
    assert not score_output("no number here", ref).flexible
    total = score_all(["#### 7", "7 apples", "#### 8", "nothing"], ["#### 7", "#### 7", "#### 7", "#### 7"])
    assert (total.n, total.strict_correct, total.flexible_correct) == (4, 1, 2)
    assert total.strict_accuracy == 0.25 and total.flexible_accuracy == 0.5
    assert total.to_json()["flexible_accuracy"] == 0.5
    with pytest.raises(ValueError):
        score_all(["a"], [])


def test_real_gsm8k_answers_score_as_correct_outputs(gsm8k_dir):
    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines() if line.strip()]
    refs = [extract_reference(r["answer"]) for r in rows]
    total = score_all([r["answer"] for r in rows], refs)
    assert total.strict_correct == total.n
    assert total.flexible_correct == total.n
