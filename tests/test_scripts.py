"""grpo.py, group_dpo.py and dpo_offline.py end to end on the tiny model: HF sampler, vLLM, torchrun."""
import json, math, os, re, subprocess, sys

import pytest

from conftest import SMALL, metrics, need_vllm, run_script

COMMON = {"step", "reward", "length", "entropy", "loss", "synced", "logp_gap", "kl", "time_gen", "time_reward",
          "time_train", "time_sync"}


def rm(task):
    """Flags for reward-model prompts (conftest.rm_task): every step forms pairs."""
    return ["--data", task[0], "--val_data", task[0], "--reward_model", task[1]]


def check_run(out, p, steps, keys):
    """Every training row has `keys`, validation before and after, a final checkpoint, the printed summary."""
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(steps))
    assert all(keys <= r.keys() and math.isfinite(r["loss"]) for r in train), [keys - r.keys() for r in train]
    assert {"val_reward", "val_length"} <= rows[0].keys() and rows[-1]["step"] == steps and "val_reward" in rows[-1]
    assert re.search(r"val_reward before \(step 0\): -?[\d.]+ \+- [\d.]+", p.stdout)
    assert os.path.exists(os.path.join(out, f"step_{steps:06d}", "model.safetensors"))
    return train


def test_grpo_sync_every_2_steps(tiny_model, rm_task, tmp_path):
    """--sync 2 over 4 steps: synced 1, 0, 1, 0; right after a sync the ratio to the generator is 1 (logp_gap 0,
    nothing clipped); one step later the stale generator no longer agrees with the policy."""
    out = str(tmp_path / "run")
    p = run_script("grpo.py", "--model", tiny_model, "--sampler", "hf", "--steps", 4, "--sync", 2, "--out", out, *SMALL,
                   *rm(rm_task))
    train = check_run(out, p, 4, COMMON | {"clip_frac", "adv_std", "frac_zero_std"})
    assert [r["synced"] for r in train] == [1, 0, 1, 0]
    assert all(r["frac_zero_std"] < 1 for r in train), "a step had no group with mixed rewards: the test is vacuous"
    for r in train:
        assert 0 <= r["frac_zero_std"] <= 1 and 0 <= r["clip_frac"] <= 1 and r["entropy"] > 0
        assert (r["adv_std"] > 0) == (r["frac_zero_std"] < 1)
        if r["synced"]:
            assert abs(r["logp_gap"]) < 1e-4 and r["clip_frac"] == 0, r
    stale = [r for r in train if not r["synced"]]
    assert len(stale) == 2 and all(abs(r["logp_gap"]) > 1e-3 for r in stale), stale
    args = json.load(open(os.path.join(out, "args.json")))
    assert args["sync"] == 2 and args["kl_beta"] == 0.001 and args["ref_sync"] is False and args["std_normalize"] is True


def test_group_dpo_with_grpo_term(tiny_model, rm_task, tmp_path):
    out = str(tmp_path / "run")
    p = run_script("group_dpo.py", "--model", tiny_model, "--sampler", "hf", "--steps", 3, "--sync", 1,
                   "--grpo_alpha", 0.01, "--micro_batch", 3, "--out", out, *SMALL, *rm(rm_task))
    train = check_run(out, p, 3, COMMON | {"pairs", "margin", "pair_acc"})
    assert all(r["pairs"] > 0 for r in train), "a step formed no pair: the test would pass vacuously"
    # at most 2 x 2 pairs (above and below the group's mean score) for each of the 8 prompts with 4 responses;
    # synced every step: the generator is the policy
    assert all(0 <= r["pairs"] <= 8 * 4 and abs(r["logp_gap"]) < 1e-4 for r in train)


