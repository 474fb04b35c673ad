"""dpo_semionline.py end to end on the tiny model: both samplers, the sync semantics, validation
between syncs."""

import json
import math
import os

import pytest

from conftest import SMALL, TRAIN_KEYS, check_run, metrics, need_vllm, rm_flags, run_script


@pytest.mark.parametrize("sampler", ["hf", "vllm"])
def test_sync_every_2_steps(tiny_model, rm_task, tmp_path, sampler):
    """--sync 2 over 4 steps: synced is 1, 0, 1, 0, and a sync samples the rollouts of both its
    steps (time_gen 0 on the other); the trainer agrees with the generator right after a sync and,
    lr 1e-3 having moved the policy, no longer one step later. Reward-model prompts: every step
    has pairs."""
    if sampler == "vllm":
        need_vllm()
    out = str(tmp_path / "run")
    p = run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", sampler, "--steps", 4,
                   "--sync", 2, "--out", out, *SMALL, *rm_flags(rm_task))  # fmt: skip
    keys = TRAIN_KEYS | {"pairs", "margin", "pair_acc", "reward_rm", "reward_timeouts"}
    keys |= {"skipped_steps", "chosen_length", "rejected_length", "grad_norm", "lr"}
    train = check_run(out, p, 4, keys)
    assert [r["synced"] for r in train] == [1, 0, 1, 0]
    assert [r["time_gen"] > 0 for r in train] == [True, False, True, False], train
    assert all(r["pairs"] > 0 and r["entropy"] > 0 for r in train), "a step formed no pair"
    assert all(isinstance(r["pairs"], int) and r["reward_timeouts"] == 0 for r in train)
    for r in train:
        if r["synced"]:
            assert abs(r["logp_gap"]) < (1e-4 if sampler == "hf" else 2e-2), r
    stale = [r for r in train if not r["synced"]]
    assert len(stale) == 2 and all(abs(r["logp_gap"]) > 1e-3 for r in stale), stale
    assert json.load(open(os.path.join(out, "args.json")))["sync"] == 2


def test_validation_between_syncs_restores_the_stale_generator(tiny_model, rm_task, tmp_path):
    """--sync 4 --val_every 3: step 3 validates the current policy, then the generator gets the
    step-0 weights back, so step 3 samples from a generator 3 updates stale (logp_gap away from
    0), as steps 1 and 2 did."""
    out = str(tmp_path / "run")
    run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "hf", "--steps", 4,
               "--sync", 4, "--val_every", 3, "--out", out, *SMALL, *rm_flags(rm_task))  # fmt: skip
    train = [r for r in metrics(out) if "loss" in r]
    assert [r["synced"] for r in train] == [1, 0, 0, 0] and "val_reward" in train[3]
    assert all(r["pairs"] > 0 for r in train), train
    assert all(abs(r["logp_gap"]) > 1e-3 for r in train[1:]), train


def train_rows(out):
    return [r for r in metrics(out) if "loss" in r]


# a learning rate whose AdamW steps (about lr per weight) are under half a bf16 ulp of most of the
# tiny model's weights (|w| about 0.02: half an ulp 4e-5), yet move its log-probs within a step
SUBULP = ["--lr", 3e-5, "--sampler", "hf", "--generator_bf16", "true"]


def test_a_sync_hands_a_bf16_generator_the_whole_update(tiny_model_bf16, rm_task, tmp_path):
    """An fp32 policy from a bf16 checkpoint beside a bf16 generator, synced every 2 steps of 8.
    Rounded to the nearest at a sync (main at 32b9a5f), the generator kept most weights at the
    seed's, and |logp_gap| at the synced steps 2, 4, 6 reached 6e-3 and 1.1e-2; stochastically
    rounded it gets the whole update on average: under 3e-3 at every sync (measured <= 9e-4), while
    the stale steps between show the policy moving. The reference (--ref_sync) is then the policy
    itself: kl 0 at every sync."""
    out = str(tmp_path / "run")
    task = ["--model", tiny_model_bf16, *rm_flags(rm_task), *SMALL, *SUBULP]
    run_script("dpo_semionline.py", *task, "--sync", 2, "--steps", 8, "--out", out)
    train = train_rows(out)
    assert [r["synced"] for r in train] == [1, 0] * 4 and all(r["pairs"] for r in train)
    synced = [abs(r["logp_gap"]) for r in train if r["synced"]]
    stale = [abs(r["logp_gap"]) for r in train if not r["synced"]]
    assert max(synced) < 3e-3 < max(stale), (synced, stale)
    assert all(abs(r["kl"]) < 1e-6 for r in train if r["synced"]), train


