"""A student cut from the teacher: a smaller model of the teacher's own architecture whose decoder layers are
a chosen subset of the teacher's, copied exactly, with the teacher's embeddings, final norm and head (the
DistilBERT / Minitron starting point). Optionally each kept layer's FFN is narrowed to the ``ffn`` inner
channels that matter most (gate/up/down MLPs: the product of the channel's gate row, up row and down column
norms), and its attention to ``heads`` query heads (whole key/value groups, those whose query heads' output
projection columns have the largest norm), kept in their original order.

``cut_model`` works on any transformers causal LM whose decoder layers are one ``nn.ModuleList`` of
``num_hidden_layers`` blocks (Qwen2, Llama, Mistral, GPT-2, ...); ``write_cut`` saves it with the teacher's
tokenizer and ``cut.json`` (teacher, kept layers, FFN channels, parameter counts) for
``train-student --init-from``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache.util import UserError, atomic_write_bytes, atomic_write_json

CUT_RECORD = "cut.json"
_MLP = ("gate_proj", "up_proj", "down_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def decoder_layers(model: nn.Module) -> str:
    """The qualified name of the ``nn.ModuleList`` holding the model's ``num_hidden_layers`` blocks."""
    n = model.config.num_hidden_layers
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n
             and name.rsplit(".", 1)[-1] in ("layers", "h", "layer", "blocks")]
    if len(found) != 1:
        raise UserError(f"cannot tell which module list of this {model.config.model_type!r} model holds its "
                        f"{n} decoder layers ({found or 'none found'}); cut-student supports models whose "
                        "layers are one list (Qwen2, Llama, Mistral, GPT-2, ...)")
    return found[0]


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _ffn_channels(layer: nn.Module, ffn: int) -> torch.Tensor:
    """The ``ffn`` inner channels of a gate/up/down MLP with the largest ||gate_j|| ||up_j|| ||down_:,j||,
    sorted by index."""
    mlp = getattr(layer, "mlp", None)
    if mlp is None or not all(hasattr(mlp, n) for n in _MLP):
        raise UserError("--ffn narrows gate/up/down MLPs (Qwen2, Llama, Mistral); this model's layers have "
                        "another FFN; cut without --ffn")
    score = (mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1)
             * mlp.down_proj.weight.norm(dim=0))  # (inner,)
    return torch.sort(torch.topk(score, ffn).indices).values


