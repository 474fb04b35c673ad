"""Reward models and mixed batches: a tiny random sequence-classification RM (plain and Athene-style),
per-sample routing of math vs reward-model rewards, and mixed training runs of every script."""
import json, math, os, subprocess, sys

import pytest
import torch

from conftest import CLS, ROOT, build_tiny_rm, metrics, run_script


@pytest.fixture(scope="module")
def rms(tiny_model, tmp_path_factory):
    return {kind: build_tiny_rm(str(tmp_path_factory.mktemp(kind)), tiny_model, kind == "athene")
            for kind in ("plain", "athene")}


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
    assert torch.equal(rm.model.score.weight, model.score.weight)  # athene: v_head loaded as the head
    prompts = ["What is 3 * 4?", "Write a haiku about the sea, please, in three lines."]
    responses = [" 12", " Waves fold into foam; salt wind carries gull cries home; the tide keeps its time."]
    ids = [rm.tokenizer(PLAIN_TEMPLATE.format(problem=p) + r)["input_ids"] + ([CLS] if kind == "athene" else [])
           for p, r in zip(prompts, responses)]
    assert len(ids[0]) != len(ids[1])  # the batch is padded: the score must not depend on it
    expected = [reference_score(model, x) for x in ids]
    got = rm_scores(rm, prompts, responses, batch_size=2)
    assert got == pytest.approx(expected, abs=1e-5) and got[0] != pytest.approx(got[1], abs=1e-6)
    # truncation: at most max_length tokens, the CLS kept last
    rm.max_length = 8
    assert rm_scores(rm, prompts[1:], responses[1:]) == pytest.approx(
        [reference_score(model, ids[1][:7] + [CLS] if kind == "athene" else ids[1][:8])], abs=1e-5)


def test_mixed_batch_routing(rms):
    """Rows with an answer get Math-Verify's 0/1, rows without get the reward model's score, in one batch."""
    from eval import load_reward_model, rm_scores, score_responses, task_means, task_sums
    rm = load_reward_model(rms["athene"][0], torch.device("cpu"))
    rows = [{"problem": "What is 3 * 4?", "answer": "12"}, {"problem": "Tell me a joke."},
            {"problem": "What is 6 * 7?", "answer": "42"}, {"problem": "Name a colour."}]
    responses = [" The final answer is $\\boxed{12}$.", " Why did the chicken cross the road?",
                 " The final answer is $\\boxed{41}$.", " Blue."]
    rewards, timeouts = score_responses(rows, responses, rm)
    rm_part = rm_scores(rm, [rows[1]["problem"], rows[3]["problem"]], [responses[1], responses[3]])
    assert rewards == pytest.approx([1.0, rm_part[0], 0.0, rm_part[1]], abs=1e-6)
    assert task_means(task_sums(rows, rewards)) == pytest.approx({"reward_math": 0.5, "reward_rm": sum(rm_part) / 2})
    assert timeouts == 0
    with pytest.raises(SystemExit, match="--reward_model"):
        score_responses(rows, responses, None)


def mixed_data(path, n_rm=8):
    from data import arithmetic_task
    rows = arithmetic_task(0)[0][:8] + [{"prompt": f"Describe the number {k} in one sentence."} for k in range(n_rm)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("script", ["dpo_semionline.py", "grpo.py", "group_dpo.py", "dpo_offline.py"])
def test_mixed_training_run(tiny_model, rms, tmp_path, script):
    """Paper Table 3's mixed setting on the tiny model: math rows and reward-model rows in the same batches,
    per-task rewards logged; validation on the mixed set uses both rewards too."""
    data = mixed_data(tmp_path / "mixed.jsonl")
    out = str(tmp_path / "run")
    p = run_script(script, "--model", tiny_model, "--sampler", "hf", "--reward_model", rms["athene"][0], "--data", data,
                   "--val_data", data, "--val_size", 0, "--steps", 2, "--prompts_per_step", 8, "--n", 4,
                   "--max_new_tokens", 24, "--lr", 1e-3, "--out", out)
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    tasks = train[:1] if script == "dpo_offline.py" else train  # offline: phase 1 is logged in the step-0 row
    assert all({"reward_math", "reward_rm"} <= r.keys() for r in tasks), tasks
    assert all(0 <= r["reward_math"] <= 1 for r in tasks)
    assert all(r["reward_rm"] not in (0.0, 1.0) for r in tasks)  # real reward-model scores, not 0/1
    assert "val_reward" in rows[0] and "val_reward before" in p.stdout


def test_rows_without_answer_need_reward_model(tiny_model, tmp_path):
    data = mixed_data(tmp_path / "mixed.jsonl", n_rm=1)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), "--model", tiny_model, "--data", data], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "mixed.jsonl:9: row has no 'answer' (rows without one need --reward_model)" in p.stderr
    assert "Loading weights" not in p.stderr + p.stdout
