"""torchrun on CPU (gloo): dpo_semionline.py with DDP and with FSDP2 shards, then resumed; grpo.py
with gradient accumulation; eval.py's problems split over the ranks; the process group destroyed
at exit."""

import json
import math
import os
import re

import pytest

from conftest import ROOT, SMALL, metrics, need_vllm, read_jsonl, rm_flags, run_script
from test_eval import LOCAL, write_data

FINGERPRINT = r"rank (\d) weights fingerprint ([-+\d.e]+)\n"
# torchrun would take --n for itself
TORCHRUN_SMALL = ["--num_responses" if a == "--n" else a for a in SMALL]


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_dpo_semionline_two_processes_then_resume(tiny_model, rm_task, tmp_path, wrap):
    """2 CPU processes (gloo; DDP, or FSDP2 shards): both ranks end with identical weights. One pair
    per micro-batch, so gradients accumulate over several backwards before the one that
    all-reduces."""
    out = str(tmp_path / "run")
    # reward-model prompts, so that pairs form on every step
    small = TORCHRUN_SMALL + rm_flags(rm_task)
    # FSDP as on GPUs: bf16 mixed precision on fp32 shards, activation checkpointing, the reference
    # (sharded too) refreshed every step after its own forward passes
    fsdp = ["--fsdp", "true", "--bf16", "true", "--grad_ckpt", "true", "--sync", 1]
    fsdp = fsdp if wrap == "fsdp" else []
    p = run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "hf", "--steps", 3,
                   "--out", out, *small, "--micro_batch", 2, *fsdp, nproc=2)  # fmt: skip
    prints = dict(re.findall(FINGERPRINT, p.stdout + p.stderr))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], prints
    train = [r for r in metrics(out) if "loss" in r]
    assert len(train) == 3 and all(r["pairs"] > 0 for r in train), train
    layout = json.load(open(os.path.join(out, "args.json")))
    assert (layout["world_size"], layout["fsdp"]) == (2, wrap == "fsdp")
    # resuming the finished run: the checkpoint (gathered to rank 0's CPU) is read back into both
    # ranks' shards
    p = run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "hf", "--steps", 3,
                   "--out", out, *small, "--resume", out, *fsdp, nproc=2)  # fmt: skip
    assert "at step 3" in p.stdout
    assert dict(re.findall(FINGERPRINT, p.stdout + p.stderr)) == prints


def test_grpo_two_processes(tiny_model, tmp_path):
    """2 CPU processes (gloo, DDP): the loss is finite and both ranks end with identical weights."""
    out = str(tmp_path / "run")
    # 16 responses per rank in micro-batches of 4: gradients accumulate over 4 backwards before the
    # all-reduce
    p = run_script("grpo.py", "--model", tiny_model, "--sampler", "hf", "--steps", 2,
                   "--micro_batch", 4, "--out", out, *TORCHRUN_SMALL, nproc=2)  # fmt: skip
    prints = dict(re.findall(FINGERPRINT, p.stdout + p.stderr))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], prints
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 2 and all(map(math.isfinite, losses)), losses


def test_eval_two_processes(tiny_model, tmp_path):
    """2 CPU processes, each sampling every other problem: the written files hold every row, in the
    data's order."""
    data = write_data(tmp_path / "data")
    out = str(tmp_path / "eval")
    run_script("eval.py", "--model", tiny_model, "--sampler", "hf", "--benchmarks",
               "math500,alpaca_eval", "--data_dir", data, "--samples", 2, "--max_new_tokens", 8,
               "--out", out, nproc=2)  # fmt: skip
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["world_size"] == 2 and summary["benchmarks"]["math500"]["problems"] == 4
    gens = read_jsonl(os.path.join(out, "math500_generations.jsonl"))
    assert [g["problem"] for g in gens] == [r["problem"] for r in LOCAL["math500.jsonl"]]
    reward = sum(sum(g["rewards"]) / 2 for g in gens) / 4
    assert summary["benchmarks"]["math500"]["reward"] == pytest.approx(reward)
    outputs = json.load(open(os.path.join(out, "alpaca_eval_model_outputs.json")))
    assert [o["instruction"] for o in outputs] == [r["prompt"] for r in LOCAL["alpaca_eval.jsonl"]]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc")
