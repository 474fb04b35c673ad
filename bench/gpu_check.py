"""The prepared GPU check: what a CPU cannot show, in one command inside the GPU machine's 10-minute
limit, with no downloads (tiny models built on the fly, larger ones from their configs). Run it
through bench/gpu_check.sh, which installs Math-Verify from carried wheels (bench/README.md).

Each row runs in a process of its own (`--row KEY`) under its own timeout, its output going to
<out>/<KEY>.log as it is produced; the table is rewritten to <out>/table.md after every row, so a
hang or a crash costs its row only. On one GPU the timeouts add up to at most BUDGET; a row that
needs vLLM or a second GPU runs only where there is one and the budget has room left for it.

Rows, at the GPU's sizes:
  setup: the tiny model (tests/conftest.py), a tiny random reward model, prompt files.
  Math-Verify: eval.math_verify, as the scripts call it, on answers known to be right or wrong.
  token_logps against reference_logps (log-probs, entropies, gradients) on a tiny Llama and a tiny
    Gemma3, under bf16 autocast on fp32 weights, and under FSDP2's bf16 mixed precision (1 rank).
  the tied sparse embedding of one process (wrap_model): two micro-batches' gradient is autograd's.
  each training script on CUDA, HF sampler, weight decay 0 (only gradients move a weight): finite
    losses, gradient norms > 0, weights moved, no reward timeouts; dpo_semionline with --sync 2:
    the stale step's |logp_gap| over 4x the synced steps'.
  pytest -k cuda (the suite's CUDA tests).
  a ~1B Llama (hidden 2048, 16 layers, vocab 128256, tied), 2 x (256 + 2048) tokens: one update
    split into decoder layers, output layer (HeadLogps) and AdamW, TF32 off and on; tokens/s, MFU,
    peak memory with activation checkpointing off and on.
  Llama-3.1-8B's dimensions with 2 and 4 layers: peak memory measured, extrapolated to 32 layers.
  with vLLM: decoding eager against CUDA graphs and a weight sync; with 2 GPUs too, torchrun.

--dry-run: every row that needs neither vLLM nor a second GPU, on this machine's CPU, through the
same code at tiny sizes (FSDP2 on a gloo group, bf16 autocast on the CPU, memory as the process's
resident size). Exits 1 if a row FAILs."""

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
BUDGET = 480  # s: the rows' timeouts on one GPU, inside one 10-minute command with the installs
DRY_SLACK = 4  # a dry run's timeouts are this many times the GPU's: a 2-core CPU is slower
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
MARK = "GPU_CHECK_ROW "  # a row's last line: MARK + json [ok, detail]
DOWNLOAD = """pip download --no-deps --only-binary=:all: --python-version 3.12 \\
  --implementation cp --platform manylinux2014_x86_64 -d .whl math-verify==0.9.0 \\
  latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2"""
# answers Math-Verify must score right (1.0) or wrong (0.0)
KNOWN = [
    ("The final answer is $\\boxed{42}$.", "42", 1.0),
    ("The final answer is $\\boxed{42}$.", "41", 0.0),
    ("So x = 0.5. The final answer is $\\boxed{\\frac{1}{2}}$.", "0.5", 1.0),
    ("I cannot tell.", "7", 0.0),
]
# Llama shapes: the ~1B one (Llama-3.2-1B's dimensions), Llama-3.1-8B's but for its layer count, and
# the tiny stand-in a dry run uses for either (same layer count and tying)
LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16)
LLAMA_1B |= dict(tie_word_embeddings=True)
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4)
TINY |= dict(num_key_value_heads=2)


# ---- helpers ----
def device_of(dry):
    return torch.device("cpu" if dry else "cuda")


def paths(work):
    """What the setup row made (a row run before it finishes fails here, saying so)."""
    made = os.path.join(work, "paths.json")
    if not os.path.exists(made):
        raise SystemExit(f"{made} missing: the setup row did not finish")
    return json.load(open(made))


