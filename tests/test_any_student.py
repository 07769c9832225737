"""A transformers causal LM as the student (student.any_student): a tiny Qwen2 trains from the bigram caches
with every KD kind through the same loop; its chunked loss and gradients equal the unchunked reference on its
full tokenizer-id logits; resume is bit-exact; compacted folders reload with plain transformers and give the
in-training model's logits; a student cut from a teacher keeps the teacher's layers exactly; a model of
another tokenizer or too small a vocabulary is refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import EOS, PAD, V, write_bigram_cache  # tests/ is on sys.path under pytest

from cache.util import UserError
from student.any_student import COMPACT_VOCAB, CausalLMStudent
from student.data import gather_rows
from student.losses import KD_KINDS, distill_loss_sums
from student.train import CHECKPOINT, FINAL, TrainConfig, TrainHooks, fit, setup, targets_for, train_student

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cache: Path, out: Path, **kw) -> TrainConfig:
    base = dict(cache=cache, out=out, student="qwen2", hidden_size=16, heads=2, layers=2, ffn=32,
                max_positions=64, steps=4, batch_tokens=96, lr=3e-3, min_lr=3e-4, warmup=1, eval_every=0,
                save_every=0, log_every=1, num_workers=0, progress=False, chunk_size=16)
    return TrainConfig(**{**base, **kw})


def params_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def caches(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("any")
    # 6 short sequences with top-2 rows leave some of the 40 ids unused: compaction has a shared row to learn
    return {"full": write_bigram_cache(root / "c", n=16, k=8, samples=12),
            "sparse": write_bigram_cache(root / "s", n=6, k=2, samples=4, lengths=(6, 9))}


# ------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("kd", KD_KINDS)
def test_every_kd_kind_trains_a_qwen2_student(tmp_path, caches, kd):
    res = train_student(tiny(caches["full"], tmp_path / kd, kd=kd, alpha=0.2, steps=6, val_fraction=0.25))
    m = res.final_metrics
    assert m["step"] == 6 and all(map(torch.isfinite, torch.tensor([m["loss"], m["val_ce"], m["val_kl"]])))
    cfg = json.loads((res.out_dir / FINAL / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and "auto_map" not in cfg and cfg["vocab_size"] == V
    assert (cfg["pad_token_id"], cfg["eos_token_id"]) == (PAD, EOS)
    card = (res.out_dir / FINAL / "README.md").read_text()  # the model card of a transformers student
    assert "# qwen2 student distilled from bigram-0" in card and "trust_remote_code" not in card


@pytest.mark.parametrize("compact", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_loss_equals_the_full_logits_reference(tmp_path, caches, compact, temperature):
    """DistillForward (hidden states -> chunked head + loss) against distill_loss_sums on the student's full
    tokenizer-id logits, value and gradients, for every KD kind (compacted: the logits of the saved model,
    whose unused ids share one row)."""
    cache = caches["sparse"]
    run = setup(tiny(cache, tmp_path / "run", compact_vocab=compact, temperature=temperature, kd="sampled"))
    try:
        model = run.model
        assert isinstance(model, CausalLMStudent) and (model.unused > 0) == compact
        batch = next(iter(run.loader))
        params = [p for p in model.parameters() if p.requires_grad]
        for kind in KD_KINDS:
            run.forward.kind = kind
            targets = targets_for(run, batch, 0 if kind == "sampled" else run.data.temp_index)
            ce, kd, agree, _ = run.forward(batch.input_ids, batch.attention_mask, batch.pred_pos, targets)
            got = torch.autograd.grad(0.3 * ce + 0.7 * kd, params)
            raw = targets_for(run, batch, 0 if kind == "sampled" else run.data.temp_index) if not compact \
                else _tokenizer_targets(run, batch, kind)
            logits = gather_rows(model(batch.input_ids, batch.attention_mask), batch.pred_pos)  # (N, V)
            assert logits.shape[1] == V
            ref = distill_loss_sums(logits, raw, kind, temperature)
            want = torch.autograd.grad(0.3 * ref.ce + 0.7 * ref.kd, params)
            torch.testing.assert_close(ce, ref.ce, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(kd, ref.kd, rtol=1e-5, atol=1e-4)
            assert int(agree) == int(ref.top1_agree)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    finally:
        run.close()


def _tokenizer_targets(run, batch, kind):
    from student.losses import DistillTargets

    return DistillTargets.from_batch(batch, 0 if kind == "sampled" else run.data.temp_index)


class Crash(Exception):
    pass


@pytest.mark.parametrize("compact", [False, True])
def test_resumed_run_equals_uninterrupted_bit_for_bit(tmp_path, caches, compact):
    kw = dict(steps=6, accum=2, batch_tokens=64, save_every=3, eval_every=2, val_fraction=0.2,
              compact_vocab=compact)
    cache = caches["sparse"]
    train_student(tiny(cache, tmp_path / "a", **kw))

    def crash(step):
        if step == 3:
            raise Crash

    with pytest.raises(Crash):
        train_student(tiny(cache, tmp_path / "b", **kw), TrainHooks(after_step=crash))
    assert (tmp_path / "b" / CHECKPOINT / COMPACT_VOCAB).is_file() == compact
    train_student(tiny(cache, tmp_path / "b", resume=True, **kw))
    pa, pb = params_of(tmp_path / "a" / FINAL), params_of(tmp_path / "b" / FINAL)
    assert pa.keys() == pb.keys()
    for name in pa:
        assert torch.equal(pa[name], pb[name]), name
    last = [json.loads(ln) for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()][-1]
    again = [json.loads(ln) for ln in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["val_ce"] == again["val_ce"]


_RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
assert not {"student", "pipeline", "cache"} & {m.split(".")[0] for m in sys.modules}
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    print(json.dumps(model(ids).logits.tolist()))
"""