def test_dpo_offline_two_phases(tiny_model, rm_task, tmp_path):
    out = str(tmp_path / "run")
    p = run_script("dpo_offline.py", "--model", tiny_model, "--sampler", "hf", "--steps", 3, "--out", out, *SMALL,
                   *rm(rm_task))
    train = check_run(out, p, 3, (COMMON - {"reward", "length"}) | {"pairs", "margin", "pair_acc"})
    pairs = [json.loads(l) for l in open(os.path.join(out, "pairs.jsonl"))]
    assert pairs, "phase 1 formed no pair: the test would pass vacuously"
    for x in pairs:
        assert {"prompt", "chosen", "rejected", "chosen_reward", "rejected_reward"} <= x.keys()
        assert x["chosen_reward"] > x["rejected_reward"]
        assert len(x["chosen_token_ids"]) == len(x["chosen_logprobs"]) and len(x["rejected_token_ids"]) == len(x["rejected_logprobs"])
    assert {"reward", "length"} <= train[0].keys() and train[0]["time_gen"] > 0  # phase 1, logged once
    assert all(r["synced"] == 0 and r["time_gen"] == 0 for r in train[1:])
    assert sum(r["pairs"] for r in train) == len(pairs)  # 3 steps x 8 prompts: each sampled prompt visited once
    assert all(r["pairs"] > 0 for r in train) and abs(train[0]["logp_gap"]) < 1e-4  # step 0: the seed made them
    # the seed is the reference throughout: on every step the gap to the generator is the KL estimate
    assert all(abs(r["logp_gap"] - r["kl"]) < 1e-5 for r in train)


def test_dpo_offline_from_text_pairs(tiny_model, tmp_path):
    """--pairs: a plain DPO trainer on {prompt, chosen, rejected} text; generator log-probs unknown, gap 0."""
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {a} * {b}?",
             "chosen": f" {a} * {b} = {a * b}. The final answer is $\\boxed{{{a * b}}}$. I hope it is correct.\n\n",
             "rejected": f" {a} * {b} = {a * b + 1}. The final answer is $\\boxed{{{a * b + 1}}}$. I hope it is correct.\n\n"}
            for a, b in ((3, 4), (6, 7), (2, 9), (5, 8))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "run")
    p = run_script("dpo_offline.py", "--model", tiny_model, "--sampler", "hf", "--pairs", str(path), "--steps", 2,
                   "--out", out, "--prompts_per_step", 4, "--max_new_tokens", 48, "--val_size", 8, "--lr", 1e-3)
    train = check_run(out, p, 2, (COMMON - {"reward", "length"}) | {"pairs", "margin"})
    assert [r["pairs"] for r in train] == [4, 4] and all(r["logp_gap"] == 0 for r in train)
    assert train[1]["margin"] > 0  # lr 1e-3: one step on the same four pairs moves them the right way
    assert not os.path.exists(os.path.join(out, "pairs.jsonl"))


def test_grpo_torchrun_two_processes(tiny_model, tmp_path):
    """2 CPU processes (gloo, DDP): the loss is finite and both ranks end with identical weights."""
    out = str(tmp_path / "run")
    small = ["--num_responses" if a == "--n" else a for a in SMALL]  # torchrun would take --n for itself
    # 16 responses per rank in micro-batches of 4: gradients accumulate over 4 backwards before the all-reduce
    p = run_script("grpo.py", "--model", tiny_model, "--sampler", "hf", "--steps", 2, "--micro_batch", 4, "--out", out,
                   *small, nproc=2)
    prints = dict(re.findall(r"rank (\d) weights fingerprint (\S+)", p.stdout + p.stderr))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], prints
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 2 and all(map(math.isfinite, losses)), losses


@pytest.mark.parametrize("script, extra", [("grpo.py", ["--sync", 1]), ("group_dpo.py", ["--sync", 1]),
                                           ("dpo_offline.py", [])])
def test_vllm_smoke(tiny_model, rm_task, tmp_path, script, extra):
    """One short run per script with the real vLLM engine; right after a sync the engines agree closely. Offline
    DPO's phase 1 must find pairs (it stops otherwise): its prompts are scored by the tiny reward model (rm_task)."""
    need_vllm()
    out = str(tmp_path / "run")
    if script == "dpo_offline.py":
        extra = ["--data", rm_task[0], "--reward_model", rm_task[1]]
    p = run_script(script, "--model", tiny_model, "--sampler", "vllm", "--steps", 2, "--out", out, *extra, *SMALL)
    train = check_run(out, p, 2, {"step", "loss", "logp_gap", "kl", "entropy", "time_train"})
    if script != "dpo_offline.py":
        assert all(r["synced"] == 1 and abs(r["logp_gap"]) < 2e-2 for r in train), train
    if script == "grpo.py":
        assert all(r["clip_frac"] < 0.01 for r in train), train  # the ratio is 1 up to the two engines' numerics
    if script == "dpo_offline.py":
        assert os.path.exists(os.path.join(out, "pairs.jsonl")) and train[0]["time_gen"] > 0
