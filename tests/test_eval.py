"""eval.py: the command line on each local benchmark (HF and vLLM samplers), answer normalisers, data.py's NuminaMath
filter, the length-controlled win rate, checkpoint selection, AlpacaEval submissions judged by a tiny reward model."""
import json, math, os, re, subprocess, sys

import numpy as np
import pytest
import torch

from conftest import ROOT, SHARED, build_tiny_rm, metrics, need_vllm, read_jsonl, run_script
from data import arithmetic_task

# A few rows in each local file's schema (../shared/data/README.md): one-digit products the tiny model was fitted on,
# so that it gets some of them right
TRAIN = [r for r in arithmetic_task(0)[0] if all(int(x) < 10 for x in r["problem"][len("What is "):-1].split(" * "))]
LOCAL = {
    "math500.jsonl": [{"problem": r["problem"], "answer": r["answer"], "solution": "...", "subject": "Prealgebra",
                       "level": 1, "unique_id": f"test/{k}.json"} for k, r in enumerate(TRAIN[0:4])],
    "amc23.jsonl": [{"problem": r["problem"], "answer": r["answer"] + ".0", "url": "u"} for r in TRAIN[4:7]],
    "aime24.jsonl": [{"problem": r["problem"], "answer": r["answer"], "url": "u"} for r in TRAIN[7:10]],
    # local copies keep the number; the last row is as the hub has it: a worked solution, "####", a comma
    "gsm8k_test.jsonl": [{"problem": r["problem"], "answer": r["answer"], "solution": f"#### {r['answer']}"}
                         for r in TRAIN[10:12]] + [{"problem": "What is 617 * 2?",
                                                    "answer": "617 * 2 = <<617*2=1234>>1234.\n#### 1,234"}],
    "alpaca_eval.jsonl": [{"prompt": "Name a colour.", "reference": "Blue.", "dataset": "helpful_base"},
                          {"prompt": "Write one sentence about the sea.", "reference": "The sea is wide, deep and "
                           "restless, and it covers most of the planet.", "dataset": "koala"},
                          {"prompt": "What is 2 * 3?", "reference": "2 * 3 = 6.", "dataset": "oasst"},
                          {"prompt": "Say hello.", "reference": "Hello! How can I help you today? I am happy to help "
                           "with anything you need.", "dataset": "selfinstruct"}],
}
MATH = ["math500", "amc23", "aime24", "gsm8k"]


