"""The embedded demo default: everything ``make demo`` needs, made inside this repository, offline, on a CPU.

- ``problems``: a seed-deterministic generator of GSM8K-style word problems (one- to three-step arithmetic
  over quantities, money, time and rates; step lines with ``<<a*b=c>>`` calculator notes and a final
  ``#### N``), written as GSM8K-shaped JSONL with disjoint train/test questions.
- ``tokenizer``: a small byte-level BPE trained on that text, saved as a transformers tokenizer with the
  Qwen2 special tokens and an equivalent ChatML chat template.
- ``teacher``: a small ``Qwen2ForCausalLM`` trained for a minute or two on the assistant tokens.
- ``assets``: ``build_demo_assets(out_dir, scale, seed, ...)`` builds all three into one folder and reuses
  it while the settings (generator version, seed, sizes, scale) are unchanged.
- ``budget``: ``StudentBudget``, the demo's student and its training budget as overrides of ``TrainConfig``
  (the demo trains it; the cache-size study reuses it).
- ``config``, ``stages``, ``stats``, ``report``, ``run``: ``fnet-distill demo`` (its config, its stages, the
  report's numbers, the report drawn from ``report.json``, and ``run_demo`` calling them in turn).

The teacher directory loads like ``Qwen/Qwen2-0.5B-Instruct`` (``AutoModelForCausalLM`` and
``AutoTokenizer``), so stage one and stage two run the same code on the demo as on the real model.
"""

from pipeline.demo.assets import DemoAssets, build_demo_assets

__all__ = ["DemoAssets", "build_demo_assets"]
