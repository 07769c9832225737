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
from tiny_student import EOS, PAD, save_student, tiny_student  # tests/ is on sys.path under pytest

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


def run_bare(folders, ids, mask, tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "hf_modules"), PYTHONNOUSERSITE="1")
    purelib = sysconfig.get_paths()["purelib"]
    code = f"import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p] + [{purelib!r}]\n"
    cwd, out = tmp_path / "elsewhere", tmp_path / "out.pt"
    cwd.mkdir()
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code + CHILD, json.dumps(ids), json.dumps(mask),
                          str(out), *map(str, folders)], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pad_token_id" not in res.stderr and "eos_token_id" not in res.stderr, res.stderr[-2000:]
    return torch.load(out, weights_only=False)


def test_saved_students_load_and_generate_without_the_project(tmp_path):
    from student.modeling import compact_model

    full = tiny_student()
    small = compact_model(full, [PAD, EOS] + list(range(3, 39, 2)))  # every other word
    models = {save_student(full, tmp_path / "full"): full, save_student(small, tmp_path / "compact"): small}
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
        assert got["logits"].shape[-1] == 39  # tokenizer ids, also when compacted
        torch.testing.assert_close(got["logits"], expected, atol=1e-5, rtol=1e-5)
        fast = model.generate_fast(ids_t, mask_t, max_new_tokens=8, eos_token_id=EOS, pad_token_id=PAD)
        assert torch.equal(got["generate"][:, : fast.shape[1]], fast)
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