def write_data(folder):
    os.makedirs(folder, exist_ok=True)
    for name, rows in LOCAL.items():
        with open(os.path.join(folder, name), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(folder)


def test_gsm8k_answer_and_last_boxed():
    from data import last_boxed
    from eval import gsm8k_answer
    assert gsm8k_answer("She pays 1,000 + 234 = <<1000+234=1234>>1234.\n#### 1,234") == "1234"
    assert gsm8k_answer("18") == "18" and gsm8k_answer("#### -3.5") == "-3.5"
    assert last_boxed("so $\\boxed{1}$, then $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1, 2\\} \\cup {3}}") == "\\{1, 2\\} \\cup {3}"
    assert last_boxed("no answer") is None and last_boxed("cut off \\boxed{\\frac{1}{2") is None


def test_numina_filter():
    """Synthetic NuminaMath-CoT rows through the paper's filter (the real split needs the hub)."""
    import data
    good = [{"problem": f"Compute {k} + 1.", "solution": f"It is $\\boxed{{{k + 1}}}$.", "source": "olympiads"}
            for k in range(6)]
    bad = [{"problem": "Compute 1 + 1.", "solution": "$\\boxed{2}$", "source": s}
           for s in ("orca_math", "synthetic_amc", "synthetic_math")] + [
        {"problem": "Prove that there are infinitely many primes.", "solution": "So $\\boxed{\\infty}$",
         "source": "aops_forum"},
        {"problem": "Show that x > 0.", "solution": "Since ... $\\boxed{x > 0}$", "source": "olympiads"},
        {"problem": "Find x.", "solution": "No boxed answer here.", "source": "olympiads"},
        {"problem": "Which is larger? (A) 1 (B) 2 (C) 3", "solution": "$\\boxed{3}$", "source": "amc_aime"},
        {"problem": "Which set is empty?\nA: {1}\nB: {}\nC: {2}", "solution": "$\\boxed{B}$", "source": "cn_k12"},
        {"problem": "Pick the right one.", "solution": "$\\boxed{\\text{(D)}}$", "source": "olympiads"}]
    train, val, test = data.numina_splits(bad + good + [dict(good[0])], seed=0, held_out=2)
    assert len(val) == len(test) == 2 and len(train) == 3
    kept = train + val + test
    assert {r["source"] for r in kept} == {"olympiads"} and all(r["problem"].startswith("Compute") for r in kept)
    assert all(r["answer"] == str(int(r["problem"].split()[1]) + 1) for r in kept)
    order = lambda seed: [r["problem"] for r in sum(data.numina_splits(good, seed, held_out=2), [])]
    assert order(0) == order(0) != order(1)  # a seeded shuffle


@pytest.mark.parametrize("slope", [0.0, 1.0])
def test_lc_win_rate_recovers_intercept(slope):
    """Wins drawn from a logistic model in the scaled length difference: sigmoid(intercept) is recovered; with a
    nonzero slope and outputs longer on average the raw win rate is well off it, the length-controlled one not."""
    from eval import lc_win_rate
    rng = np.random.default_rng(0)
    diff = rng.normal(300.0, 400.0, 20000)  # characters: outputs longer than their references on average
    intercept = -0.4
    wins = (rng.random(diff.size) < 1 / (1 + np.exp(-(intercept + slope * diff / diff.std())))).astype(float)
    lc, coef = lc_win_rate(wins, diff)
    truth = 1 / (1 + math.exp(-intercept))
    assert abs(lc - truth) < 0.02 and abs(coef[1] - slope) < 0.1, (lc, coef)
    assert (abs(wins.mean() - truth) > 0.1) == (slope != 0), wins.mean()
    assert lc_win_rate(np.ones(50), rng.normal(0, 1, 50))[0] > 0.9  # every comparison won: a finite fit, near 1


def test_plot_summarizes_seeds(tmp_path):
    """eval.py --plot on two seeds of one method and one of another: the figure, and the study table's mean +- SE
    over seeds, gain, entropy of the last 10 steps (a step without pairs logs 0: left out) and median minutes."""
    def run(name, before, after, entropies):
        os.makedirs(tmp_path / name)
        rows = [{"step": 0, "val_reward": before, "val_reward_se": 0.02, "val_length": 9.0, "time_val": 30.0}]
        rows[0] |= {"entropy": entropies[0], "time_gen": 6.0, "time_train": 24.0}
        rows += [{"step": s, "entropy": e, "time_gen": 6.0, "time_train": 24.0} for s, e in enumerate(entropies[1:], 1)]
        rows += [{"step": len(entropies), "val_reward": after, "val_reward_se": 0.03, "val_length": 7.0, "time_val": 30.0}]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)
    runs = [run("a_seed0", 0.3, 0.5, [0.9] * 8 + [0.2, 0.0] + [0.3] * 8), run("a_seed1", 0.4, 0.5, [0.5] * 20),
            run("b_seed0", 0.3, 0.35, [0.1] * 20), run("b_seed1", 0.4, 0.3, [0.1] * 20)]
    (tmp_path / "a_seed0" / "wall_seconds").write_text("600\n120\n")  # two launches: 12 min
    (tmp_path / "a_seed1" / "wall_seconds").write_text("840\n")
    p = run_script("eval.py", "--plot", *runs, "--out", tmp_path / "study.png")
    assert os.path.getsize(tmp_path / "study.png") > 10000
    tables = p.stdout.split("\n\n")
    assert len(tables) == 2, p.stdout
    table, diff = ({line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in t.splitlines() if "|" in line}
                   for t in tables)
    a, b = table["a"], table["b"]
    # a: before 0.3, 0.4 -> 0.35 +- 0.05; after 0.5, 0.5; gain 0.2, 0.1 -> 0.15 +- 0.05; entropy of steps 8-17 of
    # seed 0: (0.2 + 8 x 0.3) / 9 = 0.2889 (step 9's 0 left out), of steps 10-19 of seed 1: 0.5 -> 0.394 +- 0.106
    assert a[:5] == ["2", "0.350 +- 0.050", "0.500 +- 0.000", "0.150 +- 0.050", "0.394 +- 0.106"], a
    # val length 7, one run's SE 0.03; minutes: 18 steps x 30 s + 2 x 30 s = 10 min, 20 steps: 11 min -> 10.5
    # wall clock: 12 and 14 min -> 13; b has no wall_seconds
    assert a[5:] == ["7.000 +- 0.000", "0.030", "10.5", "13.0 |"], a
    assert b[:4] == ["2", "0.350 +- 0.050", "0.325 +- 0.025", "-0.025 +- 0.075"] and b[-2:] == ["11.0", "nan |"], b
    # after, a - b paired by seed: 0.5 - 0.35 = 0.15 and 0.5 - 0.3 = 0.2 -> 0.175 +- 0.025, over 2 SE: starred
    assert diff["a"] == ["", "+0.175 +- 0.025* |"] and diff["b"] == ["-0.175 +- 0.025*", " |"], diff