def test_compact_folder_reloads_with_plain_transformers(tmp_path, caches):
    """A compacted Qwen2 student's final/ is a plain full-vocabulary Qwen2 folder: a process with only
    transformers (cwd elsewhere, no trust_remote_code) loads it and gets the in-training model's logits over
    tokenizer ids, the unused ids at the shared row's logit."""
    run = setup(tiny(caches["sparse"], tmp_path / "out", compact_vocab=True, steps=3))
    try:
        fit(run)
        model = run.model.eval()
        ids = [[1, 2, 3, EOS, 5], [7, 8, 9, 10, 11]]
        with torch.no_grad():
            want = model(torch.tensor(ids))
    finally:
        run.close()
    unused = sorted(set(range(V)) - set(model.vocab_map))
    assert unused and model.unused == len(unused)
    folder = tmp_path / "out" / FINAL
    out = subprocess.run([sys.executable, "-c", _RELOAD, str(folder), json.dumps(ids)], cwd=tmp_path,
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    got = torch.tensor(json.loads(out.stdout))
    assert got.shape == (2, 5, V)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[..., unused], got[..., unused[:1]].expand(-1, -1, len(unused)))
    assert json.loads((folder / COMPACT_VOCAB).read_text())["vocab_map"] == model.vocab_map


# ------------------------------------------------------------------------------------------- refusals


def test_a_student_of_another_tokenizer_or_too_small_a_vocabulary_is_refused(tmp_path, caches):
    from tiny_student import tiny_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    with_tok = write_bigram_cache(tmp_path / "with-tok", n=6, attachments={"tokenizer": tok_dir})
    lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen2", vocab_size=V, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    other = tmp_path / "other"
    lm.save_pretrained(other)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def word_tokenizer(n: int, folder: Path) -> None:
        t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
        t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=t, unk_token="w0").save_pretrained(folder)

    word_tokenizer(V, other)
    with pytest.raises(UserError, match="another tokenizer than the cache"):
        setup(tiny(with_tok, tmp_path / "a", student="fnet", heads=None, init_from=other))
    word_tokenizer(V - 3, other)  # a cache without a tokenizer/ folder: its manifest's token count
    with pytest.raises(UserError, match=f"holds a tokenizer of 3[78] tokens but the cache .* one of {V}"):
        setup(tiny(caches["full"], tmp_path / "a", student="fnet", heads=None, init_from=other))
    small = tmp_path / "small.json"
    small.write_text(json.dumps({"model_type": "qwen2", "vocab_size": V - 8, "hidden_size": 16,
                                 "num_hidden_layers": 1, "intermediate_size": 32, "num_attention_heads": 2,
                                 "num_key_value_heads": 2}))
    with pytest.raises(UserError, match=f"vocab_size {V - 8} does not cover the cache's {V} ids"):
        setup(tiny(caches["full"], tmp_path / "b", student="fnet", heads=None, student_config=small))
    with pytest.raises(UserError, match="--student must be one of"):
        tiny(caches["full"], tmp_path / "c", student="mamba")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------- cut student


