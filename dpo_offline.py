"""Offline DPO: pairs sampled once from the seed model, then DPO on that fixed dataset (s = infinity).

Paper: "Bridging Offline and Online Reinforcement Learning for LLMs" (arXiv 2506.21495), section 2,
DPO loss eq. 3, offline regime: the generator is never synced, which is the same as generating the
pairs once beforehand; this script does that explicitly. The reference stays the seed model.

Phase 1 (sample_pairs): n responses from the seed model for every training prompt the run will visit, scored
(Math-Verify, or --reward_model), a random correct one paired with a random incorrect one, <out>/pairs.jsonl.
Phase 2, each step: the prompts the online scripts take at that step, their pairs (a prompt without one is
skipped, and counted in the normaliser, as online), one AdamW step. `--pairs file.jsonl` skips phase 1: a plain
DPO trainer on rows {prompt, chosen, rejected} (text; the prompt goes through the prompt template).

Deliberate deviations from the paper and the authors' code:
  1. Defaults are sized for the embedded default (Gemma-3-270M on arithmetic, on a CPU): a larger
     learning rate and grad clip, short responses, few prompts per step. The README's paper-scale
     command passes the paper's values.
  2. Validation (n=1, T=0.6, top-p 0.9) always measures the current policy: the generator, which
     phase 2 otherwise never uses, is given the current weights for it.
  3. Resuming reuses <out>/pairs.jsonl: phase 1 is not repeated.
  4. A prompt visited in two epochs gets the same pair both times (`dpo_semionline.py --sync inf` would
     sample it afresh). Phase 1 is logged once, in the step-0 row (time_gen, time_reward, the seed's reward
     and length); later rows log no reward, length or generation time.
  5. Pairs given as text are tokenized without special tokens and end with EOS; their generator
     log-probs are unknown and count as a logp_gap of 0.

  python dpo_offline.py                                            # embedded default, CPU ok
  python dpo_offline.py --pairs my_pairs.jsonl --model ...         # plain DPO on a pair dataset
  torchrun --nproc_per_node 8 dpo_offline.py --model meta-llama/Llama-3.1-8B-Instruct ...
"""
import json, math, os, random, time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from common import (Sample, add_sums, all_gather, all_reduce, barrier, check_run_folder, dpo_loss,
                    fail, generate, grad_sync, iter_weights, load_checkpoint, load_model, load_tokenizer, log_metrics,
                    make_optimizer, make_sampler, open_run, optimizer_step, pad_sequences, parse_args, print0, resolve,
                    save_checkpoint, setup_dist, sync_weights, token_logps, wrap_model)
from data import build_prompt, default_model_path, load_task, read_jsonl, step_batch, stop_token_ids
from eval import evaluate, load_reward_model, plot_runs, print_summary, score_responses, task_means, task_sums