@pytest.mark.parametrize("sampler", ["hf", "vllm"])
def test_eval_cli_local_benchmarks(tiny_model, tmp_path, sampler):
    """Every local math benchmark (--limit 3, 2 samples) plus alpaca_eval without a reward model (outputs only)."""
    if sampler == "vllm":
        need_vllm()
    data, out = write_data(tmp_path / "data"), str(tmp_path / "eval")
    p = run_script("eval.py", "--model", tiny_model, "--sampler", sampler, "--benchmarks",
                   ",".join(MATH + ["alpaca_eval"]), "--data_dir", data, "--limit", 3, "--samples", 2,
                   "--max_new_tokens", 24, "--out", out)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["model"] == tiny_model and summary["sampler"] == sampler
    assert (summary["temperature"], summary["top_p"], summary["samples"], summary["max_new_tokens"]) == (0.6, 0.9, 2, 24)
    from eval import math_rewards
    for name in MATH:
        r = summary["benchmarks"][name]
        assert (r["problems"], r["samples"]) == (3, 2) and 0 < r["length"] <= 24
        gens = read_jsonl(os.path.join(out, f"{name}_generations.jsonl"))
        assert [g["problem"] for g in gens] == [row["problem"] for row in LOCAL[f"{name}.jsonl" if name != "gsm8k" else
                                                                                   "gsm8k_test.jsonl"][:3]]
        assert all(len(g["responses"]) == 2 and set(g["rewards"]) <= {0.0, 1.0} for g in gens)
        per_problem = [sum(g["rewards"]) / 2 for g in gens]
        assert r["reward"] == pytest.approx(sum(per_problem) / 3)
        assert r["reward_se"] == pytest.approx(np.std(per_problem, ddof=1) / math.sqrt(3))
        # the printed table: benchmark, problems, samples, accuracy, se, length
        line = rf"^{name}\s+3\s+2\s+{r['reward']:.4f}\s+{r['reward_se']:.4f}\s+{r['length']:.1f}$"
        assert re.search(line, p.stdout, re.M), p.stdout
        # each sample scored with its own problem's answer (the tiny model is right on few samples, so this and
        # not a count of correct ones is what checks the scoring)
        assert [x for g in gens for x in g["rewards"]] == math_rewards([x for g in gens for x in g["responses"]],
                                                                      [g["answer"] for g in gens for _ in range(2)])
    assert read_jsonl(os.path.join(out, "gsm8k_generations.jsonl"))[2]["answer"] == "1234"
    assert read_jsonl(os.path.join(out, "amc23_generations.jsonl"))[0]["answer"] == TRAIN[4]["answer"] + ".0"
    outputs = json.load(open(os.path.join(out, "alpaca_eval_model_outputs.json")))
    assert [o["instruction"] for o in outputs] == [r["prompt"] for r in LOCAL["alpaca_eval.jsonl"][:3]]
    assert all(set(o) == {"instruction", "output", "generator", "dataset"} for o in outputs)
    assert all(o["generator"] == os.path.basename(tiny_model) for o in outputs)
    assert re.search(r"^alpaca_eval\s+3\s+1\s+-\s+-\s+[\d.]+$", p.stdout, re.M), p.stdout


def test_eval_torchrun_two_processes(tiny_model, tmp_path):
    """2 CPU processes, each sampling every other problem: the written files hold every row, in the data's order."""
    data, out = write_data(tmp_path / "data"), str(tmp_path / "eval")
    run_script("eval.py", "--model", tiny_model, "--sampler", "hf", "--benchmarks", "math500,alpaca_eval",
               "--data_dir", data, "--samples", 2, "--max_new_tokens", 8, "--out", out, nproc=2)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["world_size"] == 2 and summary["benchmarks"]["math500"]["problems"] == 4
    gens = read_jsonl(os.path.join(out, "math500_generations.jsonl"))
    assert [g["problem"] for g in gens] == [r["problem"] for r in LOCAL["math500.jsonl"]]
    assert summary["benchmarks"]["math500"]["reward"] == pytest.approx(sum(sum(g["rewards"]) / 2 for g in gens) / 4)
    outputs = json.load(open(os.path.join(out, "alpaca_eval_model_outputs.json")))
    assert [o["instruction"] for o in outputs] == [r["prompt"] for r in LOCAL["alpaca_eval.jsonl"]]