def _tiny_teacher(folder: Path, layers: int = 4):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(3)
    cfg = AutoConfig.for_model("qwen2", vocab_size=V, hidden_size=16, num_hidden_layers=layers,
                               intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger than the init so that every layer changes the logits
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def _by_hand(teacher, ids: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """Logits of the teacher's embeddings -> its layers ``layers`` in order -> its final norm and head,
    composed from the teacher's own modules."""
    t = teacher.model
    h = t.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    pe = t.rotary_emb(h, pos)
    for i in layers:
        h = t.layers[i](h, attention_mask=None, position_ids=pos, position_embeddings=pe)
    return teacher.lm_head(t.norm(h))


def test_cut_student_keeps_the_teachers_layers_and_computes_them(tmp_path, caches):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from pipeline.cli import app

    teacher = _tiny_teacher(tmp_path / "teacher")
    ids = torch.tensor([[1, 5, 9, 2, 30, 7, 7, 3]])
    with torch.no_grad():  # the hand-built reference is the teacher itself when every layer is kept
        torch.testing.assert_close(_by_hand(teacher, ids, [0, 1, 2, 3]), teacher(ids).logits)
    res = CliRunner().invoke(app, ["cut-student", "--teacher", str(tmp_path / "teacher"), "--layers", "0,2-3",
                                   "--out", str(tmp_path / "cut")])
    assert res.exit_code == 0, res.output
    cut = AutoModelForCausalLM.from_pretrained(tmp_path / "cut").eval()
    record = json.loads((tmp_path / "cut" / "cut.json").read_text())
    assert record["kept_layers"] == [0, 2, 3] and record["teacher_layers"] == 4
    assert record["parameters"] == sum(p.numel() for p in cut.parameters())
    assert record["teacher_parameters"] == sum(p.numel() for p in teacher.parameters())
    assert cut.config.num_hidden_layers == 3
    tp = dict(teacher.named_parameters())
    for name, p in cut.named_parameters():
        if name.startswith("model.layers."):
            j, rest = name[len("model.layers."):].split(".", 1)
            name = f"model.layers.{[0, 2, 3][int(j)]}.{rest}"
        assert torch.equal(p, tp[name]), name
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).logits, _by_hand(teacher, ids, [0, 2, 3]), rtol=1e-5, atol=1e-5)

    # a narrower FFN keeps the channels with the largest gate * up * down norms, in order
    res = CliRunner().invoke(app, ["cut-student", "--teacher", str(tmp_path / "teacher"), "--layers", "1",
                                   "--ffn", "8", "--out", str(tmp_path / "narrow")])
    assert res.exit_code == 0, res.output
    narrow = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow")
    mlp = teacher.model.layers[1].mlp
    with torch.no_grad():
        score = [float(mlp.gate_proj.weight[j].norm() * mlp.up_proj.weight[j].norm()
                       * mlp.down_proj.weight[:, j].norm()) for j in range(32)]
    keep = sorted(sorted(range(32), key=lambda j: -score[j])[:8])
    assert json.loads((tmp_path / "narrow" / "cut.json").read_text())["ffn_channels"] == {"1": keep}
    got = narrow.model.layers[0].mlp
    assert torch.equal(got.up_proj.weight, mlp.up_proj.weight[keep])
    assert torch.equal(got.down_proj.weight, mlp.down_proj.weight[:, keep])

    # fewer heads: whole key/value groups; with the dropped groups' output columns zeroed in the teacher, the
    # narrowed cut computes exactly what the teacher's modules compute
    o_proj = [layer.self_attn.o_proj.weight for layer in teacher.model.layers]
    with torch.no_grad():
        for w in o_proj:  # 4 query heads of 4 in 2 groups: drop group 0 (its columns) in every layer
            w[:, :8] = 0.0
    teacher.save_pretrained(tmp_path / "teacher-zeroed")
    res = CliRunner().invoke(app, ["cut-student", "--teacher", str(tmp_path / "teacher-zeroed"), "--layers",
                                   "0,2", "--heads", "2", "--out", str(tmp_path / "heads")])
    assert res.exit_code == 0, res.output
    fewer = AutoModelForCausalLM.from_pretrained(tmp_path / "heads").eval()
    rec = json.loads((tmp_path / "heads" / "cut.json").read_text())
    assert rec["kv_groups"] == {"0": [1], "2": [1]} and rec["heads"] == 2
    assert (fewer.config.num_attention_heads, fewer.config.num_key_value_heads) == (2, 1)
    attn = teacher.model.layers[2].self_attn
    got = fewer.model.layers[1].self_attn
    assert torch.equal(got.q_proj.weight, attn.q_proj.weight[8:])
    assert torch.equal(got.k_proj.bias, attn.k_proj.bias[4:])
    assert torch.equal(got.o_proj.weight, attn.o_proj.weight[:, 8:])
    with torch.no_grad():
        torch.testing.assert_close(fewer(ids).logits, _by_hand(teacher, ids, [0, 2]), rtol=1e-5, atol=1e-5)

    # the cut folder is a starting point for train-student (same vocabulary as the cache here)
    out = train_student(tiny(caches["full"], tmp_path / "run", student="fnet", heads=None,
                             init_from=tmp_path / "cut", steps=2))
    assert out.final_metrics["step"] == 2
    assert json.loads((tmp_path / "run" / FINAL / "config.json").read_text())["num_hidden_layers"] == 3

    for bad, match in ((["--layers", "2,1"], "increasing and distinct"), (["--layers", "0,9"], "not layers"),
                       (["--layers", "0", "--ffn", "99"], "--ffn 99 must be between"),
                       (["--layers", "0", "--heads", "3"], "--heads 3 must be a multiple of")):
        res = CliRunner().invoke(app, ["cut-student", "--teacher", str(tmp_path / "teacher"), *bad, "--out",
                                       str(tmp_path / "x")])
        assert isinstance(res.exception, UserError) and match in str(res.exception), res.output


