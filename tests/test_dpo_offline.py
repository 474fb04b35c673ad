"""dpo_offline.py end to end on the tiny model: its two phases (HF sampler), plain DPO on text
pairs, and a short run with the real vLLM engine."""

import json
import os

from conftest import SMALL, TRAIN_KEYS, check_run, need_vllm, read_jsonl, rm_flags, run_script

OFFLINE_KEYS = (TRAIN_KEYS - {"reward", "length"}) | {"pairs", "margin", "pair_acc"}


def test_dpo_offline_two_phases(tiny_model, rm_task, tmp_path):
    out = str(tmp_path / "run")
    p = run_script("dpo_offline.py", "--model", tiny_model, "--sampler", "hf", "--steps", 3,
                   "--out", out, *SMALL, *rm_flags(rm_task))  # fmt: skip
    train = check_run(out, p, 3, OFFLINE_KEYS)
    pairs = read_jsonl(os.path.join(out, "pairs.jsonl"))
    assert pairs, "phase 1 formed no pair: the test would pass vacuously"
    for x in pairs:
        assert {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"} <= x.keys()
        assert x["chosen_reward"] > x["rejected_reward"]
        assert len(x["chosen_token_ids"]) == len(x["chosen_logprobs"])
        assert len(x["rejected_token_ids"]) == len(x["rejected_logprobs"])
    # phase 1, logged once
    assert {"reward", "length"} <= train[0].keys() and train[0]["time_gen"] > 0
    assert all(r["synced"] == 0 and r["time_gen"] == 0 for r in train[1:])
    assert all("reward" not in r for r in train[1:])  # nothing sampled after phase 1
    # 3 steps x 8 prompts: each sampled prompt visited once
    assert sum(r["pairs"] for r in train) == len(pairs)
    # step 0: the seed made them
    assert all(r["pairs"] > 0 for r in train) and abs(train[0]["logp_gap"]) < 1e-4
    # the seed is the reference throughout: on every step the gap to the generator is the KL
    assert all(abs(r["logp_gap"] - r["kl"]) < 1e-5 for r in train)


def test_dpo_offline_from_text_pairs(tiny_model, tmp_path):
    """--pairs: a plain DPO trainer on {prompt, chosen, rejected} text; generator log-probs
    unknown, gap 0."""
    path = tmp_path / "pairs.jsonl"
    rows = []
    for a, b in ((3, 4), (6, 7), (2, 9), (5, 8)):
        end = "I hope it is correct.\n\n"
        right = f" {a} * {b} = {a * b}. The final answer is $\\boxed{{{a * b}}}$. {end}"
        wrong = f" {a} * {b} = {a * b + 1}. The final answer is $\\boxed{{{a * b + 1}}}$. {end}"
        rows.append({"prompt": f"What is {a} * {b}?", "chosen": right, "rejected": wrong})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "run")
    p = run_script("dpo_offline.py", "--model", tiny_model, "--sampler", "hf", "--pairs", str(path),
                   "--steps", 2, "--out", out, "--prompts_per_step", 4, "--max_new_tokens", 48,
                   "--val_size", 8, "--lr", 1e-3)  # fmt: skip
    train = check_run(out, p, 2, (TRAIN_KEYS - {"reward", "length"}) | {"pairs", "margin"})
    assert [r["pairs"] for r in train] == [4, 4] and all(r["logp_gap"] == 0 for r in train)
    assert train[1]["margin"] > 0  # lr 1e-3: one step on the same four pairs moves them right
    assert not os.path.exists(os.path.join(out, "pairs.jsonl"))


def test_vllm_smoke(tiny_model, rm_task, tmp_path):
    """A short run with the real vLLM engine. Phase 1 must find pairs (it stops otherwise): its
    prompts are scored by the tiny reward model (rm_task)."""
    need_vllm()
    out = str(tmp_path / "run")
    p = run_script("dpo_offline.py", "--model", tiny_model, "--sampler", "vllm", "--steps", 2,
                   "--out", out, "--data", rm_task[0], "--reward_model", rm_task[1],
                   *SMALL)  # fmt: skip
    train = check_run(out, p, 2, {"step", "loss", "logp_gap", "kl", "entropy", "time_train"})
    assert os.path.exists(os.path.join(out, "pairs.jsonl")) and train[0]["time_gen"] > 0