@pytest.mark.parametrize("flags, message", [
    (["--benchmarks", "math500,nope"], "unknown 'nope'"),
    (["--benchmarks", "math500", "--data_dir", "/nonexistent"], "no local copy"),
    (["--benchmarks", "gsm8k=BAD"], "BAD:2: not valid JSON")])
def test_bad_input_fails_before_loading(tmp_path, flags, message):
    (tmp_path / "BAD").write_text('{"problem": "1 + 1", "answer": "2"}\n{"problem": \n')
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # where `datasets` is installed: no download
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), *flags], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120, env=env)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-2000:]
    assert "Loading weights" not in p.stderr + p.stdout


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="no ../shared/data")
def test_shared_local_copies_load():
    from eval import load_benchmark
    sizes = {"math500": 500, "amc23": 40, "aime24": 30, "gsm8k": 1319, "alpaca_eval": 805}
    for name, n in sizes.items():
        rows = load_benchmark(name, SHARED, 0)
        assert len(rows) == n and all(r["problem"] for r in rows)
        assert all(r.get("reference") for r in rows) if name == "alpaca_eval" else all(r["answer"] for r in rows)
    assert all(re.fullmatch(r"-?[\d.]+", r["answer"]) for r in load_benchmark("gsm8k", SHARED, 0))


def write_metrics(run, rows):
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_select_checkpoint(tiny_model, tmp_path):
    """A 2-step run checkpointed and validated every step (responses up to 40 tokens, so lengths vary). Ranking by
    logged val_reward / val_length (set so that the higher reward loses on the ratio); then, with no validation
    logged, each checkpoint is validated again (one sampler, weights copied in) and gets the numbers training logged."""
    run = str(tmp_path / "run")
    run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "hf", "--steps", 2, "--save_every", 1,
               "--val_every", 1, "--val_size", 8, "--prompts_per_step", 4, "--n", 2, "--max_new_tokens", 40,
               "--lr", 1e-3, "--out", run)  # lr 1e-3: the two checkpoints sample differently
    rows = metrics(run)
    logged = {r["step"]: r for r in rows if "val_reward" in r}
    assert set(logged) == {0, 1, 2}

    fake = {1: (0.5, 10.0), 2: (0.75, 30.0)}  # ratios 0.05 and 0.025: step 1 is best despite its lower reward
    write_metrics(run, [r | ({"val_reward": fake[r["step"]][0], "val_length": fake[r["step"]][1]} if r["step"] in fake
                             else {}) for r in rows])
    p = run_script("eval.py", "--select", run, "--sampler", "hf")
    sel = json.load(open(os.path.join(run, "selection.json")))
    assert [(r["step"], r["source"]) for r in sel["ranking"]] == [(1, "log"), (2, "log")]
    for r in sel["ranking"]:
        reward, length = fake[r["step"]]
        assert (r["val_reward"], r["val_length"], r["ratio"]) == pytest.approx((reward, length, reward / length))
        assert re.search(rf"^\s+{r['step']}\s+{r['val_reward']:.4f}\s+{r['val_length']:.1f}\s+{r['ratio']:.5f}\s+log$",
                         p.stdout, re.M), p.stdout
    assert sel["best"] == os.path.join(run, "step_000001") and f"best checkpoint: {sel['best']}" in p.stdout

    write_metrics(run, [{k: v for k, v in r.items() if not k.startswith("val_")} for r in rows])
    p = run_script("eval.py", "--select", run, "--sampler", "hf")
    sel = {r["step"]: r for r in json.load(open(os.path.join(run, "selection.json")))["ranking"]}
    assert all(sel[s]["source"] == "evaluated" for s in (1, 2))
    assert len(re.findall(r"^\s+[12]\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+evaluated$", p.stdout, re.M)) == 2, p.stdout
    # the same weights, validation set, seed and sampler as in training: the same samples
    for s in (1, 2):
        assert (sel[s]["val_reward"], sel[s]["val_length"]) == pytest.approx(
            (logged[s]["val_reward"], logged[s]["val_length"]), abs=1e-9)
    # else a checkpoint evaluated with the other's weights would pass: lr 1e-3 makes them differ by construction
    from common import load_weights
    w1, w2 = (load_weights(os.path.join(run, f"step_00000{s}")) for s in (1, 2))
    assert any(not torch.equal(w1[k], w2[k]) for k in w1)