@dataclass
class Args:
    model: str = field(default="", metadata={"help": "hub id or local folder; empty: the embedded Gemma-3-270M",
                                             "model": True})
    data: str = field(default="", metadata={"help": "JSONL {problem, answer} or hub dataset; empty: embedded arithmetic; "
                                            "rows without an answer are scored by --reward_model"})
    val_data: str = field(default="", metadata={"help": "validation JSONL or hub dataset; empty: embedded arithmetic"})
    pairs: str = field(default="", metadata={"help": "JSONL {prompt, chosen, rejected} (text) to train on; skips phase 1"})
    reward_model: str = field(default="", metadata={"help": "sequence-classification reward model (folder or hub id) "
                                                    "for rows without an 'answer'", "model": True})
    val_size: int = field(default=250, metadata={"help": "validation problems used (0: all)", "min": 0})
    max_prompt_tokens: int = field(default=2048, metadata={"help": "longer prompts are dropped at load time", "min": 1})
    steps: int = field(default=30, metadata={"help": "optimizer steps", "min": 1})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per step, global (split over ranks)", "min": 1})
    n: int = field(default=4, metadata={"help": "phase 1: responses sampled per prompt (alias --num_responses: torchrun reads "
                                        "a bare --n as its own, ambiguous, option)", "aliases": ["--num_responses"], "min": 2})
    max_new_tokens: int = field(default=40, metadata={"help": "response length limit (paper: 2048)", "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of phase 1's rollouts", "gt": 0})
    top_p: float = field(default=1.0, metadata={"help": "top-p of phase 1's rollouts", "gt": 0, "max": 1})
    lr: float = field(default=3e-6, metadata={"help": "peak learning rate (paper: 1e-6)", "gt": 0})
    adam_eps: float = field(default=1e-4, metadata={"help": "AdamW eps; the paper's large value prevents DPO divergence", "gt": 0})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1", "min": 0, "max": 0.999999})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2", "min": 0, "max": 0.999999})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay", "min": 0})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps", "min": 0})
    lr_min_ratio: float = field(default=0.2, metadata={"help": "cosine schedule ends at this fraction of lr", "min": 0, "max": 1})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip (paper: 0.1)", "gt": 0})
    beta: float = field(default=0.1, metadata={"help": "DPO beta (eq. 3)", "gt": 0})
    nll_coef: float = field(default=0.0, metadata={"help": "weight of the length-normalised NLL on chosen responses", "min": 0})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus on chosen responses", "min": 0})
    micro_batch: int = field(default=8, metadata={"help": "sequences per forward/backward (gradient accumulation); a "
                                                  "pair is 2", "min": 2})
    sampler: str = field(default="auto", metadata={"help": "vllm | hf | auto (vllm when installed)",
                                                   "choices": ["vllm", "hf", "auto"]})
    vllm_memory: float = field(default=0.3, metadata={"help": "fraction of GPU memory vLLM may take", "gt": 0, "max": 1})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 compute on fp32 master weights (default: on CUDA)"})
    grad_ckpt: bool | None = field(default=None, metadata={"help": "activation checkpointing (default: on CUDA)"})
    fsdp: bool | None = field(default=None, metadata={"help": "shard with FSDP2 instead of replicating with DDP "
                                                      "(default: on CUDA with more than one rank)"})
    val_every: int = field(default=0, metadata={"help": "validate every k steps (always before and after)", "min": 0})
    save_every: int = field(default=0, metadata={"help": "checkpoint every k steps (always at the end)", "min": 0})
    resume: str = field(default="", metadata={"help": "run folder (or step_N folder) to resume from"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run already in --out"})
    out: str = field(default="runs/dpo_offline", metadata={"help": "run folder"})
    seed: int = field(default=0, metadata={"help": "seed for data order, task and sampling"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})


def make_pairs(groups, rewards, rng):
    """Paper section 2: chosen is a random highest-reward response, rejected a random lowest-reward one
    (with 0/1 rewards: a random correct vs a random incorrect one). Prompts whose rewards are all
    equal are skipped. Returns (prompt index, chosen Sample, rejected Sample) triples."""
    pairs = []
    for i, (samples, r) in enumerate(zip(groups, rewards)):
        if max(r) > min(r):
            pairs.append((i, rng.choice([s for s, x in zip(samples, r) if x == max(r)]),
                          rng.choice([s for s, x in zip(samples, r) if x == min(r)])))
    return pairs


def read_pairs(path):
    """A pair file -> rows; a bad line or a row without prompt / chosen / rejected text is named by file and line."""
    if not os.path.isfile(path):
        fail(f"--pairs {path}: no such file")
    rows = []
    for i, x in read_jsonl(path):
        x["problem"] = x.get("prompt", x.get("problem"))
        if not all(isinstance(x.get(k), str) for k in ("problem", "chosen", "rejected")):
            fail(f"{path}:{i}: row needs 'prompt', 'chosen' and 'rejected' text")
        rows.append(x)
    if not rows:
        fail(f"{path}: no pairs (phase 1 found no prompt with both a correct and an incorrect response)")
    return rows


def sample_pairs(args, sampler, tokenizer, train_rows, rm, pairs_file, rank, world):
    """Phase 1: n responses per prompt that the run will visit, from the seed model, once; score; pair; write
    pairs_file (atomically: a killed phase 1 leaves nothing to resume from). Returns its metrics row."""
    used = sorted({i for s in range(args.steps) for i in step_batch(len(train_rows), s, args.prompts_per_step, args.seed)})
    t0, metrics, mine, groups, chunk = time.time(), {}, used[rank::world], [], 256
    for c in tqdm(range(0, len(mine), chunk), disable=rank != 0, desc="phase 1: sample the seed model"):
        groups += generate(sampler, [build_prompt(tokenizer, train_rows[i]) for i in mine[c:c + chunk]], args.n,
                           args.temperature, args.top_p, args.max_new_tokens, seed=args.seed * 100003 + c * world + rank)
    metrics["time_gen"], t0 = time.time() - t0, time.time()
    rows_n = [train_rows[i] for i in mine for _ in range(args.n)]  # each response's data row
    flat, timeouts = score_responses(rows_n, [s.text for g in groups for s in g], rm)
    rewards = [flat[i * args.n:(i + 1) * args.n] for i in range(len(groups))]
    metrics["time_reward"] = time.time() - t0
    rows = [{"index": mine[k], "prompt": train_rows[mine[k]]["problem"], "answer": train_rows[mine[k]].get("answer"),
             "chosen": c.text, "rejected": r.text, "chosen_reward": max(rewards[k]), "rejected_reward": min(rewards[k]),
             "chosen_token_ids": c.token_ids, "rejected_token_ids": r.token_ids, "chosen_logprobs": c.logprobs,
             "rejected_logprobs": r.logprobs}
            for k, c, r in make_pairs(groups, rewards, random.Random(f"{args.seed}-{rank}"))]
    gathered = all_gather(rows)
    g = all_reduce(task_sums(rows_n, flat) | {"rollouts": len(flat), "reward": sum(flat), "reward_timeouts": timeouts,
                                              "length": sum(len(s.token_ids) for grp in groups for s in grp)})
    metrics |= {"reward": g["reward"] / g["rollouts"], "length": g["length"] / g["rollouts"],
                "reward_timeouts": int(g["reward_timeouts"])} | task_means(g)
    if rank == 0:
        with open(pairs_file + ".tmp", "w") as f:
            f.writelines(json.dumps(x) + "\n" for part in gathered for x in part)
        os.replace(pairs_file + ".tmp", pairs_file)
        print0(f"phase 1: {len(used)} prompts, {sum(map(len, gathered))} pairs, seed reward {metrics['reward']:.3f}")
    barrier()
    return metrics


def row_to_pair(row, tokenizer):
    """A pairs.jsonl row -> (chosen, rejected) Samples. Phase 1's rows keep the token ids and the generator's
    log-probs; rows given as text are tokenized, EOS appended, log-probs unknown (nan; deviation 5)."""
    def sample(key):
        if f"{key}_token_ids" in row:
            return Sample(row[f"{key}_token_ids"], row[key], row[f"{key}_logprobs"])
        ids = tokenizer(row[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return Sample(ids, row[key], [math.nan] * len(ids))
    return sample("chosen"), sample("rejected")


def main():
    args = parse_args(Args)
    world = int(os.environ.get("WORLD_SIZE", 1))
    # impossible flag combinations fail here, before any model loads
    if args.prompts_per_step % world:
        fail(f"--prompts_per_step {args.prompts_per_step}: must divide over the {world} ranks")
    data = read_pairs(args.pairs) if args.pairs else None  # a bad pair file fails here, before any model loads
    ckpt = check_run_folder(args.out, args.resume, args.overwrite)
    rank, world, device = setup_dist()
    cuda = device.type == "cuda"
    bf16, fsdp = resolve(args.bf16, cuda), resolve(args.fsdp, cuda and world > 1)
    random.seed(args.seed)

    # ---- task, models, generator ----
    model_path = args.model or default_model_path()
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    train_rows, val_rows = load_task(tokenizer, args.data, args.val_data, args.val_size, args.seed, args.max_prompt_tokens,
                                     need_answer=not args.reward_model)
    policy = load_model(model_path, device, torch.float32, args.trust_remote_code, resolve(args.grad_ckpt, cuda))
    ref = load_model(model_path, device, torch.bfloat16 if bf16 else torch.float32, args.trust_remote_code)
    ref.eval().requires_grad_(False)
    rm = load_reward_model(args.reward_model, device, trust_remote_code=args.trust_remote_code) if args.reward_model else None
    sampler = make_sampler(args.sampler, model_path, tokenizer, device, args.seed + rank, stop_token_ids(tokenizer),
                           args.max_prompt_tokens + args.max_new_tokens, bf16, args.vllm_memory, args.trust_remote_code)
    model = wrap_model(policy, device, fsdp, bf16)
    ref = wrap_model(ref, device, fsdp) if fsdp else ref
    optimizer, scheduler = make_optimizer(model, args.lr, (args.adam_beta1, args.adam_beta2), args.adam_eps,
                                          args.weight_decay, args.steps, args.lr_min_ratio, args.warmup_steps)
    start = load_checkpoint(ckpt, model, optimizer, scheduler) if ckpt else 0
    open_run(args.out, asdict(args) | {"model_path": model_path, "world_size": world, "bf16": bf16, "fsdp": fsdp},
             start, args.overwrite)
    val_kwargs = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, rm=rm)
    val_history, skipped, skipped_in_row = [], 0, 0

    # ---- phase 1: n responses per prompt from the seed model, once; score; pair; write <out>/pairs.jsonl ----
    pairs_file, phase1 = args.pairs or f"{args.out}/pairs.jsonl", {}
    if not args.pairs and not (start and os.path.exists(pairs_file)):  # deviation 3
        phase1 = sample_pairs(args, sampler, tokenizer, train_rows, rm, pairs_file, rank, world)
    data = data or read_pairs(pairs_file)
    # phase 1's rows are keyed by training row, so a step takes the online scripts' prompts (those without a
    # pair skipped); the rows of a --pairs file are the prompts themselves
    by_index = dict(enumerate(data)) if args.pairs else {x["index"]: x for x in data}
    num_prompts = len(data) if args.pairs else len(train_rows)

    bar = tqdm(range(start, args.steps), disable=rank != 0, desc="dpo_offline", initial=start, total=args.steps)
    for step in bar:
        row = {"step": step, "synced": 0, "time_sync": 0.0, "time_gen": 0.0, "time_reward": 0.0} | (phase1 if step == 0 else {})

        # ---- validate the current policy ----
        if step == 0 or (args.val_every and step % args.val_every == 0):
            sync_weights(sampler, iter_weights(model, sampler.dtype))  # deviation 2
            val = evaluate(sampler, tokenizer, val_rows, **val_kwargs)
            row |= {"val_reward": val["reward"], "val_reward_se": val["reward_se"], "val_length": val["length"],
                    "time_val": val["seconds"]}
            val_history.append((step, val))

        # ---- 2-4. this step's prompts and their pairs, from the fixed dataset: nothing is sampled ----
        batch = step_batch(num_prompts, step, args.prompts_per_step, args.seed)[rank::world]
        step_rows = [by_index.get(i, data[0]) for i in batch]  # a prompt without a pair: a placeholder, never trained
        prompts = [build_prompt(tokenizer, x) for x in step_rows]
        pairs = [(k, *row_to_pair(x, tokenizer)) for k, (i, x) in enumerate(zip(batch, step_rows)) if i in by_index]

        # ---- 5. train: one optimizer step on all pairs of the global batch ----
        t0 = time.time()
        model.train()
        sums = {}  # this rank's sums, by metric name, all-reduced below
        micro = [pairs[i:i + args.micro_batch // 2] for i in range(0, len(pairs), args.micro_batch // 2)]
        # every rank runs the same number of forward/backward passes, so collectives stay in step; a rank
        # short of pairs runs a dummy pair with weight 0
        n_micro = int(all_reduce({"n": max(1, len(micro))}, op="max")["n"])
        for m in range(n_micro):
            mb = micro[m] if m < len(micro) else [(0, *row_to_pair(step_rows[0], tokenizer))]
            weight = 1.0 if m < len(micro) else 0.0
            input_ids, attn, cmask = pad_sequences([prompts[i] for i, _, _ in mb] * 2,
                                                   [c.token_ids for _, c, _ in mb] + [r.token_ids for _, _, r in mb],
                                                   tokenizer.pad_token_id, device)
            # around the forward too: DDP decides there whether this backward all-reduces the gradients
            with grad_sync(model, m == n_micro - 1), torch.autocast(device.type, torch.bfloat16, enabled=bf16 and not fsdp):
                logps, entropy = token_logps(model, input_ids, attn, cmask)
                with torch.no_grad():
                    ref_logps, _ = token_logps(ref, input_ids, attn, cmask)
                    gen_logps = torch.zeros_like(logps)  # the generator's log-probs, for logp_gap
                    gen_logps[cmask] = torch.tensor([x for s in [c for _, c, _ in mb] + [r for _, _, r in mb]
                                                     for x in s.logprobs], device=device)
                seq_logps, seq_ref, lengths = logps.sum(-1), ref_logps.sum(-1), cmask.sum(-1)
                b = len(mb)
                losses, diag = dpo_loss(seq_logps[:b], seq_logps[b:], seq_ref[:b], seq_ref[b:], args.beta)
                chosen_tokens = lengths[:b].clamp(min=1)
                losses = losses + args.nll_coef * (-seq_logps[:b] / chosen_tokens) \
                    - args.entropy_coef * (entropy[:b].sum(-1) / chosen_tokens)
                # normaliser: this rank's prompts, skipped ones included; DDP averages over ranks, so the
                # gradient is that of (sum of pair losses) / (prompts in the global batch)
                loss = weight * losses.sum() / len(batch)
                loss.backward()
            with torch.no_grad():
                gen_logps = torch.where(gen_logps.isnan(), logps, gen_logps)  # unknown: a gap of 0 (deviation 5)
                add_sums(sums, weight, loss=losses.sum(), pairs=b, tokens=cmask.sum(), entropy=entropy[cmask].sum(),
                         logp_gap=(logps - gen_logps)[cmask].sum(), margin=diag["margin"].sum(), acc=diag["acc"].sum(),
                         kl=(logps - ref_logps)[cmask].sum(), chosen_length=lengths[:b].sum(),
                         rejected_length=lengths[b:].sum())
        g = all_reduce(sums | {"prompts": len(batch)})
        grad_norm, ok = optimizer_step(model, optimizer, scheduler, args.grad_clip, g["loss"])
        skipped, skipped_in_row = skipped + (not ok), 0 if ok else skipped_in_row + 1
        row["time_train"] = time.time() - t0

        # ---- log and checkpoint ----
        npairs, ntok = max(g["pairs"], 1), max(g["tokens"], 1)
        row |= {"loss": g["loss"] / g["prompts"],
                "pairs": int(g["pairs"]), "entropy": g["entropy"] / ntok, "logp_gap": g["logp_gap"] / ntok,
                "kl": g["kl"] / ntok, "margin": g["margin"] / npairs, "pair_acc": g["acc"] / npairs,
                "chosen_length": g["chosen_length"] / npairs, "rejected_length": g["rejected_length"] / npairs,
                "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "skipped_steps": skipped}
        log_metrics(args.out, row)
        if rank == 0:
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if skipped_in_row == 3:
            fail(f"non-finite loss or gradient norm 3 steps in a row (steps {step - 2}-{step}), updates skipped: "
                 f"stopping; the last checkpoint in {args.out} is intact")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(args.out, step + 1, model, tokenizer, optimizer, scheduler)

    # ---- after training: validate the final policy, save ----
    sync_weights(sampler, iter_weights(model, sampler.dtype))
    val = evaluate(sampler, tokenizer, val_rows, **val_kwargs)
    log_metrics(args.out, {"step": args.steps, "val_reward": val["reward"], "val_reward_se": val["reward_se"],
                           "val_length": val["length"], "time_val": val["seconds"]})
    save_checkpoint(args.out, args.steps, model, tokenizer, optimizer, scheduler)
    print_summary(rank, model, val_history + [(args.steps, val)])
    if rank == 0:
        plot_runs([args.out], os.path.join(args.out, "metrics.png"))  # the curves of the paper's Figs. 2-3


if __name__ == "__main__":
    main()