def test_init_from_a_pretrained_model_with_compact_vocab_keeps_its_logits(tmp_path, caches):
    """--init-from a full-vocabulary model + --compact-vocab: the compacted model's logits at the kept ids are
    the pretrained model's; the shared row starts as the mean of the rows it replaces."""
    teacher = _tiny_teacher(tmp_path / "teacher", layers=2)
    run = setup(tiny(caches["sparse"], tmp_path / "run", student="fnet", heads=None,
                     init_from=tmp_path / "teacher", compact_vocab=True))
    try:
        model = run.model.eval()
        kept = model.vocab_map
        assert 0 < model.unused == V - len(kept)
        ids = torch.tensor([kept[:6]])
        with torch.no_grad():
            torch.testing.assert_close(model(ids)[..., kept], teacher(ids).logits[..., kept])
        unused = sorted(set(range(V)) - set(kept))
        torch.testing.assert_close(model.lm.lm_head.weight[-1], teacher.lm_head.weight[unused].mean(0))
    finally:
        run.close()


def test_a_compacted_student_continues_only_on_caches_its_map_covers(tmp_path, caches):
    """--init-from a compacted transformers student's folder rebuilds its compact model; a cache with ids
    outside its map is refused in one line (--compact-vocab compacts it again from the new cache)."""
    train_student(tiny(caches["sparse"], tmp_path / "a", compact_vocab=True, steps=2))
    folder = dict(student="fnet", heads=None, init_from=tmp_path / "a" / FINAL)
    with pytest.raises(UserError, match="compacted vocabulary lacks .* add --compact-vocab"):
        setup(tiny(caches["full"], tmp_path / "b", **folder))
    run = setup(tiny(caches["full"], tmp_path / "c", compact_vocab=True, **folder))
    try:
        assert run.model.unused == 0 and len(run.model.vocab_map) == V
    finally:
        run.close()
    run = setup(tiny(caches["sparse"], tmp_path / "d", **folder))
    try:
        assert run.model.unused > 0  # the folder's own map, rebuilt
    finally:
        run.close()


def test_eval_and_generate_refuse_a_damaged_transformers_student_folder(tmp_path, caches):
    """A transformers student's folder has a manifest.json like the FNet's; eval and generate check it (a
    flipped byte in the weights is one line), and --no-verify reads the folder as it is."""
    from pipeline.evaluate import load_eval_model

    folder = train_student(tiny(caches["full"], tmp_path / "run", steps=2)).out_dir / FINAL
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-10] ^= 0x01
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"^--model .*: model\.safetensors does not match its content"):
        load_eval_model(str(folder), device="cpu")
    model, kind = load_eval_model(str(folder), device="cpu", verify=False)
    assert kind == "hf" and model.config.model_type == "qwen2"