def _head_groups(layer: nn.Module, cfg, heads: int) -> torch.Tensor:
    """The key/value groups (each with its query heads) to keep so that ``heads`` query heads remain: those
    whose query heads' ``o_proj`` columns have the largest norm, sorted by index."""
    attn = getattr(layer, "self_attn", None)
    if attn is None or not all(hasattr(attn, n) for n in _ATTN):
        raise UserError("--heads narrows q/k/v/o attention (Qwen2, Llama, Mistral); this model's layers have "
                        "another attention; cut without --heads")
    h, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    g = h // kv
    hd = attn.o_proj.weight.shape[1] // h
    score = attn.o_proj.weight.reshape(-1, kv, g * hd).norm(dim=(0, 2))  # (kv,)
    return torch.sort(torch.topk(score, heads // g).indices).values


def _attn_rows(groups: torch.Tensor, per_group: int) -> torch.Tensor:
    """Row (or column) indices of whole groups of ``per_group`` consecutive entries."""
    return (groups[:, None] * per_group + torch.arange(per_group)).flatten()


def cut_model(teacher: nn.Module, layers: list[int], ffn: int | None = None,
              heads: int | None = None) -> tuple[nn.Module, dict]:
    """The student (same class and config as ``teacher`` but ``len(layers)`` layers, optionally ``ffn``
    inner channels and ``heads`` query heads) and what was kept: ``{"kept_layers", "ffn_channels"?,
    "kv_groups"?}``."""
    cfg = teacher.config
    n = cfg.num_hidden_layers
    if not layers:
        raise UserError("--layers is empty; give the teacher's layers to keep, e.g. 0,2,4")
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise UserError(f"--layers {bad} are not layers of the teacher (it has {n}: 0..{n - 1})")
    if len(set(layers)) != len(layers) or list(layers) != sorted(layers):
        raise UserError(f"--layers must be increasing and distinct (got {layers}); each kept layer runs "
                        "once, in the teacher's order")
    inner = getattr(cfg, "intermediate_size", None)
    if ffn is not None and (inner is None or not 1 <= ffn <= inner):
        raise UserError(f"--ffn {ffn} must be between 1 and the teacher's FFN width ({inner})")
    n_heads = getattr(cfg, "num_attention_heads", None)
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    if heads is not None:
        g = (n_heads // n_kv) if n_heads else 0
        if not n_heads or not 1 <= heads <= n_heads or heads % g:
            raise UserError(f"--heads {heads} must be a multiple of the teacher's {g} query heads per "
                            f"key/value head, between {g} and {n_heads}")
    prefix = decoder_layers(teacher)
    new_cfg = copy.deepcopy(cfg)
    new_cfg.num_hidden_layers = len(layers)
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n:
        new_cfg.layer_types = [cfg.layer_types[i] for i in layers]
    if ffn is not None:
        new_cfg.intermediate_size = ffn
    blocks = teacher.get_submodule(prefix)
    channels = [_ffn_channels(blocks[i], ffn) for i in layers] if ffn is not None else None
    groups = [_head_groups(blocks[i], cfg, heads) for i in layers] if heads is not None else None
    if groups is not None:
        hd = blocks[layers[0]].self_attn.o_proj.weight.shape[1] // n_heads
        g = n_heads // n_kv
        new_cfg.num_attention_heads, new_cfg.num_key_value_heads, new_cfg.head_dim = heads, heads // g, hd
    state = {}
    for key, value in teacher.state_dict().items():
        if not key.startswith(prefix + "."):
            state[key] = value
            continue
        i, rest = key[len(prefix) + 1:].split(".", 1)
        if int(i) not in layers:
            continue
        j = layers.index(int(i))
        name = rest.rsplit(".", 1)[0].rsplit(".", 1)[-1]
        if channels is not None:
            if name in ("gate_proj", "up_proj"):
                value = value.index_select(0, channels[j])
            elif name == "down_proj" and rest.endswith("weight"):
                value = value.index_select(1, channels[j])
        if groups is not None:
            if name in ("q_proj", "o_proj"):  # query heads of the kept groups: g * hd rows / columns each
                idx = _attn_rows(groups[j], g * hd)
                if name == "q_proj":
                    value = value.index_select(0, idx)
                elif rest.endswith("weight"):
                    value = value.index_select(1, idx)
            elif name in ("k_proj", "v_proj"):
                value = value.index_select(0, _attn_rows(groups[j], hd))
        state[f"{prefix}.{j}.{rest}"] = value
    with torch.device("meta"):
        student = type(teacher)(new_cfg)
    student.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
    theirs = dict(teacher.named_buffers())
    for name, buf in list(student.named_buffers()):  # non-persistent buffers (RoPE inv_freq) stay on meta
        if buf.is_meta:
            src = name
            if name.startswith(prefix + "."):
                j, rest = name[len(prefix) + 1:].split(".", 1)
                src = f"{prefix}.{layers[int(j)]}.{rest}"
            owner, _, leaf = name.rpartition(".")
            student.get_submodule(owner).register_buffer(leaf, theirs[src].clone(), persistent=False)
    student.tie_weights()
    student.generation_config = copy.deepcopy(teacher.generation_config)
    kept: dict[str, Any] = {"kept_layers": list(layers)}
    if channels is not None:
        kept["ffn_channels"] = {str(i): c.tolist() for i, c in zip(layers, channels)}
    if groups is not None:
        kept["kv_groups"] = {str(i): c.tolist() for i, c in zip(layers, groups)}
    return student.eval(), kept


def write_cut(student: nn.Module, kept: dict, out: Path, *, teacher_name: str, teacher_layers: int,
              teacher_parameters: int, tokenizer=None) -> Path:
    """Save the cut student to ``out`` (``save_pretrained`` + the teacher's tokenizer + ``cut.json`` + a short
    ``README.md``)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out} is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    cfg = student.config
    record = {"teacher": teacher_name, "model_type": cfg.model_type, "teacher_layers": teacher_layers,
              "kept_layers": kept["kept_layers"], "layers": cfg.num_hidden_layers,
              "ffn": getattr(cfg, "intermediate_size", None), "parameters": parameter_count(student),
              "teacher_parameters": teacher_parameters, "ffn_rule": None}
    if "ffn_channels" in kept:
        record["ffn_rule"] = "largest ||gate_j|| * ||up_j|| * ||down_:,j|| per layer, original order"
        record["ffn_channels"] = kept["ffn_channels"]
    record["heads"] = getattr(cfg, "num_attention_heads", None)
    if "kv_groups" in kept:
        record["heads_rule"] = ("key/value groups whose query heads' o_proj columns have the largest norm, "
                                "per layer, original order")
        record["kv_groups"] = kept["kv_groups"]
    atomic_write_json(out / CUT_RECORD, record)
    card = "\n".join([
        "---", "library_name: transformers", "pipeline_tag: text-generation", "---", "",
        f"# {cfg.model_type} cut from {teacher_name}", "",
        f"Layers {', '.join(map(str, kept['kept_layers']))} of the teacher's {teacher_layers}, copied "
        "exactly, with its embeddings, final norm and head"
        + (f"; each FFN narrowed to {cfg.intermediate_size} channels" if "ffn_channels" in kept else "")
        + (f"; {cfg.num_attention_heads} attention heads per layer" if "kv_groups" in kept else "")
        + f". {record['parameters']:,} parameters (the teacher has {teacher_parameters:,}).", "",
        "A starting point for `fnet-distill train-student --init-from DIR`; untrained after the cut. "
        f"`{CUT_RECORD}` records what was kept.", ""])
    atomic_write_bytes(out / "README.md", card.encode())
    return out