def test_process_group_is_destroyed_at_exit(tiny_model, tmp_path):
    """2 ranks: setup_dist, then what every script does next (load the tokenizer, which imports
    torch._dynamo), then the exit's destroy_process_group: no gloo thread may outlive it (one that
    did aborted the exit, SIGABRT)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        f"import atexit, os, sys\nsys.path.insert(0, {ROOT!r})\n"
        "from common import all_gather, setup_dist\nfrom data import load_tokenizer\n"
        "def gloo_threads():  # runs after setup_dist's own exit handler, destroy_process_group\n"
        "    tasks = os.listdir('/proc/self/task')\n"
        "    names = [open(f'/proc/self/task/{t}/comm').read() for t in tasks]\n"
        "    gloo = sum('gloo' in n for n in names)\n"
        "    sys.stdout.write(f'gloo threads after destroy: {gloo}\\n')\n"
        "atexit.register(gloo_threads)\nsetup_dist()\n"
        f"load_tokenizer({tiny_model!r})\nall_gather(1)\n"
    )
    p = run_script(probe, nproc=2, timeout=300)  # an absolute path: os.path.join keeps it
    assert p.stdout.count("gloo threads after destroy: 0") == 2, p.stdout


FINGERPRINT = r"rank (\d) weights fingerprint ([-+\d.e]+)\n"


@pytest.fixture(scope="module")
def fixed_pairs(tmp_path_factory):
    """8 text pairs: dpo_offline.py --pairs trains on exactly these, in a fixed order."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = []
    for a, b in ((3, 4), (6, 7), (2, 9), (5, 8), (4, 4), (7, 3), (9, 6), (8, 2)):
        right = f" {a} * {b} = {a * b}. The final answer is $\\boxed{{{a * b}}}$.\n\n"
        wrong = f" {a} * {b} = {a * b + 3}. The final answer is $\\boxed{{{a * b + 3}}}$.\n\n"
        rows.append({"prompt": f"What is {a} * {b}?", "chosen": right, "rejected": wrong})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_two_processes_update_as_one(tiny_model, fixed_pairs, tmp_path, wrap):
    """One step on the same 8 pairs, one pair per micro-batch: gradients accumulated over 8
    backwards in 1 process, or over 4 on each of 2 ranks and averaged (DDP's all-reduce, FSDP2's
    reduce-scatter), give the same weights, up to the order of float sums."""
    from flags import load_weights

    flags = ["--model", tiny_model, "--sampler", "hf", "--pairs", fixed_pairs, "--steps", 1]
    flags += ["--prompts_per_step", 8, "--micro_batch", 2, "--val_size", 4, "--lr", 1e-3]
    flags += ["--bf16", "false", "--fsdp", "true" if wrap == "fsdp" else "false"]
    run_script("dpo_offline.py", *flags, "--out", tmp_path / "one")
    run_script("dpo_offline.py", *flags, "--out", tmp_path / "two", nproc=2)
    one = load_weights(tmp_path / "one" / "step_000001")
    two = load_weights(tmp_path / "two" / "step_000001")
    seed = load_weights(tiny_model)
    assert one.keys() == two.keys()
    moved = max((one[k] - seed[k]).abs().max().item() for k in one)
    apart = max((one[k] - two[k]).abs().max().item() for k in one)
    assert moved > 1e-4 and apart < 1e-6, (moved, apart)
    rows = [[r for r in metrics(tmp_path / n) if "loss" in r][0] for n in ("one", "two")]
    assert rows[0]["pairs"] == rows[1]["pairs"] == 8
    assert rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-6)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_torchrun_with_vllm_engines(tiny_model, rm_task, tmp_path, wrap):
    """2 processes, each with its vLLM engine (external launcher): the ranks end identical, the
    trainer agrees with the engine right after a sync (fp32: closely; bf16: as closely as two bf16
    engines can), and the run ends without a traceback anywhere in its output."""
    need_vllm()
    out = str(tmp_path / "run")
    small = ["--num_responses" if a == "--n" else a for a in SMALL]  # torchrun takes --n itself
    data = ["--data", rm_task[0], "--val_data", rm_task[0], "--reward_model", rm_task[1]]
    fsdp = ["--fsdp", "true", "--bf16", "true"] if wrap == "fsdp" else ["--fsdp", "false"]
    p = run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "vllm", "--sync", 2,
                   "--steps", 3, "--out", out, *small, *data, *fsdp, nproc=2)  # fmt: skip
    output = p.stdout + p.stderr
    assert "Traceback" not in output, output[-6000:]
    prints = dict(re.findall(FINGERPRINT, output))
    assert set(prints) == {"0", "1"} and prints["0"] == prints["1"], prints
    train = [r for r in metrics(out) if "loss" in r]
    assert [r["synced"] for r in train] == [1, 0, 1] and all(r["pairs"] > 0 for r in train)
    tolerance = 2e-2 if wrap == "ddp" else 5e-2
    assert all(abs(r["logp_gap"]) < tolerance for r in train if r["synced"]), train


