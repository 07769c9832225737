"""A saved student folder loads where this project does not exist: ``trust_remote_code`` in a bare process.

The child process runs with ``-I -S`` (no user site, no ``site``: the project's editable install, a ``.pth``
hook, is never processed) and only the virtual environment's site-packages on ``sys.path``, from an empty
working directory. It checks that ``import student`` fails there, loads the folder through the Auto classes,
and writes its logits and generated tokens for the parent to compare with the in-project model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap

import torch
from tiny_student import EOS, PAD, WORDS, save_student, tiny_student  # tests/ is on sys.path under pytest

CHILD = textwrap.dedent("""
    import json, sys
    for name in ("student", "cache", "pipeline"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"the project is importable in the bare process ({name})")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids, mask, out = torch.tensor(json.loads(sys.argv[1])), torch.tensor(json.loads(sys.argv[2])), sys.argv[3]
    results = {}
    for folder in sys.argv[4:]:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        text = tok.decode(model.generate(**tok("the answer is", return_tensors="pt"), max_new_tokens=4,
                                         do_sample=False)[0])
        results[folder] = {"module": type(model).__module__, "logits": logits, "generate": gen, "text": text,
                           "files": sorted(__import__("os").listdir(folder))}
    torch.save(results, out)
""")


def run_python_bare(code: str, args: list[str], tmp_path) -> subprocess.CompletedProcess:
    """``code`` in a process where only torch, transformers and the like are importable (not this project),
    from an empty working directory, stdin closed (transformers' remote-code question reads EOF: "no")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), PYTHONNOUSERSITE="1")
    purelib = sysconfig.get_paths()["purelib"]
    head = f"import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p] + [{purelib!r}]\n"
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    res = subprocess.run([sys.executable, "-I", "-S", "-c", head + code, *args], cwd=cwd, env=env,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def run_bare(folders, ids, mask, tmp_path) -> dict:
    out = tmp_path / "out.pt"
    res = run_python_bare(CHILD, [json.dumps(ids), json.dumps(mask), str(out), *map(str, folders)], tmp_path)
    assert "pad_token_id" not in res.stderr and "eos_token_id" not in res.stderr, res.stderr[-2000:]
    return torch.load(out, weights_only=False)


N = len(WORDS)  # the tiny tokenizer's ids


def padded_student(masked: bool = True):
    """A student over N + 9 ids, as one distilled from a teacher whose embedding is padded past its tokenizer
    (Qwen2: 151,936 rows, 151,646 ids), the padded rows' logits made the largest everywhere: unmasked, greedy
    decoding emits them."""
    model = tiny_student(vocab_size=N + 9, num_tokenizer_ids=N if masked else None)
    with torch.no_grad():
        h = model.hidden_states(torch.arange(3, N)[None])[0].mean(0)  # (d,)
        model.lm_head.weight[N:] = 20 * h / h.norm() + 0.1 * torch.randn(9, h.numel())
    return model


def test_saved_students_load_and_generate_without_the_project(tmp_path):
    from student.modeling import compact_model

    full = tiny_student()
    small = compact_model(full, [PAD, EOS] + list(range(3, 39, 2)))  # every other word
    padded = padded_student()
    padded_small = compact_model(padded, [PAD, EOS] + list(range(3, N, 2)) + [N, N + 8])
    models = {save_student(full, tmp_path / "full"): full, save_student(small, tmp_path / "compact"): small,
              save_student(padded, tmp_path / "padded"): padded,
              save_student(padded_small, tmp_path / "padded-compact"): padded_small}
    for folder in models:
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"] == {"AutoConfig": "configuration_causal_fnet.CausalFNetConfig",
                                      "AutoModelForCausalLM": "modeling_causal_fnet.CausalFNetForCausalLM"}
    ids = [[PAD, PAD, 13, 14, 15], [16, 3, 17, 4, 18]]  # row 0 left-padded
    mask = [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    results = run_bare(list(models), ids, mask, tmp_path)

    ids_t, mask_t = torch.tensor(ids), torch.tensor(mask)
    for folder, model in models.items():
        got = results[str(folder)]
        assert not got["module"].startswith("student")  # the folder's own copy of the code ran
        assert {"modeling_causal_fnet.py", "configuration_causal_fnet.py", "stft.py", "decoding.py"} <= set(
            got["files"])
        with torch.no_grad():
            expected = model(ids_t, attention_mask=mask_t).logits
        assert got["logits"].shape[-1] == model.config.output_vocab_size  # tokenizer ids, also when compacted
        torch.testing.assert_close(got["logits"], expected, atol=1e-5, rtol=1e-5)
        fast = model.generate_fast(ids_t, mask_t, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(got["generate"][:, : fast.shape[1]], fast)
        assert int(got["generate"].max()) < N  # never an id past the tokenizer
        assert got["text"].startswith("the answer is")


def test_saved_files_are_the_package_source(tmp_path):
    # One source of truth: the folder holds byte-identical copies of the package's model files.
    import student

    folder = save_student(tiny_student(), tmp_path / "s")
    pkg = os.path.dirname(student.__file__)
    for name in ("modeling_causal_fnet.py", "configuration_causal_fnet.py", "stft.py", "decoding.py"):
        with open(os.path.join(pkg, name), "rb") as a, open(folder / name, "rb") as b:
            assert a.read() == b.read(), name


def test_plain_import_student_registers_the_auto_classes(tmp_path):
    folder = save_student(tiny_student(), tmp_path / "s")
    code = ("import student\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
            "print(type(m).__module__)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "student.modeling_causal_fnet"


def test_ids_past_the_tokenizer_are_never_emitted_and_the_other_logits_are_unchanged():
    from student.modeling import compact_model

    ids = torch.tensor([[PAD, PAD, 13, 14, 15], [16, 3, 17, 4, 18]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    gen = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    bare, masked = padded_student(masked=False), padded_student()
    keep = [PAD, EOS] + list(range(3, N, 2)) + [N, N + 8]
    pairs = [(bare, masked), (compact_model(bare, keep), compact_model(masked, keep))]
    for unmasked, model in pairs:
        assert int(unmasked.generate(ids, **gen).max()) >= N  # the rows past the tokenizer win unmasked
        with torch.no_grad():
            a = unmasked(ids, attention_mask=mask).logits
            b = model(ids, attention_mask=mask).logits
        assert torch.equal(a[..., :N], b[..., :N])  # bit for bit where an id decodes
        assert torch.isneginf(b[..., N:]).all()
        assert int(model.generate(ids, **gen).max()) < N
        fast = model.generate_fast(ids, mask, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
        assert int(fast.max()) < N
        sampled = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, top_k=0,
                                 pad_token_id=PAD)
        assert int(sampled.max()) < N


TOKENIZER_CHILD = textwrap.dedent("""
    import json, sys
    from transformers import AutoTokenizer
    kwargs = json.loads(sys.argv[2])
    tok = AutoTokenizer.from_pretrained(sys.argv[1], **kwargs)
    print()  # after transformers' remote-code question, which ends without a newline
    print("RESULT", json.dumps([len(tok), tok.eos_token_id, tok.pad_token_id, tok("12 plus 7")["input_ids"]]))
""")


def test_plain_autotokenizer_on_a_compacted_student_warns_of_no_special_token(tmp_path, qwen_tokenizer):
    # A compacted student of the real Qwen2 tokenizer: 12 rows, eos/pad ids 151,645/151,643. AutoTokenizer
    # reads config.json; without trust_remote_code it reads it as a plain PretrainedConfig, whose
    # vocab_size must then cover the eos/pad ids (config.json holds the logits' width, not the row count).
    from student.modeling import CausalFNetConfig, CausalFNetForCausalLM

    ids = sorted(set(qwen_tokenizer("12 plus 7")["input_ids"]) | {151643, 151645, 151700, 151935})
    cfg = CausalFNetConfig(vocab_size=len(ids), vocab_map=ids, full_vocab_size=151_936, hidden_size=8,
                           num_hidden_layers=1, intermediate_size=8, stft_window_size=2,
                           max_position_embeddings=16, eos_token_id=qwen_tokenizer.eos_token_id,
                           pad_token_id=qwen_tokenizer.pad_token_id, num_tokenizer_ids=len(qwen_tokenizer))
    folder = tmp_path / "student"
    CausalFNetForCausalLM(cfg).save_pretrained(folder)
    qwen_tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 151_936
    assert CausalFNetForCausalLM.from_pretrained(folder).lm_head.weight.shape[0] == len(ids)  # rows again

    want = [len(qwen_tokenizer), qwen_tokenizer.eos_token_id, qwen_tokenizer.pad_token_id,
            qwen_tokenizer("12 plus 7")["input_ids"]]
    for kwargs in ({}, {"trust_remote_code": True}):
        res = run_python_bare(TOKENIZER_CHILD, [str(folder), json.dumps(kwargs)], tmp_path)
        assert json.loads(res.stdout.rpartition("RESULT ")[2]) == want
        assert "_token_id" not in res.stderr and "vocabulary" not in res.stderr, res.stderr[-2000:]
        if kwargs:
            assert "[transformers]" not in res.stderr, res.stderr[-2000:]  # trusted: silent


SAVE_CHILD = textwrap.dedent("""
    import sys
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    model.save_pretrained(sys.argv[2])
""")


def test_save_pretrained_of_a_loaded_student_keeps_its_card_and_run_record(tmp_path):
    from student.checkpoint import write_folder_manifest
    from student.model_card import write_model_card

    folder = save_student(tiny_student(), tmp_path / "final")
    (folder / "train_config.json").write_text(json.dumps({"config": {"kd": "topk_tail", "alpha": 0.2}}))
    (folder / "provenance.json").write_text(json.dumps({"step": 7, "code_version": "0.1.0"}))
    write_model_card(folder)
    write_folder_manifest(folder, 7)
    again = tmp_path / "again"
    run_python_bare(SAVE_CHILD, [str(folder), str(again)], tmp_path)  # the folder's own model code
    for name in ("README.md", "train_config.json", "provenance.json"):
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name
    assert not (again / "manifest.json").exists()  # it would list the old folder's files
    assert (again / "model.safetensors").exists()
