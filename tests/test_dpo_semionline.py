"""dpo_semionline.py end to end on the tiny model: both samplers, sync semantics, resume, torchrun, bad flags."""
import json, os, re

import pytest

from conftest import SMALL, metrics, need_vllm, run_script


@pytest.mark.parametrize("sampler", ["hf", "vllm"])
def test_sync_every_2_steps(tiny_model, rm_task, tmp_path, sampler):
    """--sync 2 over 4 steps: synced is 1, 0, 1, 0; the trainer agrees with the generator right after a sync and,
    lr 1e-3 having moved the policy, no longer one step later. Reward-model prompts: every step has pairs."""
    if sampler == "vllm":
        need_vllm()
    out = str(tmp_path / "run")
    data, rm = rm_task
    p = run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", sampler, "--steps", 4, "--sync", 2,
                   "--out", out, *SMALL, "--data", data, "--val_data", data, "--reward_model", rm)
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    assert [r["synced"] for r in train] == [1, 0, 1, 0]
    keys = {"step", "reward", "length", "entropy", "loss", "pairs", "synced", "logp_gap", "time_gen", "time_reward",
            "time_train", "time_sync", "margin", "kl", "reward_rm", "reward_timeouts", "skipped_steps"}
    assert all(keys <= r.keys() for r in train)
    assert all(r["pairs"] > 0 and r["entropy"] > 0 for r in train), "a step formed no pair: the test would be vacuous"
    for r in train:
        if r["synced"]:
            assert abs(r["logp_gap"]) < (1e-4 if sampler == "hf" else 2e-2), r
    stale = [r for r in train if not r["synced"]]
    assert len(stale) == 2 and all(abs(r["logp_gap"]) > 1e-3 for r in stale), stale
    assert {"val_reward", "val_length"} <= rows[0].keys() and rows[-1]["step"] == 4 and "val_reward" in rows[-1]
    assert re.search(r"val_reward before \(step 0\): -?[\d.]+ \+- [\d.]+", p.stdout)
    assert os.path.exists(os.path.join(out, "step_000004", "model.safetensors"))
    assert json.load(open(os.path.join(out, "args.json")))["sync"] == 2


def test_validation_between_syncs_restores_the_stale_generator(tiny_model, rm_task, tmp_path):
    """--sync 4 --val_every 3: step 3 validates the current policy, then the generator gets the step-0 weights back,
    so step 3 samples from a generator 3 updates stale (logp_gap away from 0), as steps 1 and 2 did."""
    out = str(tmp_path / "run")
    run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "hf", "--steps", 4, "--sync", 4, "--val_every", 3,
               "--out", out, *SMALL, "--data", rm_task[0], "--val_data", rm_task[0], "--reward_model", rm_task[1])
    train = [r for r in metrics(out) if "loss" in r]
    assert [r["synced"] for r in train] == [1, 0, 0, 0] and "val_reward" in train[3]
    assert all(r["pairs"] > 0 for r in train) and all(abs(r["logp_gap"]) > 1e-3 for r in train[1:]), train


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_torchrun_two_processes(tiny_model, rm_task, tmp_path, wrap):
    """2 CPU processes (gloo; DDP, or FSDP2 shards): both ranks end with identical weights. One pair per
    micro-batch, so gradients accumulate over several backwards before the one that all-reduces."""
    out = str(tmp_path / "run")
    # torchrun would take --n for itself; reward-model prompts, so that pairs form on every step
    small = ["--num_responses" if a == "--n" else a for a in SMALL] + ["--data", rm_task[0], "--val_data", rm_task[0],
                                                                        "--reward_model", rm_task[1]]
    # FSDP as on GPUs: bf16 mixed precision on fp32 shards, activation checkpointing, the reference (sharded too)
    # refreshed every step after its own forward passes
    fsdp = ["--fsdp", "true", "--bf16", "true", "--grad_ckpt", "true", "--sync", 1] if wrap == "fsdp" else []
    p = run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "hf", "--steps", 3, "--out", out, *small,
                   "--micro_batch", 2, *fsdp, nproc=2)
    prints = dict(re.findall(r"rank (\d) weights fingerprint ([-+\d.e]+)\n", p.stdout + p.stderr))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], prints
    train = [r for r in metrics(out) if "loss" in r]
    assert len(train) == 3 and all(r["pairs"] > 0 for r in train), train
    # resuming the finished run: the checkpoint (gathered to rank 0's CPU) is read back into both ranks' shards
    p = run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "hf", "--steps", 3, "--out", out, *small,
                   "--resume", out, *fsdp, nproc=2)
    assert "at step 3" in p.stdout
    assert dict(re.findall(r"rank (\d) weights fingerprint ([-+\d.e]+)\n", p.stdout + p.stderr)) == prints
