"""Numeric checks of the core kernels against hand computation, and of the math reward."""
import json, math, os, threading, time

import pytest
import torch
import torch.nn.functional as F

from conftest import SHARED
from common import dpo_loss, pad_sequences, token_logps
from data import load_rows, step_batch
from eval import math_reward, math_rewards


def test_dpo_loss_by_hand():
    # pair 0: margin = (-1 - -2) - (-3 - -2.5) = 1.5 -> -log sigmoid(0.15); pair 1: margin = -2 -> -log sigmoid(-0.2)
    loss, diag = dpo_loss(torch.tensor([-1.0, -5.0]), torch.tensor([-3.0, -4.0]), torch.tensor([-2.0, -5.0]),
                          torch.tensor([-2.5, -6.0]), beta=0.1)
    expected = [math.log(1 + math.exp(-0.15)), math.log(1 + math.exp(0.2))]
    assert loss.shape == (2,)
    assert torch.allclose(loss, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(diag["margin"], torch.tensor([0.15, -0.2])) and diag["acc"].tolist() == [1.0, 0.0]
    # at the reference the loss is log 2 whatever beta, and its gradient pushes chosen up, rejected down
    c, r = torch.tensor([-7.0], requires_grad=True), torch.tensor([-9.0], requires_grad=True)
    l, _ = dpo_loss(c, r, torch.tensor([-7.0]), torch.tensor([-9.0]), beta=0.5)
    l.sum().backward()
    assert abs(l.item() - math.log(2)) < 1e-6
    assert c.grad.item() == pytest.approx(-0.25) and r.grad.item() == pytest.approx(0.25)  # -beta/2, +beta/2


def _tiny_random_model(vocab=50):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, pad_token_id=0)
    return LlamaForCausalLM(cfg).float()


def test_token_logps_matches_full_logits():
    model = _tiny_random_model()
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11, 12, 13], [14]]
    input_ids, attn, cmask = pad_sequences(prompts, responses, 0, torch.device("cpu"))
    logps, entropy = token_logps(model, input_ids, attn, cmask, chunk_size=2)  # chunks smaller than the sequences
    logits = model(input_ids=input_ids, attention_mask=attn).logits.float()
    ref_all = logits[:, :-1].log_softmax(-1)
    naive = torch.zeros_like(logps)
    naive[:, 1:] = ref_all.gather(-1, input_ids[:, 1:, None])[..., 0]
    naive_ent = torch.zeros_like(logps)
    naive_ent[:, 1:] = -(ref_all.exp() * ref_all).sum(-1)
    m = cmask.float()
    assert torch.allclose(logps, naive * m, atol=1e-5)
    assert torch.allclose(entropy, naive_ent * m, atol=1e-5)
    assert (logps[~cmask] == 0).all() and cmask.sum() == 5
    # gradients through the chunked, recomputed head equal the naive ones
    g1 = torch.autograd.grad(logps.sum() + entropy.sum(), list(model.parameters()), allow_unused=True)
    g2 = torch.autograd.grad((naive * m).sum() + (naive_ent * m).sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)


def test_step_batch_is_a_function_of_the_step():
    seen = [i for s in range(5) for i in step_batch(10, s, 4, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))  # each epoch a permutation
    assert step_batch(10, 3, 4, seed=3) == step_batch(10, 3, 4, seed=3)


def test_load_rows_names_file_and_line(tmp_path):
    """Every bad row stops with one line naming the file and the line (blank lines counted)."""
    p = tmp_path / "d.jsonl"
    cases = [('{"question": "1+1?", "answer": 2}\n\n{"problem": "x"\n', r"d\.jsonl:3: not valid JSON"),
             ('{"question": "1+1?", "answer": 2}\n{"text": "no problem field"}\n', r"d\.jsonl:2: row has no 'problem'"),
             ('[1, 2]\n', r"d\.jsonl:1: not a JSON object"),
             ('', r"d\.jsonl: no rows")]
    for text, message in cases:
        p.write_text(text)
        with pytest.raises(SystemExit, match=message):
            load_rows(str(p))
    p.write_bytes(b'{"problem": "1+1?", "answer": "2"}\n{"problem": "\xff\xfe"}\n')
    with pytest.raises(SystemExit, match=r"d\.jsonl:2: not UTF-8"):
        load_rows(str(p))
    p.write_text('{"question": "1+1?", "answer": 2}\n{"problem": "Tell a joke."}\n')
    with pytest.raises(SystemExit, match=r"d\.jsonl:2: row has no 'answer'"):
        load_rows(str(p), need_answer=True)
    assert load_rows(str(p)) == [{"question": "1+1?", "answer": "2", "problem": "1+1?"}, {"problem": "Tell a joke."}]


def _boxed(ans):
    return f"Reasoning... The final answer is $\\boxed{{{ans}}}$. I hope it is correct."


@pytest.mark.parametrize("name", ["math500.jsonl", "amc23.jsonl", "aime24.jsonl", "gsm8k_test.jsonl"])
def test_math_reward_on_benchmark_answers(name):
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    rows = [json.loads(l) for l in open(path)][:40]
    rows = [r for r in rows if r["answer"].strip()]
    right = math_rewards([_boxed(r["answer"]) for r in rows], [r["answer"] for r in rows])
    wrong = math_rewards([_boxed("\\frac{1234567}{89}") for r in rows], [r["answer"] for r in rows])
    assert sum(right) / len(rows) >= 0.95, [r["answer"] for r, x in zip(rows, right) if x == 0]
    assert sum(wrong) == 0


def test_math_reward_equivalences():
    assert math_reward(_boxed("\\frac{1}{2}"), "0.5") == 1.0
    assert math_reward(_boxed("0.5"), "\\frac12") == 1.0
    assert math_reward(_boxed("2\\sqrt{3}"), "\\sqrt{12}") == 1.0
    assert math_reward(_boxed("7"), "8") == 0.0
    assert math_reward("no answer at all", "8") == 0.0
    assert math_reward(None, "8") == 0.0  # never raises


ADVERSARIAL = ["\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}", "\\boxed{9^{9^{9^{9^{9^{9}}}}}}",
               "\\boxed{" + "1+" * 50000 + "1}", "x" * 100_000 + "\\boxed{3}", "\\boxed{\\frac{" * 300,
               "$\\boxed{10^{10^{10^{10}}}!}$"]


def test_math_reward_adversarial_from_threads():
    results, t0 = {}, time.time()
    def work(i, text):
        results[i] = math_reward(text, "3")
    threads = [threading.Thread(target=work, args=(i, t)) for i, t in enumerate(ADVERSARIAL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "math_reward hung"
    assert time.time() - t0 < 60
    assert set(results) == set(range(len(ADVERSARIAL))) and all(r in (0.0, 1.0) for r in results.values())
