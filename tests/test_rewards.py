"""Rewards: Math-Verify on the benchmarks' answers, equivalences and adversarial input, its worker
pool (many workers on few cores, timeouts, a worker that cannot start); a tiny random
sequence-classification reward model (plain and Athene-style) against hand computation; per-sample
routing of math vs reward-model rewards, and mixed training runs of every script."""

import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import CLS, ROOT, SHARED, build_tiny_rm, metrics, run_script
from eval import math_reward, math_rewards


def boxed(ans):
    return f"Reasoning... The final answer is $\\boxed{{{ans}}}$. I hope it is correct."


@pytest.mark.parametrize(
    "name", ["math500.jsonl", "amc23.jsonl", "aime24.jsonl", "gsm8k_test.jsonl"]
)
def test_math_reward_on_benchmark_answers(name):
    path = os.path.join(SHARED, name)
    if not os.path.exists(path):
        pytest.skip(f"{path} not present")
    rows = [json.loads(line) for line in open(path)][:40]
    rows = [r for r in rows if r["answer"].strip()]
    answers = [r["answer"] for r in rows]
    right = math_rewards([boxed(a) for a in answers], answers)
    wrong = math_rewards([boxed("\\frac{1234567}{89}") for _ in rows], answers)
    assert sum(right) / len(rows) >= 0.95, [a for a, x in zip(answers, right) if x == 0]
    assert sum(wrong) == 0


def test_math_reward_equivalences():
    assert math_reward(boxed("\\frac{1}{2}"), "0.5") == 1.0
    assert math_reward(boxed("0.5"), "\\frac12") == 1.0
    assert math_reward(boxed("2\\sqrt{3}"), "\\sqrt{12}") == 1.0
    assert math_reward(boxed("7"), "8") == 0.0
    assert math_reward("no answer at all", "8") == 0.0
    assert math_reward(None, "8") == 0.0  # never raises


ADVERSARIAL = [
    "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
    "\\boxed{9^{9^{9^{9^{9^{9}}}}}}",
    "\\boxed{" + "1+" * 50000 + "1}",
    "x" * 100_000 + "\\boxed{3}",
    "\\boxed{\\frac{" * 300,
    "$\\boxed{10^{10^{10^{10}}}!}$",
]