def tee(cmd, env=None):
    """Runs cmd in the project root, its output copied line by line to this row's log; returns (exit
    code, output)."""
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines = []
    for line in p.stdout:
        sys.stdout.write(line)
        lines.append(line)
    return p.wait(), "".join(lines)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def memory_gib(device):
    """(allocated now, peak since reset_peak) in GiB: CUDA's allocator; on a CPU (a dry run's
    stand-in) the process's resident memory and its peak, which never resets."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated() / 2**30, torch.cuda.max_memory_allocated() / 2**30
    resident = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return resident / 2**30, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def llama(dry, **shape):
    """A Llama config: 32 heads (8 KV), Llama-3's vocabulary, `shape`; tiny in a dry run."""
    from transformers import LlamaConfig

    sizes = dict(vocab_size=128256, num_attention_heads=32, num_key_value_heads=8) | shape
    return LlamaConfig(max_position_embeddings=4096, **(sizes | TINY if dry else sizes))


def policy(config, device, grad_ckpt=True):
    """fp32 master weights on the device, as a one-GPU run holds them (wrap_model: a tied
    embedding's gradient sparse), and fused AdamW."""
    from transformers import LlamaForCausalLM

    from common import wrap_model

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).train()
    model.config.use_cache = False
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_model(model, device)
    return model, torch.optim.AdamW(model.parameters(), 1e-6, fused=True)


def sequences(config, dry, device):
    """2 x (256 prompt + 2048 response) random tokens (2 x (16 + 64) in a dry run)."""
    prompt, response = (16, 64) if dry else (256, 2048)
    ids = torch.randint(0, config.vocab_size, (2, prompt + response), device=device)
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, prompt:] = True
    return ids, torch.ones_like(ids), completion


def forward_backward(model, ids, mask, completion):
    """The policy's part of an update: token_logps under bf16 autocast, backward."""
    from common import token_logps

    with torch.autocast(ids.device.type, torch.bfloat16):
        logps, _ = token_logps(model, ids, mask, completion)
    logps.sum().backward()