def test_alpaca_eval_with_reward_model(tiny_model, tmp_path):
    from eval import lc_win_rate, load_reward_model, rm_scores
    rm_path, _ = build_tiny_rm(str(tmp_path / "rm"), tiny_model)
    data, out = write_data(tmp_path / "data"), str(tmp_path / "eval")
    p = run_script("eval.py", "--model", tiny_model, "--sampler", "hf", "--benchmarks", "alpaca_eval", "--data_dir", data,
                   "--reward_model", rm_path, "--max_new_tokens", 24, "--out", out)
    rows = LOCAL["alpaca_eval.jsonl"]
    outputs = json.load(open(os.path.join(out, "alpaca_eval_model_outputs.json")))
    assert isinstance(outputs, list) and len(outputs) == 4
    assert [(o["instruction"], o["dataset"]) for o in outputs] == [(r["prompt"], r["dataset"]) for r in rows]
    assert all(set(o) == {"instruction", "output", "generator", "dataset"} and isinstance(o["output"], str)
               for o in outputs)
    gens = read_jsonl(os.path.join(out, "alpaca_eval_generations.jsonl"))
    rm = load_reward_model(rm_path, torch.device("cpu"))
    prompts = [r["prompt"] for r in rows]
    assert [g["score"] for g in gens] == pytest.approx(rm_scores(rm, prompts, [o["output"] for o in outputs]), abs=1e-5)
    assert [g["reference_score"] for g in gens] == pytest.approx(rm_scores(rm, prompts, [r["reference"] for r in rows]),
                                                                 abs=1e-5)
    r = json.load(open(os.path.join(out, "summary.json")))["benchmarks"]["alpaca_eval"]
    wins = [1.0 if g["score"] > g["reference_score"] else 0.5 if g["score"] == g["reference_score"] else 0.0
            for g in gens]
    assert r["win_rate"] == pytest.approx(sum(wins) / 4) and 0 <= r["win_rate"] <= 1 and 0 <= r["lc_win_rate"] <= 1
    assert r["lc_win_rate"] == pytest.approx(lc_win_rate(wins, [len(o["output"]) - len(x["reference"])
                                                                for o, x in zip(outputs, rows)])[0])
    assert re.search(rf"^alpaca_eval\s+4\s+1\s+{r['win_rate']:.4f}\s+[\d.]+\s+[\d.]+\s+\(win rate; length-controlled "
                     rf"{r['lc_win_rate']:.4f}\)$", p.stdout, re.M), p.stdout


def test_arena_hard_answers_and_win_rate(tiny_model, tmp_path):
    """Arena-Hard-Auto's own data/ layout (questions, the GPT-4-0314 baseline's answers) in --data_dir: answers
    written in its model_answer format, and the reward model's win rate against the baseline."""
    from eval import load_reward_model, rm_scores
    rm_path, _ = build_tiny_rm(str(tmp_path / "rm"), tiny_model)
    data = tmp_path / "data" / "arena-hard-v0.1"
    os.makedirs(data / "model_answer")
    questions = [{"question_id": f"q{k}", "category": "arena-hard-v0.1", "cluster": "c", "turns": [{"content": p}]}
                 for k, p in enumerate(["Name a colour.", "Say hello.", "What is 2 * 3?"])]
    baseline = [{"question_id": q["question_id"], "answer_id": "a", "model_id": "gpt-4-0314", "tstamp": 0.0,
                 "choices": [{"index": 0, "turns": [{"content": answer}]}]}
                for q, answer in zip(questions, ["Blue.", "Hello! How can I help?", "2 * 3 = 6."])]
    (data / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    (data / "model_answer" / "gpt-4-0314.jsonl").write_text("".join(json.dumps(b) + "\n" for b in baseline))
    out = str(tmp_path / "eval")
    run_script("eval.py", "--model", tiny_model, "--sampler", "hf", "--benchmarks", "arena_hard", "--data_dir",
               tmp_path / "data", "--reward_model", rm_path, "--max_new_tokens", 16, "--out", out)
    answers = read_jsonl(os.path.join(out, "arena_hard", "model_answer", f"{os.path.basename(tiny_model)}.jsonl"))
    assert [a["question_id"] for a in answers] == ["q0", "q1", "q2"]
    assert all(a["model_id"] == os.path.basename(tiny_model) and len(a["choices"]) == 1
               and set(a["choices"][0]["turns"][0]) == {"content", "token_len"} for a in answers)
    rm = load_reward_model(rm_path, torch.device("cpu"))
    prompts = [q["turns"][0]["content"] for q in questions]
    ours = rm_scores(rm, prompts, [a["choices"][0]["turns"][0]["content"] for a in answers])
    theirs = rm_scores(rm, prompts, [b["choices"][0]["turns"][0]["content"] for b in baseline])
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(ours, theirs)]
    r = json.load(open(os.path.join(out, "summary.json")))["benchmarks"]["arena_hard"]
    assert r["problems"] == 3 and r["win_rate"] == pytest.approx(sum(wins) / 3)