def test_math_reward_adversarial_from_threads():
    results = {}
    t0 = time.time()

    def work(i, text):
        results[i] = math_reward(text, "3")

    threads = [threading.Thread(target=work, args=(i, t)) for i, t in enumerate(ADVERSARIAL)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "math_reward hung"
    assert time.time() - t0 < 60
    assert set(results) == set(range(len(ADVERSARIAL)))
    assert all(r in (0.0, 1.0) for r in results.values())


def test_math_rewards_hold_with_16_workers_on_2_cores():
    """From a process that imported torch and transformers: 64 plainly correct answers, 16 workers,
    twice."""
    code = (
        "import torch, transformers, transformers.models.llama\nfrom eval import math_rewards\n"
        "responses = [f'{a} * 6 = {a * 6}. The final answer is $\\\\boxed{{{a * 6}}}$.' "
        "for a in range(64)]\n"
        "for _ in range(2):\n"
        "    print(sum(math_rewards(responses, [str(a * 6) for a in range(64)], num_workers=16)))\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0 and p.stdout.split() == ["64.0", "64.0"], p.stdout + p.stderr[-3000:]


def test_reward_timeouts_counted_and_fatal():
    """The pool's own machinery with a stand-in worker that hangs on demand: a hung answer is
    scored 0 and counted, its worker replaced; when most answers of a batch time out the run
    stops."""
    worker = (
        "import sys, time\nprint('ready', flush=True)\nfor line in sys.stdin:\n"
        "    time.sleep(1000 if 'hang' in line else 0)\n    print(1.0, flush=True)\n"
    )
    code = (
        f"import eval\neval._WORKER = {worker!r}\n"
        "print(eval.math_verify(['ok', 'hang', 'ok', 'hang'], ['1'] * 4, num_workers=2, "
        "timeout=1.0))\n"
        "print(eval.math_verify(['ok'] * 3, ['1'] * 3, num_workers=2, timeout=1.0))\n"
        "eval.score_responses([{'problem': 'p', 'answer': '1'}] * 3, ['hang', 'hang', 'ok'])\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.stdout.splitlines() == ["([1.0, 0.0, 1.0, 0.0], 2)", "([1.0, 1.0, 1.0], 0)"], (
        p.stdout + p.stderr
    )
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        "-c: error: Math-Verify timed out on 2 of 3 answers: rewards would be silent zeros"
    ), p.stderr


def test_math_verify_that_cannot_start_stops_with_one_line():
    code = (
        "import eval\neval._WORKER = 'raise SystemExit(3)'\n"
        "eval.math_rewards(['$\\\\boxed{1}$'], ['1'])\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 1 and "Math-Verify could not start (its worker exited" in last, p.stderr


# ---- Reward models ----
@pytest.fixture(scope="module")
def rms(tiny_model, tmp_path_factory):
    return {
        kind: build_tiny_rm(str(tmp_path_factory.mktemp(kind)), tiny_model, kind == "athene")
        for kind in ("plain", "athene")
    }


def reference_score(model, ids):
    """The score by hand: the head applied to the final hidden state of the last token."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return (model.score.weight @ hidden).item()


@pytest.mark.parametrize("kind", ["plain", "athene"])
def test_rm_scores_match_hand_computation(rms, kind):
    from data import PLAIN_TEMPLATE
    from eval import load_reward_model, rm_scores

    path, model = rms[kind]
    rm = load_reward_model(path, torch.device("cpu"))
    assert rm.cls_token_id == (CLS if kind == "athene" else None)
    assert torch.equal(rm.model.score.weight, model.score.weight)  # athene: v_head as the head
    prompts = ["What is 3 * 4?", "Write a haiku about the sea, please, in three lines."]
    responses = [
        " 12",
        " Waves fold into foam; salt wind carries gull cries home; the tide keeps its time.",
    ]
    cls = [CLS] if kind == "athene" else []
    ids = [
        rm.tokenizer(PLAIN_TEMPLATE.format(problem=p) + r)["input_ids"] + cls
        for p, r in zip(prompts, responses)
    ]
    assert len(ids[0]) != len(ids[1])  # the batch is padded: the score must not depend on it
    expected = [reference_score(model, x) for x in ids]
    got = rm_scores(rm, prompts, responses, batch_size=2)
    assert got == pytest.approx(expected, abs=1e-5) and got[0] != pytest.approx(got[1], abs=1e-6)
    # truncation: at most max_length tokens, the CLS kept last
    rm.max_length = 8
    cut = ids[1][:7] + [CLS] if kind == "athene" else ids[1][:8]
    assert rm_scores(rm, prompts[1:], responses[1:]) == pytest.approx(
        [reference_score(model, cut)], abs=1e-5
    )


def test_mixed_batch_routing(rms):
    """Rows with an answer get Math-Verify's 0/1, rows without get the reward model's score, in one
    batch; the per-task means as the training scripts log them."""
    from flags import mean_metrics
    from eval import load_reward_model, rm_scores, score_responses, task_sums

    assert load_reward_model("", torch.device("cpu")) is None  # no --reward_model
    rm = load_reward_model(rms["athene"][0], torch.device("cpu"))
    rows = [
        {"problem": "What is 3 * 4?", "answer": "12"},
        {"problem": "Tell me a joke."},
        {"problem": "What is 6 * 7?", "answer": "42"},
        {"problem": "Name a colour."},
    ]
    responses = [
        " The final answer is $\\boxed{12}$.",
        " Why did the chicken cross the road?",
        " The final answer is $\\boxed{41}$.",
        " Blue.",
    ]
    rewards, timeouts = score_responses(rows, responses, rm)
    rm_part = rm_scores(rm, [rows[1]["problem"], rows[3]["problem"]], [responses[1], responses[3]])
    assert rewards == pytest.approx([1.0, rm_part[0], 0.0, rm_part[1]], abs=1e-6)
    tasks = {"n_math": ["reward_math"], "n_rm": ["reward_rm"]}
    means = mean_metrics(task_sums(rows, rewards), tasks)
    assert means == pytest.approx({"reward_math": 0.5, "reward_rm": sum(rm_part) / 2})
    # a batch of one task has no mean of the other
    assert mean_metrics(task_sums(rows[:1], rewards[:1]), tasks) == {"reward_math": 1.0}
    assert timeouts == 0
    with pytest.raises(SystemExit, match="--reward_model"):
        score_responses(rows, responses, None)


def mixed_data(path, n_rm=8):
    from data import arithmetic_task

    rows = arithmetic_task(0)[0][:8]
    rows += [{"prompt": f"Describe the number {k} in one sentence."} for k in range(n_rm)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize(
    "script", ["dpo_semionline.py", "grpo.py", "group_dpo.py", "dpo_offline.py"]
)
def test_mixed_training_run(tiny_model, rms, tmp_path, script):
    """Paper Table 3's mixed setting on the tiny model: math rows and reward-model rows in the same
    batches, per-task rewards logged; validation on the mixed set uses both rewards too."""
    data = mixed_data(tmp_path / "mixed.jsonl")
    out = str(tmp_path / "run")
    p = run_script(script, "--model", tiny_model, "--sampler", "hf", "--reward_model",
                   rms["athene"][0], "--data", data, "--val_data", data, "--val_size", 0,
                   "--steps", 2, "--prompts_per_step", 8, "--n", 4, "--max_new_tokens", 24,
                   "--lr", 1e-3, "--out", out)  # fmt: skip
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    tasks = train[:1] if script == "dpo_offline.py" else train  # offline: phase 1 is in step 0
    assert all({"reward_math", "reward_rm"} <= r.keys() for r in tasks), tasks
    assert all(0 <= r["reward_math"] <= 1 for r in tasks)
    assert all(r["reward_rm"] not in (0.0, 1.0) for r in tasks)  # real reward-model scores
    assert "val_reward" in rows[0] and "val_reward before" in p.stdout


def test_rows_without_answer_need_reward_model(tiny_model, tmp_path):
    data = mixed_data(tmp_path / "mixed.jsonl", n_rm=1)
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--model", tiny_model, "--data", data]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    message = "mixed.jsonl:9: row has no 'answer' (rows without one need --reward_model)"
    assert p.returncode != 0 and message in p.stderr, p.stderr[-3000:]
    assert "Loading weights" not in p.stderr + p.stdout