@pytest.mark.parametrize("compute", ["fp32", "fp32, bf16 generator", "bf16"])
def test_validation_measures_the_saved_checkpoint(tiny_model_bf16, rm_task, tmp_path, compute):
    """The run's final validation against eval.py on the checkpoint it saved (the same 40 prompts,
    seed and sampling; reward-model scores). fp32: the generator holds exactly the saved weights,
    the same samples, the same mean. bf16 compute (the default on a GPU or a bf16 CPU): the
    checkpoint declares bfloat16, and its cast is exactly what the generator held: the same mean
    again. A bf16 generator beside an fp32 trainer holds them stochastically rounded: 4 SE."""
    out, evaluated = str(tmp_path / "run"), str(tmp_path / "eval")
    bf16 = {"fp32": "false", "fp32, bf16 generator": "false", "bf16": "true"}[compute]
    task = ["--model", tiny_model_bf16, *rm_flags(rm_task), *SMALL, *SUBULP, "--bf16", bf16]
    generator_bf16 = "false" if compute == "fp32" else "true"
    flags = ["--generator_bf16", generator_bf16, "--steps", 3, "--val_size", 40, "--out", out]
    run_script("dpo_semionline.py", *task, *flags)
    final = metrics(out)[-1]
    checkpoint = os.path.join(out, "step_000003")
    declared = json.load(open(os.path.join(checkpoint, "config.json")))["dtype"]
    assert declared == ("bfloat16" if bf16 == "true" else "float32")
    flags = ["--benchmarks", f"val={rm_task[0]}", "--reward_model", rm_task[1], "--limit", 40]
    flags += ["--samples", 1, "--max_new_tokens", 48, "--bf16", bf16, "--out", evaluated]
    run_script("eval.py", "--model", checkpoint, "--sampler", "hf", *flags)
    result = json.load(open(os.path.join(evaluated, "summary.json")))["benchmarks"]["val"]
    difference = abs(result["reward"] - final["val_reward"])
    if compute == "fp32, bf16 generator":
        assert difference < 4 * math.hypot(result["reward_se"], final["val_reward_se"])
    else:
        assert difference < 1e-6, (result, final)


@pytest.mark.parametrize("ref_sync", ["true", "false"])
def test_sync_inf_samples_from_the_seed(tiny_model, rm_task, tmp_path, ref_sync):
    """--sync inf: the generator is synced once, at step 0, and stays the seed model; so does the
    reference, with or without --ref_sync, so the policy's gap to the generator is its KL to the
    reference on every step, while training moves it away from 0."""
    out = str(tmp_path / "run")
    flags = ["--sync", "inf", "--ref_sync", ref_sync, "--steps", 3, "--out", out]
    run_script(
        "dpo_semionline.py",
        "--model",
        tiny_model,
        "--sampler",
        "hf",
        *flags,
        *SMALL,
        *rm_flags(rm_task),
    )
    train = train_rows(out)
    assert [r["synced"] for r in train] == [1, 0, 0]
    assert all(r["pairs"] > 0 for r in train), "a step formed no pair: the test would be vacuous"
    assert all(abs(r["kl"] - r["logp_gap"]) < 1e-5 for r in train), train
    assert abs(train[0]["logp_gap"]) < 1e-5 and abs(train[2]["logp_gap"]) > 1e-3, train


def test_ref_sync_makes_the_reference_the_generator(tiny_model, rm_task, tmp_path):
    """With --ref_sync the reference is refreshed with the generator, so kl equals logp_gap on every
    step, stale ones included; without it the reference stays the seed and they part once the
    generator is synced to trained weights (step 2 of --sync 2)."""
    gaps = {}
    for ref_sync in ("true", "false"):
        out = str(tmp_path / ref_sync)
        flags = ["--sync", 2, "--ref_sync", ref_sync, "--steps", 3, "--out", out]
        run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "hf", *flags, *SMALL,
                   *rm_flags(rm_task))  # fmt: skip
        gaps[ref_sync] = [abs(r["kl"] - r["logp_gap"]) for r in train_rows(out)]
    assert all(g < 1e-5 for g in gaps["true"]), gaps
    assert gaps["false"][0] < 1e-5 and gaps["false"][2] > 1e-3, gaps


@pytest.fixture(scope="module")
def half_unpaired(tmp_path_factory):
    """8 prompts: 4 scored by the reward model (distinct responses, so they pair), 4 math problems
    whose answer the tiny model never writes (every reward 0, so they never pair)."""
    path = tmp_path_factory.mktemp("mixed") / "mixed.jsonl"
    rows = [{"prompt": f"Describe the number {k} in one sentence."} for k in range(4)]
    rows += [{"problem": f"What is {k} * 7?", "answer": "\\pi^{23}"} for k in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("script", ["dpo_semionline.py", "group_dpo.py"])
def test_normaliser_counts_the_prompts_without_a_pair(tiny_model, rm_task, half_unpaired,
                                                      tmp_path, script):  # fmt: skip
    """Section 2's normaliser: the summed pair (or group) losses are divided by all the prompts of
    the batch, skipped ones included. At step 0 the policy is the reference, so every pair's loss
    is log 2 (a group's mean too): the logged loss is (prompts that paired) x log 2 / 8."""
    out = str(tmp_path / "run")
    data = ["--data", half_unpaired, "--val_data", rm_task[0], "--reward_model", rm_task[1]]
    run_script(script, "--model", tiny_model, "--sampler", "hf", "--steps", 1, "--out", out,
               *SMALL, *data)  # fmt: skip
    step0 = train_rows(out)[0]
    assert step0["reward_math"] == 0 and "reward_rm" in step0, step0  # the math prompts never pair
    paired = step0["pairs"]  # DPO: a pair per prompt that paired
    if script == "group_dpo.py":  # pairs counts all |Y_c| x |Y_r| pairs: count the groups instead
        paired = round(step0["loss"] * 8 / math.log(2))
        assert step0["pairs"] >= paired, step0
    assert 1 <= paired <= 4, step0  # divided by the prompts that paired, the loss would be log 2
    assert step0["loss"] == pytest.approx(paired * math.log(2) / 8, rel=1e-5), step0
    assert step0["margin"] == pytest.approx(0, abs=1e-6), step0
