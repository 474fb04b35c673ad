"""GRPO: group-relative advantages, a token-level clipped surrogate and a k3 KL to a fixed reference.

Paper: "Bridging Offline and Online Reinforcement Learning for LLMs" (arXiv 2506.21495), its GRPO
baseline, run online (s = 1) as in the paper; `--sync s` > 1 gives semi-online GRPO, which the paper
names as future work. N = 8 responses per prompt, KL coefficient 0.001, reference fixed.

Each step: (1) every s steps copy the trainer's weights into the generator (and, with --ref_sync,
into the reference model); (2) sample n responses per prompt; (3) score them (Math-Verify, or --reward_model);
(4) advantages (r - mean) / (std + 1e-6) over each prompt's group; (5) one AdamW step on the
token-level loss, summed over each response and averaged over all responses of the global batch.

Deliberate deviations from the paper and the authors' code:
  1. Defaults are sized for the embedded default (Gemma-3-270M on arithmetic, on a CPU): a larger
     learning rate and grad clip, short responses, few prompts per step. The README's paper-scale
     command passes the paper's values.
  2. Validation (n=1, T=0.6, top-p 0.9) always measures the current policy: when it falls between
     two syncs, the generator is given the current weights for it and then its stale ones back.
  3. Resuming syncs the generator (and, with --ref_sync, the reference) at the resumed step, so the
     staleness window restarts there; with --sync inf the generator stays the seed model.
  4. The importance ratio's denominator is the generator's own log-prob of each sampled token, clipped
     PPO-style at 1 +- --clip_eps (the authors' code uses the trainer's detached log-prob: a ratio of
     exactly 1). With s = 1 and the HF sampler it is 1 and the gradient is the paper's REINFORCE-like one;
     with vLLM it differs from 1 by the two engines' numerics; with s > 1 it corrects for staleness.
  5. The entropy bonus (--entropy_coef, default 0) is the mean next-token entropy of each response,
     averaged over all responses, as the DPO scripts' bonus is over chosen responses.

  python grpo.py                                                   # embedded default, CPU ok
  torchrun --nproc_per_node 8 grpo.py --model meta-llama/Llama-3.1-8B-Instruct --num_responses 8 ...
"""
import math, os, random, time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from common import (add_sums, all_reduce, check_run_folder, copy_weights, fail, generate, grad_sync,
                    grpo_advantages, grpo_loss, iter_weights, load_checkpoint, load_model, load_tokenizer, log_metrics,
                    make_optimizer, make_sampler, open_run, optimizer_step, pad_sequences, parse_args, resolve,
                    save_checkpoint, setup_dist, sync_weights, token_logps, wrap_model)
from data import build_prompt, default_model_path, load_task, step_batch, stop_token_ids
from eval import evaluate, load_reward_model, plot_runs, print_summary, score_responses, task_means, task_sums


@dataclass
class Args:
    model: str = field(default="", metadata={"help": "hub id or local folder; empty: the embedded Gemma-3-270M",
                                             "model": True})
    data: str = field(default="", metadata={"help": "JSONL {problem, answer} or hub dataset; empty: embedded arithmetic; "
                                            "rows without an answer are scored by --reward_model"})
    val_data: str = field(default="", metadata={"help": "validation JSONL or hub dataset; empty: embedded arithmetic"})
    reward_model: str = field(default="", metadata={"help": "sequence-classification reward model (folder or hub id) "
                                                    "for rows without an 'answer'", "model": True})
    val_size: int = field(default=250, metadata={"help": "validation problems used (0: all)", "min": 0})
    max_prompt_tokens: int = field(default=2048, metadata={"help": "longer prompts are dropped at load time", "min": 1})
    steps: int = field(default=30, metadata={"help": "optimizer steps", "min": 1})
    prompts_per_step: int = field(default=8, metadata={"help": "prompts per step, global (split over ranks)", "min": 1})
    n: int = field(default=8, metadata={"help": "responses sampled per prompt (alias --num_responses: torchrun reads "
                                        "a bare --n as its own, ambiguous, option)", "aliases": ["--num_responses"], "min": 2})
    max_new_tokens: int = field(default=40, metadata={"help": "response length limit (paper: 2048)", "min": 1})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of training rollouts", "gt": 0})
    top_p: float = field(default=1.0, metadata={"help": "top-p of training rollouts", "gt": 0, "max": 1})
    lr: float = field(default=3e-6, metadata={"help": "peak learning rate (paper: 1e-6)", "gt": 0})
    adam_eps: float = field(default=1e-4, metadata={"help": "AdamW eps; the paper's large value prevents DPO divergence", "gt": 0})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1", "min": 0, "max": 0.999999})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2", "min": 0, "max": 0.999999})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay", "min": 0})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps", "min": 0})
    lr_min_ratio: float = field(default=0.2, metadata={"help": "cosine schedule ends at this fraction of lr", "min": 0, "max": 1})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient-norm clip (paper: 0.1)", "gt": 0})
    kl_beta: float = field(default=0.001, metadata={"help": "weight of the k3 KL to the reference, per token", "min": 0})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip of the importance ratio to the generator", "gt": 0})
    std_normalize: bool = field(default=True, metadata={"help": "divide advantages by the group's reward std"})
    sync: float = field(default=1, metadata={"help": "steps between generator syncs: 1 online (the paper's GRPO)",
                                             "min": 1, "whole": True})
    ref_sync: bool = field(default=False, metadata={"help": "refresh the reference model with the generator"})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus on all responses", "min": 0})
    micro_batch: int = field(default=8, metadata={"help": "sequences per forward/backward (gradient accumulation)",
                                                  "min": 1})
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
    out: str = field(default="runs/grpo", metadata={"help": "run folder"})
    seed: int = field(default=0, metadata={"help": "seed for data order, task and sampling"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})


