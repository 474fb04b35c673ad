"""The prepared GPU check: what a CPU cannot show, in one command of at most about 8 minutes, with
no downloads (tiny models are built on the fly; a ~1B Llama from its config). Run it through
bench/gpu_check.sh, which installs Math-Verify from carried wheels first. Prints one table.

Rows: the test suite's CUDA tests; each training script for 2 steps on CUDA (rewards in [0, 1], no
reward_timeouts, logp_gap about 0 right after a sync, no traceback); with 2 or more GPUs, 2 ranks
under torchrun with vLLM; one policy update of a ~1B Llama (bf16 compute on fp32 master weights,
2 x (256 + 2048) tokens) with and without --grad_ckpt: tokens/s, MFU, peak memory; with vLLM,
decoding tokens/s eager against CUDA graphs, and the seconds of one weight sync."""

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
ROWS = []
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def row(check, ok, detail):
    ROWS.append((check, {True: "ok", False: "FAIL", None: "skip"}[ok], detail))
    print(f"[{ROWS[-1][1]}] {check}: {detail}", flush=True)


def sh(cmd, timeout=600, **kw):
    """Runs cmd; returns (return code, stdout + stderr); a timeout counts as a failure."""
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kw)
        return p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        return -1, f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"


def llama_1b():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=4096, tie_word_embeddings=True)  # fmt: skip
    return config, LlamaForCausalLM


def policy_update(grad_ckpt):
    """One fwd+bwd of token_logps and a fused AdamW step; (tokens/s, MFU, peak GiB)."""
    from common import token_logps

    config, cls = llama_1b()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = cls(config)  # fp32 master weights
    model.config.use_cache = False
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), 1e-6, fused=True)
    ids = torch.randint(0, config.vocab_size, (2, 256 + 2048), device="cuda")
    mask = torch.ones_like(ids)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, 256:] = True
    times = []
    for _ in range(3):  # the first warms up the allocator and the kernels
        torch.cuda.synchronize()
        t0 = time.time()
        with torch.autocast("cuda", torch.bfloat16):
            logps, _ = token_logps(model, ids, mask, completion)
        logps.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.time() - t0)
    n = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    head = model.get_output_embeddings().weight.numel()
    flops = 6 * n * ids.numel() + 6 * head * int(completion.sum())
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    t = min(times[1:])
    mfu = f"{flops / t / peak:.0%}" if peak else "n/a (peak unknown)"
    memory = torch.cuda.max_memory_allocated() / 2**30
    del model, optimizer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return ids.numel() / t, mfu, memory


VLLM_PROBE = r"""
import json, os, sys, time, torch
sys.path.insert(0, {root!r})
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM, SamplingParams
from common import Sampler, sync_weights
llm = LLM({path!r}, dtype="bfloat16", enforce_eager={eager}, gpu_memory_utilization=0.5,
          max_model_len=1024, seed=0, skip_tokenizer_init=True)
params = SamplingParams(max_tokens=256, min_tokens=256, ignore_eos=True, temperature=1.0)
prompts = [{{"prompt_token_ids": [1 + i, 2, 3, 4]}} for i in range(64)]
llm.generate(prompts[:4], params, use_tqdm=False)
t0 = time.time()
out = llm.generate(prompts, params, use_tqdm=False)
tokens = sum(len(o.outputs[0].token_ids) for o in out) / (time.time() - t0)
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({path!r}, dtype=torch.float32).cuda()
sampler = Sampler("vllm", llm, None, [], torch.bfloat16)
sync_weights(sampler, model)
seconds = sync_weights(sampler, model)
print("RESULT " + json.dumps({{"tokens_per_s": tokens, "sync_s": seconds}}), flush=True)
"""


def vllm_decoding(path):
    results = {}
    for eager in (True, False):
        probe = VLLM_PROBE.format(root=ROOT, path=path, eager=eager)
        code, out = sh([sys.executable, "-c", probe], timeout=300)
        lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
        results[eager] = json.loads(lines[-1][7:]) if code == 0 and lines else out[-600:]
    return results


