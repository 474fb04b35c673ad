"""group_dpo.py end to end on the tiny model: GroupDPO with the GRPO term (HF sampler), and a short
run with the real vLLM engine."""

from conftest import SMALL, TRAIN_KEYS, check_run, need_vllm, rm_flags, run_script


def test_group_dpo_with_grpo_term(tiny_model, rm_task, tmp_path):
    out = str(tmp_path / "run")
    p = run_script("group_dpo.py", "--model", tiny_model, "--sampler", "hf", "--steps", 3,
                   "--sync", 1, "--grpo_alpha", 0.01, "--micro_batch", 3, "--out", out, *SMALL,
                   *rm_flags(rm_task))  # fmt: skip
    keys = TRAIN_KEYS | {"pairs", "margin", "pair_acc", "chosen_length", "rejected_length"}
    train = check_run(out, p, 3, keys)
    assert all(r["pairs"] > 0 for r in train), "a step formed no pair: the test would be vacuous"
    # at most 2 x 2 pairs (above and below the group's mean score) for each of the 8 prompts with
    # 4 responses; synced every step: the generator is the policy
    assert all(0 <= r["pairs"] <= 8 * 4 and abs(r["logp_gap"]) < 1e-4 for r in train)
    assert all(0 <= r["pair_acc"] <= 1 for r in train)


def test_vllm_smoke(tiny_model, rm_task, tmp_path):
    """A short run with the real vLLM engine; right after a sync the engines agree closely.
    Reward-model prompts: every step has pairs, so every step trains (a step without a kept group
    logs no logp_gap, kl or entropy)."""
    need_vllm()
    out = str(tmp_path / "run")
    p = run_script("group_dpo.py", "--model", tiny_model, "--sampler", "vllm", "--steps", 2,
                   "--sync", 1, "--out", out, *SMALL, *rm_flags(rm_task))  # fmt: skip
    train = check_run(out, p, 2, {"step", "loss", "logp_gap", "kl", "entropy", "time_train"})
    assert all(r["pairs"] > 0 for r in train), train
    assert all(r["synced"] == 1 and abs(r["logp_gap"]) < 2e-2 for r in train), train