def main():
    args = parse_args(Args)
    world = int(os.environ.get("WORLD_SIZE", 1))
    # impossible flag combinations fail here, before any model loads
    if args.prompts_per_step % world:
        fail(f"--prompts_per_step {args.prompts_per_step}: must divide over the {world} ranks")
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
    if ckpt and args.ref_sync:
        copy_weights(ref, model)  # deviation 3
    open_run(args.out, asdict(args) | {"model_path": model_path, "world_size": world, "bf16": bf16, "fsdp": fsdp},
             start, args.overwrite)
    val_kwargs = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, rm=rm)
    keep_gen_state = args.val_every and args.val_every % args.sync != 0  # deviation 2 needs the stale weights
    gen_state, val_history, skipped, skipped_in_row = None, [], 0, 0

    bar = tqdm(range(start, args.steps), disable=rank != 0, desc="grpo", initial=start, total=args.steps)
    for step in bar:
        row = {"step": step, "synced": 0, "time_sync": 0.0}

        # ---- 1. sync the generator (and the reference) every `sync` steps ----
        if step % args.sync == 0 or (step == start and not math.isinf(args.sync)):
            # a copy of what the generator now holds, for deviation 2 (on a CPU .cpu() would alias the live weights)
            gen_state = [(k, v.to("cpu", copy=True)) for k, v in iter_weights(model, sampler.dtype)] \
                if keep_gen_state else None
            row["time_sync"], row["synced"] = sync_weights(sampler, gen_state or iter_weights(model, sampler.dtype)), 1
            if args.ref_sync:
                copy_weights(ref, model)

        # ---- validate the current policy ----
        if step == 0 or (args.val_every and step % args.val_every == 0):
            if not row["synced"]:
                sync_weights(sampler, iter_weights(model, sampler.dtype))
            val = evaluate(sampler, tokenizer, val_rows, **val_kwargs)
            if not row["synced"]:
                sync_weights(sampler, gen_state)
            row |= {"val_reward": val["reward"], "val_reward_se": val["reward_se"], "val_length": val["length"],
                    "time_val": val["seconds"]}
            val_history.append((step, val))

        # ---- 2. generate: n responses for each of this rank's prompts ----
        t0 = time.time()
        batch = [train_rows[i] for i in step_batch(len(train_rows), step, args.prompts_per_step, args.seed)]
        batch = batch[rank::world]
        prompts = [build_prompt(tokenizer, r) for r in batch]
        groups = generate(sampler, prompts, args.n, args.temperature, args.top_p, args.max_new_tokens,
                          seed=args.seed * 100003 + step * world + rank)
        row["time_gen"] = time.time() - t0

        # ---- 3. score: Math-Verify for rows with an answer, the reward model for the others ----
        t0 = time.time()
        rows_n = [r for r in batch for _ in range(args.n)]  # each response's data row
        flat, timeouts = score_responses(rows_n, [s.text for g in groups for s in g], rm)
        rewards = [flat[i * args.n:(i + 1) * args.n] for i in range(len(groups))]
        row["time_reward"] = time.time() - t0

        # ---- 4. advantages: each response's reward against its prompt's group ----
        advantages = grpo_advantages(torch.tensor(rewards, dtype=torch.float32), args.std_normalize)  # [prompts, n]
        rollouts = [(i, s, a) for i, (grp, adv) in enumerate(zip(groups, advantages.tolist())) for s, a in zip(grp, adv)]

        # ---- 5. train: one optimizer step on all responses of the global batch ----
        t0 = time.time()
        model.train()
        sums = {}  # this rank's sums, by metric name, all-reduced below
        micro = [rollouts[i:i + args.micro_batch] for i in range(0, len(rollouts), args.micro_batch)]
        # every rank runs the same number of forward/backward passes, so collectives stay in step; a rank
        # short of responses runs a dummy one with weight 0
        n_micro = int(all_reduce({"n": max(1, len(micro))}, op="max")["n"])
        for m in range(n_micro):
            mb = micro[m] if m < len(micro) else [(0, groups[0][0], 0.0)]
            weight = 1.0 if m < len(micro) else 0.0
            input_ids, attn, cmask = pad_sequences([prompts[i] for i, _, _ in mb], [s.token_ids for _, s, _ in mb],
                                                   tokenizer.pad_token_id, device)
            # around the forward too: DDP decides there whether this backward all-reduces the gradients
            with grad_sync(model, m == n_micro - 1), torch.autocast(device.type, torch.bfloat16, enabled=bf16 and not fsdp):
                logps, entropy = token_logps(model, input_ids, attn, cmask)
                with torch.no_grad():
                    ref_logps, _ = token_logps(ref, input_ids, attn, cmask)
                    gen_logps = torch.zeros_like(logps)  # the importance ratio's denominator (deviation 4)
                    gen_logps[cmask] = torch.tensor([x for _, s, _ in mb for x in s.logprobs], device=device)
                adv = torch.tensor([a for _, _, a in mb], device=device)
                losses, diag = grpo_loss(logps, gen_logps, ref_logps, adv, cmask, args.kl_beta, args.clip_eps)
                losses = losses - args.entropy_coef * entropy.sum(-1) / cmask.sum(-1).clamp(min=1)
                # normaliser: this rank's responses; DDP averages over ranks, so the gradient is that of
                # (sum of per-response losses) / (responses in the global batch)
                loss = weight * losses.sum() / len(rollouts)
                loss.backward()
            with torch.no_grad():
                add_sums(sums, weight, loss=losses.sum(), tokens=cmask.sum(), entropy=entropy[cmask].sum(),
                         logp_gap=(logps - gen_logps)[cmask].sum(), clipped=diag["clipped"].sum(),
                         kl=(logps - ref_logps)[cmask].sum())
        g = all_reduce(sums | task_sums(rows_n, flat) | {
            "prompts": len(batch), "rollouts": sum(map(len, rewards)), "reward": sum(map(sum, rewards)),
            "length": sum(len(s.token_ids) for grp in groups for s in grp), "reward_timeouts": timeouts,
            "adv": advantages.sum().item(), "adv_sq": advantages.square().sum().item(),
            "zero_std": sum(max(r) == min(r) for r in rewards)})
        grad_norm, ok = optimizer_step(model, optimizer, scheduler, args.grad_clip, g["loss"])
        skipped, skipped_in_row = skipped + (not ok), 0 if ok else skipped_in_row + 1
        row["time_train"] = time.time() - t0

        # ---- log and checkpoint ----
        ntok, adv_mean = max(g["tokens"], 1), g["adv"] / g["rollouts"]
        row |= {"reward": g["reward"] / g["rollouts"], "length": g["length"] / g["rollouts"], "loss": g["loss"] / g["rollouts"],
                "entropy": g["entropy"] / ntok, "logp_gap": g["logp_gap"] / ntok,
                "kl": g["kl"] / ntok, "clip_frac": g["clipped"] / ntok, "frac_zero_std": g["zero_std"] / g["prompts"],
                "adv_std": math.sqrt(max(g["adv_sq"] / g["rollouts"] - adv_mean ** 2, 0.0)),
                "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0], "reward_timeouts": int(g["reward_timeouts"]),
                "skipped_steps": skipped}
        row |= task_means(g)  # per task in a mixed batch: reward_math, reward_rm
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