def update(model, optimizer, batch):
    forward_backward(model, *batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# ---- rows: each runs in a process of its own; returns (ok: True, False, None to skip, detail) ----
def setup(dry, work):
    """The tiny model (TINY_MODEL_CACHE's if there is one), a tiny reward model, and prompts: each
    step takes all of a file's rows, and the reward model's rows form pairs at every step."""
    import transformers
    from conftest import build_tiny_model, build_tiny_rm

    os.makedirs(work, exist_ok=True)
    cache = os.environ.get("TINY_MODEL_CACHE", "")
    tiny = cache if os.path.exists(os.path.join(cache, "config.json")) else ""
    # 100 steps, not conftest's 300: the rows need a model that runs, not one that is right
    tiny = tiny or build_tiny_model(os.path.join(work, "tiny"), steps=100)
    rm, _ = build_tiny_rm(os.path.join(work, "rm"), tiny)
    count = 4 if dry else 8
    chat = [{"prompt": f"Describe the number {k} in one sentence."} for k in range(count)]
    arithmetic = [{"problem": f"What is {k} + 3?", "answer": str(k + 3)} for k in range(count)]
    files = {"prompts": chat, "mixed": arithmetic[: count // 2] + chat[: count // 2]}
    made = {"tiny": tiny, "rm": rm, "count": count}
    for name, rows in files.items():
        made[name] = os.path.join(work, f"{name}.jsonl")
        with open(made[name], "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(work, "paths.json"), "w") as f:
        json.dump(made, f)
    name = "CPU (dry run)" if dry else torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    return True, f"{name}, {versions}; tiny model {tiny}"


def reward_probe(dry, work):
    """Math-Verify as the scripts call it, on answers known to be right or wrong (one worker: the
    training rows start the whole pool)."""
    from eval import math_verify

    if not dry:
        torch.zeros(1, device="cuda")  # the worker starts beside a CUDA context, as in a run
    t0 = time.time()
    responses, answers, expected = zip(*KNOWN)
    rewards, timeouts = math_verify(responses, answers, num_workers=1)
    seconds = time.time() - t0
    detail = f"rewards {rewards}, expected {list(expected)}, {timeouts} timeouts, {seconds:.1f} s"
    return rewards == list(expected) and timeouts == 0, detail + " (start-up included)"


def logps_and_gradient(model, logps_fn, padded, weights, autocast):
    """logps_fn's log-probs and entropies [B, L], and every parameter's gradient of a weighted sum
    of them (as tests/test_families.py), flat, in fp32: by backward(), which FSDP2 hooks."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(padded[0].device.type, torch.bfloat16, enabled=autocast):
        logps, entropy = logps_fn(model, *padded)
    total = (logps.sum(-1) * weights).sum() + (entropy.sum(-1) * weights.flip(0)).sum()
    total.backward()
    grads = []
    for p in model.parameters():
        g = torch.zeros(p.shape, device=weights.device) if p.grad is None else p.grad
        grads.append((g.full_tensor() if hasattr(g, "full_tensor") else g).float().flatten())
    return logps.detach().float(), entropy.detach().float(), torch.cat(grads)


def one_rank_fsdp(model, dry):
    """FSDP2 as wrap_model applies it (fully_shard per decoder layer, then the root; bf16 compute,
    fp32 gradient reduction), on a 1-rank group: wrap_model shards only with 2 or more ranks."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        with socket.socket() as s:  # a free port for env://
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0")
        os.environ.update(WORLD_SIZE="1", LOCAL_RANK="0")
        if not dry:
            torch.cuda.set_device(0)
        dist.init_process_group("gloo" if dry else "nccl")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def kernels(dry, work, fsdp):
    """token_logps (chunked head, shared prefixes) and reference_logps, in bf16 compute (autocast on
    fp32 weights, or FSDP2's mixed precision), each against the fp32 computation (reference_logps
    with fp32 weights, no autocast). bf16's tolerance: the fast path's error (max difference over
    the fp32 values' max) at most 2x the plain path's + 2^-8 (bf16's relative precision)."""
    import test_families
    import torch.distributed as dist

    from common import pad_sequences, reference_logps, share_prefixes, shareable_length
    from common import token_logps

    device = device_of(dry)
    fast_fn = partial(token_logps, chunk_size=5)  # several chunks a batch
    ok, parts = True, []
    for name in ("llama", "gemma3_text"):
        exact = test_families.tiny_model(name).to(device)  # fp32, initializer_range 0.1
        model = one_rank_fsdp(copy.deepcopy(exact), dry) if fsdp else exact
        vocab = exact.config.get_text_config().vocab_size
        worst = {}
        for batch, (prompts, responses) in test_families.batches(vocab, random.Random(0)).items():
            padded = pad_sequences(prompts, responses, 0, device)
            weights = torch.arange(1.0, len(prompts) + 1, device=device)
            if batch == "short":  # the shortcut under test is taken
                window = shareable_length(exact.config)[0]
                shared = share_prefixes(*padded[:2], window) is not None
                ok = ok and shared
            fp32 = logps_and_gradient(exact, reference_logps, padded, weights, False)
            plain = logps_and_gradient(model, reference_logps, padded, weights, not fsdp)
            fast = logps_and_gradient(model, fast_fn, padded, weights, not fsdp)
            for what, e, p, f in zip(("logps", "entropy", "grad"), fp32, plain, fast):
                scale = e.abs().max()
                errors = ((f - e).abs().max() / scale).item(), ((p - e).abs().max() / scale).item()
                ok = ok and errors[0] <= 2 * errors[1] + 2**-8  # NaN fails
                print(f"{name} {batch} {what}: fast {errors[0]:.2e}, plain {errors[1]:.2e}")
                worst[what] = max(worst.get(what, errors), errors)
        cells = [f"{k} {f:.1e} (plain {p:.1e})" for k, (f, p) in worst.items()]
        parts.append(f"{name}: " + ", ".join(cells))
    if fsdp:  # before exit: a group left to the interpreter's teardown may hang there
        dist.destroy_process_group()
    shared = "shared prefixes taken on the short batch" if ok else "see the log"
    return ok, "; ".join(parts) + f"; {shared}; tolerance fast <= 2 x plain + 2^-8"


def tied_embedding(dry, work):
    """tests/test_losses.py's one-process tied-embedding test, on the device: wrap_model makes the
    lookup's gradient sparse and the head adds its own into weight.grad; over two micro-batches
    every .grad equals plain autograd's, dense, and fused AdamW moves every parameter."""
    from test_families import tiny_model

    from common import pad_sequences, token_logps, wrap_model

    device = device_of(dry)
    prompts, responses = [[5, 6, 7], [8, 9], [5, 6]], [[10, 11], [12], [13, 14, 15]]
    padded = pad_sequences(prompts, responses, 0, device)
    grads, sparse, dense_grad, moved = [], [], [], []
    for wrapped in (False, True):
        model = tiny_model("gemma3_text").to(device)  # tied embedding and output layer
        model = wrap_model(model, device) if wrapped else model
        sparse.append(model.get_input_embeddings().sparse)
        for weight in (1.0, 0.5):  # the second micro-batch adds to the first in place
            logps, entropy = token_logps(model, *padded, chunk_size=2)
            (weight * logps.sum() + entropy.sum()).backward()
        dense_grad.append(model.get_input_embeddings().weight.grad.layout == torch.strided)
        grads.append([p.grad.clone() for p in model.parameters()])
        before = [p.detach().clone() for p in model.parameters()]
        torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True).step()
        moved.append(all((p - b).abs().max() > 0 for p, b in zip(model.parameters(), before)))
    worst = max(((o - d).abs().max() / d.abs().max()).item() for d, o in zip(*grads))
    untied = wrap_model(tiny_model("llama").to(device), device).get_input_embeddings().sparse
    ok = sparse == [False, True] and not untied and all(dense_grad + moved) and worst <= 1e-5
    detail = f"embed.sparse: tied {sparse[1]}, untied {untied}; gradient against autograd's: "
    return ok, detail + f"{worst:.1e} (max relative difference, tolerance 1e-5); AdamW moved all"


def moved_fraction(seed, trained):
    """The fraction of the non-embedding weights that differ between two checkpoint folders."""
    from flags import load_weights

    seed, trained = load_weights(seed), load_weights(trained)
    names = [k for k in seed if "embed_tokens" not in k]
    moved = sum((seed[k] != trained[k]).sum().item() for k in names)
    return moved / sum(seed[k].numel() for k in names)


def train(script, dry, work):
    """2 steps of a training script (3 for dpo_semionline, --sync 2: steps 0 and 2 synced, step 1
    stale), HF sampler, lr 1e-3, weight decay 0: weights move only by gradients."""
    made = paths(work)
    steps = 3 if script == "dpo_semionline" else 2
    out = os.path.join(work, script)
    # dpo_semionline's prompts half arithmetic (Math-Verify in the loop), half the reward model's
    data = made["mixed" if script == "dpo_semionline" else "prompts"]
    flags = ["--model", made["tiny"], "--sampler", "hf", "--steps", steps, "--lr", 1e-3]
    flags += ["--weight_decay", 0, "--prompts_per_step", made["count"], "--num_responses"]
    flags += [2 if dry else 4, "--max_new_tokens", 8 if dry else 48, "--val_size", 2]
    flags += ["--data", data, "--val_data", data, "--reward_model", made["rm"], "--out", out]
    flags += ["--overwrite"] + ["--sync", 2] * (script == "dpo_semionline")
    code, output = tee([sys.executable, f"{script}.py", *map(str, flags)])
    metrics = os.path.join(out, "metrics.jsonl")
    rows = [json.loads(x) for x in open(metrics)] if os.path.exists(metrics) else []
    train_rows = [r for r in rows if "loss" in r]
    last = (output.strip().splitlines() or ["no output"])[-1][-200:]
    problems = [f"exit code {code}: {last}"] * (code != 0) + ["a traceback"] * (
        "Traceback" in output
    )
    if [r["step"] for r in train_rows] != list(range(steps)):
        problems.append(f"{len(train_rows)} training rows of {steps}")
    norms = [r.get("grad_norm", math.nan) for r in train_rows]
    finite = all(math.isfinite(r["loss"]) and math.isfinite(n) for r, n in zip(train_rows, norms))
    if not finite or not all(n > 0 for n in norms):
        problems.append("a loss or gradient norm not finite, or a zero gradient")
    timeouts = sum(r.get("reward_timeouts", 0) for r in train_rows)
    problems += [f"{timeouts} reward timeouts"] * (timeouts > 0)
    checkpoint = os.path.join(out, f"step_{steps:06d}")
    moved = moved_fraction(made["tiny"], checkpoint) if os.path.isdir(checkpoint) else 0.0
    problems += [f"weights moved {moved:.1%}"] * (moved < 0.95)
    rewards = [round(r["reward"], 3) for r in train_rows if "reward" in r]  # offline: step 0's
    detail = f"grad_norm {[round(n, 3) for n in norms]}, weights moved {moved:.0%}, "
    detail += f"reward {rewards}"
    if script == "dpo_semionline" and len(train_rows) == 3:
        gaps = [abs(r["logp_gap"]) for r in train_rows]
        synced = [r["synced"] for r in train_rows]
        if synced != [1, 0, 1] or not gaps[1] > max(0.05, 4 * max(gaps[0], gaps[2])):
            problems.append(f"synced {synced}: a stale step's logp_gap not clearly the largest")
        if "reward_math" not in train_rows[0]:
            problems.append("no Math-Verify reward (reward_math) logged")
        detail += ", abs logp_gap synced {:.4f} {:.4f}, stale {:.4f}".format(*gaps[::2], gaps[1])
    return not problems, "; ".join([detail] + problems)


def pytest_cuda(dry, work):
    env = dict(os.environ, TINY_MODEL_CACHE=paths(work)["tiny"])
    cmd = [sys.executable, "-m", "pytest", "tests", "-q", "-rs", "-k", "cuda"]
    code, output = tee(cmd + ["-p", "no:cacheprovider"], env=env)
    summary = (output.strip().splitlines() or ["no output"])[-1].strip("= ")
    # a CPU skips them (no CUDA); a GPU must run them
    return code == 0 and (dry or " passed" in summary), summary


def update_split(dry, work):
    """One update of the ~1B Llama (activation checkpointing on, as a run's default): forward and
    backward of token_logps, then AdamW; the output layer timed alone (HeadLogps.apply on random
    final hidden states of the response positions' shape); decoder layers (and the embedding) are
    the rest. TF32 off, then on: it speeds the fp32 GEMMs HeadLogps' backward does."""
    from common import HeadLogps, head_transform

    device = device_of(dry)
    config = llama(dry, **LLAMA_1B)
    model, optimizer = policy(config, device)
    batch = sequences(config, dry, device)
    rows = int(batch[2][:, 1:].sum())  # the state at t-1 predicts response token t
    h = torch.randn(rows, config.hidden_size, device=device, requires_grad=True)
    targets = torch.randint(0, config.vocab_size, (rows,), device=device)
    head = model.get_output_embeddings()
    into_grad = model.get_input_embeddings().sparse
    head_args = (head.weight, head.bias, *head_transform(config), 64, into_grad)

    def head_alone():
        with torch.autocast(device.type, torch.bfloat16):
            logps, _ = HeadLogps.apply(h, targets, *head_args)
        logps.sum().backward()

    parts = []
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        times = []
        for _ in range(3):  # the first warms up the kernels and the allocator
            forward = timed(lambda: forward_backward(model, *batch), device)
            adam = timed(optimizer.step, device)
            optimizer.zero_grad(set_to_none=True)
            head_s = timed(head_alone, device)
            optimizer.zero_grad(set_to_none=True)  # the head's gradient went into weight.grad
            h.grad = None
            times.append((forward + adam, forward - head_s, head_s, adam))
        ms = [f"{t * 1e3:.0f}" for t in min(times[1:])]
        parts.append(
            f"TF32 {'on' if tf32 else 'off'}: update {ms[0]} ms = layers {ms[1]} + head "
            f"{ms[2]} + AdamW {ms[3]}"
        )
    return True, "; ".join(parts) + (" (tiny stand-in)" if dry else "")


def update_1b(dry, work):
    """One policy update of the ~1B Llama with activation checkpointing off and on: tokens/s, MFU
    (6 x non-embedding parameters x tokens + 6 x head x response tokens), peak memory."""
    device = device_of(dry)
    config = llama(dry, **LLAMA_1B)
    batch = sequences(config, dry, device)
    name = "CPU" if dry else torch.cuda.get_device_name()
    peak_flops = next((v for k, v in BF16_PEAK.items() if k in name), None)
    parts = []
    for grad_ckpt in (False, True):
        reset_peak(device)
        model, optimizer = policy(config, device, grad_ckpt)
        step = partial(update, model, optimizer, batch)
        t = min([timed(step, device) for _ in range(3)][1:])  # the first warms up
        embedding = model.get_input_embeddings().weight.numel()
        n = sum(p.numel() for p in model.parameters()) - embedding
        head = model.get_output_embeddings().weight.numel()
        flops = 6 * n * batch[0].numel() + 6 * head * int(batch[2].sum())
        mfu = f"{flops / t / peak_flops:.0%}" if peak_flops else "n/a"
        peak = memory_gib(device)[1]
        parts.append(
            f"grad_ckpt {'on' if grad_ckpt else 'off'}: {batch[0].numel() / t:,.0f} "
            f"tokens/s, MFU {mfu}, peak {peak:.1f} GiB"
        )
        del model, optimizer, step  # the next configuration's peak without this one
    return True, "; ".join(parts) + (" (tiny stand-in, CPU resident memory)" if dry else "")


def memory_8b(dry, work):
    """Llama-3.1-8B's dimensions with 2, then 4 layers (untied embedding and head in full): fp32
    weights, AdamW state after one step, a bf16 reference (as under FSDP2's mixed precision),
    activation checkpointing, 2 x (256 + 2048) tokens; the peak over a second step, measured, and
    extrapolated to 32 layers from the per-layer increment."""
    from transformers import LlamaForCausalLM

    from common import token_logps

    device = device_of(dry)
    measured = {}
    for layers in (2, 4):
        config = llama(dry, num_hidden_layers=layers, **LLAMA_8B)
        model, optimizer = policy(config, device)
        with torch.device(device):
            ref = LlamaForCausalLM(config).to(torch.bfloat16).eval().requires_grad_(False)
        batch = sequences(config, dry, device)
        for step in range(2):  # the first creates AdamW's state
            with torch.no_grad():
                token_logps(ref, *batch)
            update(model, optimizer, batch)
            if step == 0:  # weights, AdamW state, reference: what stays between steps
                reset_peak(device)
                static = memory_gib(device)[0]
        measured[layers] = static, memory_gib(device)[1]
        del model, optimizer, ref
        reset_peak(device)
    (static2, peak2), (static4, peak4) = measured[2], measured[4]
    per_layer = (peak4 - peak2) / 2
    static32 = static4 + 28 * (static4 - static2) / 2
    peak32 = peak4 + 28 * per_layer
    detail = f"measured: peak {peak2:.1f} GiB with 2 layers, {peak4:.1f} with 4 (+{per_layer:.2f} "
    detail += f"a layer), of it weights, AdamW state, reference {static2:.1f} and {static4:.1f}; "
    detail += f"extrapolated to 32 layers: peak {peak32:.1f} GiB unsharded, {static32:.1f} of it "
    detail += f"weights, AdamW state, reference ({static32 / 8:.1f} a GPU sharded over 8), "
    detail += f"{peak32 - static32:.1f} gradients, activations, temporaries"
    return True, detail + (" (tiny stand-in, CPU resident memory)" if dry else "")


def torchrun_vllm(dry, work):
    """dpo_semionline.py under torchrun, 2 ranks each with its vLLM engine: the ranks end equal."""
    made = paths(work)
    data = made["prompts"]
    flags = ["--model", made["tiny"], "--steps", "2", "--sampler", "vllm", "--sync", "1"]
    flags += ["--data", data, "--val_data", data, "--reward_model", made["rm"], "--overwrite"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = os.path.join(work, "torchrun")
    code, output = tee(torchrun + ["dpo_semionline.py", *flags, "--out", out])
    prints = sorted({x.split()[-1] for x in output.splitlines() if "weights fingerprint" in x})
    ok = code == 0 and "Traceback" not in output and len(prints) == 1
    return ok, f"exit code {code}, the ranks' weight fingerprints {prints}"


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


def vllm_decode(dry, work):
    """vLLM decoding of 64 x 256 tokens of the ~1B Llama, eager and with CUDA graphs (each engine in
    a process of its own), and the seconds of a weight sync."""
    from transformers import LlamaForCausalLM

    path = os.path.join(work, "llama_1b")
    LlamaForCausalLM(llama(dry, **LLAMA_1B)).to(torch.bfloat16).save_pretrained(path)
    parts, ok = [], True
    for eager in (True, False):
        probe = VLLM_PROBE.format(root=ROOT, path=path, eager=eager)
        code, output = tee([sys.executable, "-c", probe])
        lines = [x for x in output.splitlines() if x.startswith("RESULT ")]
        r = json.loads(lines[-1][7:]) if code == 0 and lines else None
        ok = ok and r is not None
        name = "eager" if eager else "CUDA graphs"
        result = f"{r['tokens_per_s']:,.0f} tokens/s, sync {r['sync_s']:.2f} s" if r else "failed"
        parts.append(f"{name}: {result}")
    return ok, "; ".join(parts)


# (key: its log <out>/<key>.log, the table's name, function, timeout on one GPU in s, needs)
ROWS = [
    ("setup", "setup: tiny model, reward model, prompts", setup, 40, ""),
    ("reward", "Math-Verify on known answers", reward_probe, 20, ""),
    ("kernels_autocast", "token_logps, bf16 autocast", partial(kernels, fsdp=False), 25, ""),
    ("kernels_fsdp2", "token_logps, FSDP2 bf16", partial(kernels, fsdp=True), 30, ""),
    ("tied_embedding", "tied sparse embedding gradient", tied_embedding, 20, ""),
    ("dpo_semionline", "dpo_semionline.py, --sync 2", partial(train, "dpo_semionline"), 60, ""),
    ("dpo_offline", "dpo_offline.py", partial(train, "dpo_offline"), 40, ""),
    ("grpo", "grpo.py", partial(train, "grpo"), 40, ""),
    ("group_dpo", "group_dpo.py", partial(train, "group_dpo"), 40, ""),
    ("pytest_cuda", "pytest -k cuda", pytest_cuda, 45, ""),
    ("update_split", "1B Llama update: layers vs head, TF32", update_split, 40, ""),
    ("update_1b", "1B Llama update, grad_ckpt off/on", update_1b, 40, ""),
    ("memory_8b", "8B-shaped memory, 2 and 4 layers -> 32", memory_8b, 40, ""),
    ("torchrun_vllm", "torchrun 2 ranks + vLLM", torchrun_vllm, 120, "2 GPUs, vLLM"),
    ("vllm_decode", "vLLM decoding and weight sync", vllm_decode, 120, "vLLM"),
]


def run_row(key, timeout, out, dry):
    """The row in a process (and session) of its own, its output in <out>/<key>.log; killed with
    all it started at the timeout. Returns (result, detail)."""
    log = os.path.join(out, f"{key}.log")
    cmd = [sys.executable, os.path.abspath(__file__), "--row", key, "--out", out]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as f:
        p = subprocess.Popen(
            cmd + ["--dry-run"] * dry,
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            timed_out = p.wait(timeout) is None
        except subprocess.TimeoutExpired:
            timed_out = True
        with contextlib.suppress(ProcessLookupError):  # what it left: Math-Verify workers...
            os.killpg(p.pid, signal.SIGKILL)
        code = p.wait()
    lines = [x for x in open(log, errors="replace").read().splitlines() if x.strip()]
    results = [x for x in lines if x.startswith(MARK)]
    why = f"timed out after {timeout:.0f} s" if timed_out else f"exit code {code}"
    if results:  # the row's verdict, even if it then hung or crashed at exit (noted)
        ok, detail = json.loads(results[-1][len(MARK) :])
        detail += f" (then {why})" if code else ""
        return {True: "ok", False: "FAIL", None: "skip"}[ok], detail
    last = lines[-1][-300:] if lines else "no output"
    return "FAIL", f"{why}: {last} (see {log})"


def table(results):
    lines = ["| check | result | detail |", "| --- | --- | --- |"]
    for check, result, detail in results:
        cell = detail.replace("|", "/").replace("\n", " ")
        lines.append(f"| {check} | {result} | {cell} |")
    return "\n".join(lines) + "\n"


def drive(dry, out):
    """Runs the rows in order, within BUDGET; prints and writes the table; 1 if a row FAILed."""
    gpus = torch.cuda.device_count()
    if not gpus and not dry:
        print(
            "no GPU: torch.cuda.is_available() is False, so there is nothing to check here "
            "(bash bench/gpu_check.sh --dry-run runs the check's rows on this CPU, tiny)"
        )
        return 0
    try:
        import math_verify  # noqa: F401
    except ImportError:
        print(
            f"math_verify is not importable and .whl/ holds no wheels: the training rows need "
            f"it. In the project root, on a machine with a package index:\n{DOWNLOAD}\nthen "
            f"carry .whl/ beside the tree (bench/README.md)",
            file=sys.stderr,
        )
        return 2
    have_vllm = importlib.util.find_spec("vllm") is not None
    out = out or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(out, exist_ok=True)
    slack = DRY_SLACK if dry else 1
    here = "a dry run" if dry else f"{gpus} GPU, vLLM {'installed' if have_vllm else 'absent'}"
    print(f"gpu_check: {here}; logs in {out}", flush=True)
    start, results = time.time(), []
    for key, check, _, timeout, needs in ROWS:
        missing = ("2 GPUs" in needs and gpus < 2) or ("vLLM" in needs and not have_vllm)
        left = BUDGET * slack - (time.time() - start)
        if needs and (dry or missing):
            result = "skip", f"needs {needs}; here {here}"
        elif timeout * slack > left:
            result = "skip", f"{left:.0f} s left of the {BUDGET * slack} s budget"
        else:
            t0 = time.time()
            result, detail = run_row(key, timeout * slack, out, dry)
            result = result, f"{detail} [{time.time() - t0:.0f} s of {timeout * slack} s]"
        results.append((check, *result))
        print(f"[{result[0]}] {check}: {result[1]}", flush=True)
        with open(os.path.join(out, "table.md"), "w") as f:
            f.write(table(results))
    print(f"\n{table(results)}\n{time.time() - start:.0f} s; table and logs in {out}")
    return 1 if any(result == "FAIL" for _, result, _ in results) else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on this CPU, tiny sizes")
    parser.add_argument("--out", default="", help="folder for the logs and table.md")
    parser.add_argument("--row", default="", help="run one row (what the driver does)")
    args = parser.parse_args()
    if not args.row:
        sys.exit(drive(args.dry_run, args.out))
    fn = {key: fn for key, _, fn, _, _ in ROWS}[args.row]
    if args.dry_run:  # tiny sizes: two threads beside other work on 2 cores thrash (a tiny linear
        torch.set_num_threads(1)  # took 15.7 ms with 2, 0.23 ms with 1, measured)
    ok, detail = fn(args.dry_run, os.path.join(args.out, "work"))
    print(MARK + json.dumps([ok, detail]), flush=True)


if __name__ == "__main__":
    main()
