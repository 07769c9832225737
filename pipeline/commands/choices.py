"""The fixed sets of values that options take, as Enums: typer lists them in ``--help`` (``--kd
<topk_tail|topk_renorm|sampled|reverse_kl>``) and refuses anything else with the list (``pipeline.cli``
adds "did you mean" for a near miss such as ``topk-tail``). A command passes ``.value`` on, so configs,
manifests and fingerprints hold the same strings as before.

Sets defined in modules that import torch or transformers are spelled again here (``--help`` stays fast);
``tests/test_cli.py`` checks each against its original.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import typer

from cache.schema import ENCODINGS, FORMATS
from pipeline.rows import DATA_FORMATS, OVERFLOW_POLICIES


def choice(name: str, values: tuple[str, ...]) -> type[Enum]:
    """An Enum whose members' names and values are ``values`` (a str subclass, in this order)."""
    return Enum(name, [(v, v) for v in values], type=str)


def value(option: Any) -> Any:
    """The plain string of a choice (None and non-Enum values pass through)."""
    return option.value if isinstance(option, Enum) else option


ShardFormat = choice("ShardFormat", FORMATS)
Encoding = choice("Encoding", ENCODINGS)
Overflow = choice("Overflow", OVERFLOW_POLICIES)
DataFormat = choice("DataFormat", DATA_FORMATS)
Keep = choice("Keep", ("auto", "reference", "majority", "all"))  # pipeline.write.KEEP_POLICIES
ComputeDtype = choice("ComputeDtype", ("auto", "float32", "bfloat16", "float16"))  # + pipeline.teacher's
LogprobDtype = choice("LogprobDtype", ("float16", "float32"))  # pipeline.teacher.LOGPROB_DTYPES
KdKind = choice("KdKind", ("topk_tail", "topk_renorm", "sampled", "reverse_kl"))  # student.losses.KD_KINDS
Precision = choice("Precision", ("auto", "fp32", "bf16", "fp16"))  # student.train_config.PRECISIONS
Student = choice("Student", ("fnet", "qwen2", "llama"))  # student.train_config.STUDENTS

# --report-to takes one of these or a comma list of trackers; student.reporting.REPORT_TO
REPORT_TO = ("none", "tensorboard", "wandb")
REPORT_TO_METAVAR = "<" + "|".join(REPORT_TO) + ">[,...]"


def check_report_to(text: str) -> str:
    """``--report-to``'s callback: refuse a wrong value while parsing, with the choices."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(t not in REPORT_TO for t in names) or ("none" in names and len(names) > 1):
        raise typer.BadParameter(f"{text!r} is not one of {', '.join(map(repr, REPORT_TO))}, nor a comma "
                                 "list of trackers such as 'tensorboard,wandb'")
    return text