def main():
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False, so there is nothing to check here "
              "(run this on a machine with an NVIDIA GPU)")  # fmt: skip
        return
    gpus = torch.cuda.device_count()
    have_vllm = subprocess.run(
        [sys.executable, "-c", "import vllm"], capture_output=True
    ).returncode
    have_vllm = have_vllm == 0
    print(
        f"{gpus} x {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"vLLM {'installed' if have_vllm else 'NOT installed: the HF sampler only'}",
        flush=True,
    )
    from conftest import build_tiny_model

    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    tiny = build_tiny_model(os.path.join(tmp, "tiny"))

    code, out = sh([sys.executable, "-m", "pytest", "tests", "-q", "-k", "cuda", "-p",
                    "no:cacheprovider"], env=dict(os.environ, TINY_MODEL_CACHE=tiny))  # fmt: skip
    row("pytest -k cuda", code == 0, out.strip().splitlines()[-1] if out.strip() else "no output")

    sampler = "vllm" if have_vllm else "hf"
    for script in ("dpo_semionline.py", "dpo_offline.py", "grpo.py", "group_dpo.py"):
        run = os.path.join(tmp, script[:-3])
        cmd = [sys.executable, script, "--model", tiny, "--steps", "2", "--sampler", sampler,
               "--val_size", "8", "--sync", "1", "--out", run]  # fmt: skip
        if script == "dpo_offline.py":
            cmd.remove("--sync")
            cmd.remove("1")
        code, out = sh(cmd, timeout=300)
        rows = (
            [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))] if code == 0 else []
        )
        train = [r for r in rows if "loss" in r]
        ok = code == 0 and "Traceback" not in out and len(train) == 2
        ok = ok and all(0 <= r["reward"] <= 1 and r.get("reward_timeouts", 0) == 0 for r in train)
        gaps = [abs(r["logp_gap"]) for r in train if r.get("synced") and "logp_gap" in r]
        ok = ok and all(g < 5e-2 for g in gaps)
        detail = f"{sampler}, rewards {[round(r['reward'], 3) for r in train]}, |logp_gap| " \
                 f"after sync {[round(g, 4) for g in gaps]}" if train else out[-400:]  # fmt: skip
        row(f"{script} 2 steps", ok, detail)

    if gpus >= 2 and have_vllm:
        run = os.path.join(tmp, "torchrun")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "dpo_semionline.py", "--model", tiny, "--steps", "2", "--sampler", "vllm",
               "--val_size", "8", "--sync", "1", "--out", run]  # fmt: skip
        code, out = sh(cmd, timeout=400)
        prints = sorted({x.split()[-1] for x in out.splitlines() if "weights fingerprint" in x})
        ok = code == 0 and "Traceback" not in out and len(prints) == 1
        row(
            "torchrun 2 ranks + vLLM",
            ok,
            f"ranks' fingerprints {prints}" if code == 0 else out[-400:],
        )
    else:
        row("torchrun 2 ranks + vLLM", None, f"{gpus} GPU, vLLM {have_vllm}")

    for grad_ckpt in (False, True):
        try:
            tokens, mfu, memory = policy_update(grad_ckpt)
            detail = f"{tokens:,.0f} tokens/s, MFU {mfu}, peak {memory:.1f} GiB"
            row(f"1B Llama update, grad_ckpt {grad_ckpt}", True, detail)
        except Exception as e:  # an out-of-memory is a result too
            row(f"1B Llama update, grad_ckpt {grad_ckpt}", False, repr(e)[:300])

    if have_vllm:
        config, cls = llama_1b()
        path = os.path.join(tmp, "llama_1b")
        cls(config).to(torch.bfloat16).save_pretrained(path)
        results = vllm_decoding(path)
        for eager, r in results.items():
            name = f"vLLM decode 64 x 256, {'eager' if eager else 'CUDA graphs'}"
            if isinstance(r, dict):
                row(
                    name,
                    True,
                    f"{r['tokens_per_s']:,.0f} tokens/s, weight sync {r['sync_s']:.2f} s",
                )
            else:
                row(name, False, r)
    else:
        row("vLLM decoding and weight sync", None, "vLLM not installed")

    print("\n| check | result | detail |\n| --- | --- | --- |")
    for check, result, detail in ROWS:
        print(f"| {check} | {result} | {detail} |")


if __name__ == "__main__":
    main()