def test_all_reduce_sums_by_name_and_refuses_different_names(tmp_path):
    """Two ranks holding the same metrics in another order sum name by name; holding different
    ones, every rank stops with one line naming the odd one (positional sums would mix them)."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        f"import sys\nsys.path.insert(0, {ROOT!r})\nfrom common import all_reduce, setup_dist\n"
        "rank, world, device = setup_dist()\n"
        "mine = {'a': 1.0, 'b': 2.0} if rank == 0 else {'b': 20.0, 'a': 10.0}\n"
        "print(f'rank {rank} sums {sorted(all_reduce(mine).items())}\\n', end='', flush=True)\n"
        "all_reduce({'loss': 1.0, 'pairs': 2.0} if rank == 0 else {'loss': 1.0})\n"
    )
    p = run_script(probe, nproc=2, timeout=300, check=False)
    assert p.stdout.count("sums [('a', 11.0), ('b', 22.0)]") == 2, p.stdout + p.stderr
    assert p.returncode != 0
    line = "probe.py: error: all_reduce: the ranks hold different metrics (pairs not on every rank)"
    assert p.stderr.count(line) == 2, p.stderr[-3000:]


def test_vllm_engines_are_independent_and_keep_the_trainers_rngs(tiny_model, tmp_path):
    """2 ranks, each with its vLLM engine: rank 0 calls generate twice with 3 prompts, rank 1 once
    with 1 (engines coupled by a data_parallel_size run in lockstep and hang here); building the
    engine leaves the trainer's random, NumPy and torch streams where they were (vLLM reseeds
    them)."""
    need_vllm()
    probe = tmp_path / "probe.py"
    probe.write_text(
        f"import random, sys\nsys.path.insert(0, {ROOT!r})\nimport numpy as np, torch\n"
        "from common import all_gather, generate, make_sampler, setup_dist\n"
        "from data import load_tokenizer, stop_token_ids\n"
        f"rank, world, device = setup_dist()\ntok = load_tokenizer({tiny_model!r})\n"
        "def draws(seed=None):\n"
        "    if seed is not None:\n"
        "        random.seed(seed); np.random.seed(seed); torch.manual_seed(seed)\n"
        "    return random.random(), np.random.rand(), torch.rand(1).item()\n"
        "draws(5)\n"
        f"sampler = make_sampler('vllm', {tiny_model!r}, tok, device, rank,\n"
        "                       stop_token_ids(tok), 256)\n"
        "after = draws()\ndraws(5)\nkept = after == draws()\n"
        "prompt = tok('What is 2 * 3?')['input_ids']\n"
        "calls = [[prompt] * 3, [prompt] * 3] if rank == 0 else [[prompt]]\n"
        "counts = [len(generate(sampler, p, 2, 1.0, 1.0, 8)) for p in calls]\n"
        "print(f'rank {rank} rngs kept {kept} generated {counts}', flush=True)\nall_gather(rank)\n"
    )
    p = run_script(probe, nproc=2, timeout=300)
    assert "rank 0 rngs kept True generated [3, 3]" in p.stdout, p.stdout + p.stderr[-3000:]
    assert "rank 1 rngs kept True generated [1]" in p.stdout, p.stdout + p.stderr[-3000:]
