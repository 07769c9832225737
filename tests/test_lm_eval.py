"""lm-evaluation-harness scores a student folder: its ``HFLM`` (what ``lm_eval --model hf`` runs) loads the
folder with ``trust_remote_code=True``, its loglikelihoods equal the project's own sums of log-probabilities
from ``forward``, and its ``generate_until`` returns the fast decoder's text. Skipped without lm_eval."""

from __future__ import annotations

import pytest
import torch
from tiny_student import EOS, PAD, save_student, tiny_student, tiny_tokenizer  # tests/ is on sys.path

REQUESTS = [("the answer is", " 3"), ("the sum of 3 and 4 is", " 7 ."), ("red cat and", " blue dog"),
            ("question : 2 plus 2", " equals four")]


def own_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation token | prefix) from ``model(ids).logits``; whether each is the argmax."""
    ctx, cont = tok(context)["input_ids"], tok(continuation)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(ids).logits[0].float().log_softmax(-1)  # (T, tokenizer ids)
    rows = logp[len(ctx) - 1: -1]  # row t predicts token t + 1
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


@pytest.mark.parametrize("kind", ["full", "compacted", "padded"])
def test_hflm_loglikelihood_and_generate_until_match_the_project(tmp_path, kind):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from student.modeling import compact_model

    model = tiny_student()
    if kind == "compacted":
        model = compact_model(model, [PAD, EOS] + list(range(3, 39)))  # drops <unk> only
    if kind == "padded":  # 9 rows past the tokenizer's 39 ids (a padded teacher's), masked in the logits
        model = compact_model(tiny_student(vocab_size=48, num_tokenizer_ids=39), list(range(48)))
    folder = save_student(model, tmp_path / "student")
    lm = HFLM(pretrained=str(folder), trust_remote_code=True, device="cpu", batch_size=2, max_length=64)
    tok = tiny_tokenizer()

    ll = lm.loglikelihood([Instance("loglikelihood", {}, req, i) for i, req in enumerate(REQUESTS)])
    for (logp, greedy), (context, continuation) in zip(ll, REQUESTS):
        want, want_greedy = own_loglikelihood(model, tok, context, continuation)
        assert logp == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy

    prompts = ["the answer is", "red cat"]
    args = {"until": ["?"], "max_gen_toks": 6, "do_sample": False}
    texts = lm.generate_until([Instance("generate_until", {}, (p, args), i) for i, p in enumerate(prompts)])
    for prompt, text in zip(prompts, texts):
        ids = torch.tensor([tok(prompt)["input_ids"]])
        fast = model.generate_fast(ids, max_new_tokens=6, eos_token_id=EOS)
        expected = tok.decode(fast[0, ids.shape[1]:], skip_special_tokens=True).split("?")[0]
        assert text == expected
