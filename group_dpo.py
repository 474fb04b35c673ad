"""GroupDPO: every correct response of a prompt paired with every incorrect one; optionally + alpha GRPO.

Paper: "Bridging Offline and Online Reinforcement Learning for LLMs" (arXiv 2506.21495): GroupDPO
(eq. 4, on the DPO loss of eq. 3) and the combined loss L_GroupDPO + alpha L_GRPO (alpha 0.01, 0.001).
The generator is synced every `--sync s` steps as in dpo_semionline.py: s = 1 online, inf offline.

Each step: (1) every s steps copy the trainer's weights into the generator (and, with --ref_sync,
into the reference model); (2) sample n responses per prompt; (3) score them (Math-Verify, or --reward_model);
(4) keep the prompts with both a correct and an incorrect response; (5) one AdamW step on the
GroupDPO loss of each kept prompt (+ alpha x its GRPO loss), summed and divided by all prompts.

Deliberate deviations from the paper and the authors' code:
  1. Defaults are sized for the embedded default (Gemma-3-270M on arithmetic, on a CPU): a larger
     learning rate and grad clip, short responses, few prompts per step. The README's paper-scale
     command passes the paper's values.
  2. Validation (n=1, T=0.6, top-p 0.9) always measures the current policy: when it falls between
     two syncs, the generator is given the current weights for it and then its stale ones back.
  3. Resuming syncs the generator (and, with --ref_sync, the reference) at the resumed step, so the
     staleness window restarts there; with --sync inf the generator stays the seed model.
  4. The alpha GRPO term is grpo.py's token-level loss (the authors' unmerged code applied sequence
     log-probs against a token mask, weighting each response by its length), and is computed only on
     the kept prompts: on the others every advantage is 0 and only alpha x its small KL term would remain.
  5. The optional NLL and entropy terms are averaged over the prompt's correct responses.
  6. --micro_batch counts sequences, so a group may span micro-batches: a first pass computes every
     response's summed log-prob without a graph and eq. 4's derivative with respect to each; the second
     backpropagates that coefficient x log pi(y|x), micro-batch by micro-batch. The same gradient, at the
     cost of one more forward pass.

  python group_dpo.py                                              # embedded default, CPU ok
  torchrun --nproc_per_node 8 group_dpo.py --sync 10 --grpo_alpha 0.01 --model meta-llama/Llama-3.1-8B-Instruct ...
"""
import math, os, random, time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from common import (add_sums, all_reduce, check_run_folder, copy_weights, dpo_loss, fail, generate,
                    grad_sync, grpo_advantages, grpo_loss, iter_weights, load_checkpoint, load_model, load_tokenizer,
                    log_metrics, make_optimizer, make_sampler, open_run, optimizer_step, pad_sequences, parse_args,
                    resolve, save_checkpoint, setup_dist, sync_weights, token_logps, wrap_model)
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
    n: int = field(default=4, metadata={"help": "responses sampled per prompt (alias --num_responses: torchrun reads "
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
    beta: float = field(default=0.1, metadata={"help": "DPO beta (eq. 3)", "gt": 0})
    grpo_alpha: float = field(default=0.0, metadata={"help": "weight of the token-level GRPO term (paper: 0.01, 0.001)",
                                                     "min": 0})
    kl_beta: float = field(default=0.001, metadata={"help": "weight of the k3 KL to the reference inside the GRPO term",
                                                    "min": 0})
    clip_eps: float = field(default=0.2, metadata={"help": "PPO clip of the GRPO term's importance ratio", "gt": 0})
    std_normalize: bool = field(default=True, metadata={"help": "GRPO term: divide advantages by the group's reward std"})
    sync: float = field(default=10, metadata={"help": "steps between generator syncs: 1 online, inf offline",
                                              "min": 1, "whole": True})
    ref_sync: bool = field(default=True, metadata={"help": "refresh the reference model with the generator"})
    nll_coef: float = field(default=0.0, metadata={"help": "weight of the length-normalised NLL on chosen responses", "min": 0})
    entropy_coef: float = field(default=0.0, metadata={"help": "weight of the entropy bonus on chosen responses", "min": 0})
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
    out: str = field(default="runs/group_dpo", metadata={"help": "run folder"})
    seed: int = field(default=0, metadata={"help": "seed for data order, task and sampling"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})


def group_labels(rewards):
    """Eq. 4's sets: correct (label 1) and incorrect (label 0). Math rewards are 0/1 already; reward-model
    scores are split at the group's mean (above 1, below 0, at it 0.5: in neither set). Returns the labels
    and the indices of the prompts that have both sets; the others are skipped this step."""
    means = [sum(r) / len(r) for r in rewards]
    labels = [[1.0 if x > m else 0.0 if x < m else 0.5 for x in r] for r, m in zip(rewards, means)]
    return labels, [i for i, l in enumerate(labels) if 1 in l and 0 in l]


def group_dpo_loss(policy_logps, ref_logps, rewards, beta):
    """GroupDPO (eq. 4) for one prompt: every correct response (reward 1) paired with every incorrect one (0).
    policy_logps, ref_logps: summed response log-probs [N]; rewards: [N]. Returns the DPO loss of each of the
    |Y_c| x |Y_r| pairs [P] (eq. 4 is their mean; P = 0 without both) and dpo_loss's diagnostics, with each
    pair's "chosen" and "rejected" response index [P]."""
    correct, incorrect = (rewards == 1).nonzero()[:, 0], (rewards == 0).nonzero()[:, 0]
    c, r = correct.repeat_interleave(len(incorrect)), incorrect.repeat(len(correct))  # all |Y_c| x |Y_r| pairs
    losses, diagnostics = dpo_loss(policy_logps[c], policy_logps[r], ref_logps[c], ref_logps[r], beta)
    return losses, diagnostics | {"chosen": c, "rejected": r}


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

    bar = tqdm(range(start, args.steps), disable=rank != 0, desc="group_dpo", initial=start, total=args.steps)
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

        # ---- 4. groups: the prompts with both a correct and an incorrect response ----
        labels, mixed = group_labels(rewards)

        # ---- 5. train: one optimizer step on all groups of the global batch ----
        t0 = time.time()
        model.train()
        adv = grpo_advantages(torch.tensor(rewards), args.std_normalize).tolist()  # the alpha GRPO term's
        seqs = [(i, s, labels[i][j], adv[i][j]) for i in mixed for j, s in enumerate(groups[i])]  # kept groups, in order
        micro = [seqs[k:k + args.micro_batch] for k in range(0, len(seqs), args.micro_batch)]
        # every rank runs the same number of forward/backward passes, so collectives stay in step; a rank
        # short of sequences runs a dummy one with weight 0
        n_micro = int(all_reduce({"n": max(1, len(micro))}, op="max")["n"])
        micro += [[(0, groups[0][0], 0.5, 0.0)]] * (n_micro - len(micro))
        padded = [pad_sequences([prompts[i] for i, *_ in mb], [s.token_ids for _, s, *_ in mb], tokenizer.pad_token_id,
                                device) for mb in micro]
        # (a) eq. 4 couples a group's responses but a micro-batch holds sequences (deviation 6): every summed
        # log-prob first, without a graph; then d L_GroupDPO / d log pi(y|x) of each response by autograd
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16 and not fsdp):
            policy_seq = torch.cat([token_logps(model, *p)[0].sum(-1) for p in padded])[:len(seqs)].requires_grad_()
            ref_logps = [token_logps(ref, *p)[0] for p in padded]
        ref_seq = torch.cat([r.sum(-1) for r in ref_logps])[:len(seqs)]
        label = torch.tensor([x[2] for x in seqs], device=device)  # 1 correct, 0 incorrect
        length = torch.tensor([len(s.token_ids) for _, s, *_ in seqs], dtype=torch.float32, device=device)
        sums, group_dpo, n = dict.fromkeys(("pairs", "margin", "acc", "chosen_length", "rejected_length"), 0.0), 0.0, args.n
        for k in range(len(mixed)):  # group k: sequences k*n .. (k+1)*n - 1
            g = slice(k * n, (k + 1) * n)
            losses, diag = group_dpo_loss(policy_seq[g], ref_seq[g], label[g], args.beta)
            group_dpo = group_dpo + losses.mean()  # eq. 4: the mean over the group's |Y_c| x |Y_r| pairs
            add_sums(sums, 1.0, pairs=len(losses), margin=diag["margin"].sum(), acc=diag["acc"].sum(),
                     chosen_length=length[g][diag["chosen"]].sum(), rejected_length=length[g][diag["rejected"]].sum())
        coef = (torch.autograd.grad(group_dpo, policy_seq)[0].tolist() if mixed else []) + [0.0] * n_micro * args.micro_batch
        correct = {i: max(1, labels[i].count(1.0)) for i in mixed}  # NLL / entropy terms: mean over a group's correct
        # (b) each micro-batch: coefficient x log pi(y|x) carries eq. 4's gradient, + alpha x GRPO and the extra terms
        for m, (mb, (input_ids, attn, cmask)) in enumerate(zip(micro, padded)):
            weight = 1.0 if m * args.micro_batch < len(seqs) else 0.0
            # around the forward too: DDP decides there whether this backward all-reduces the gradients
            with grad_sync(model, m == n_micro - 1), torch.autocast(device.type, torch.bfloat16, enabled=bf16 and not fsdp):
                logps, entropy = token_logps(model, input_ids, attn, cmask)
                with torch.no_grad():
                    gen_logps = torch.zeros_like(logps)
                    gen_logps[cmask] = torch.tensor([x for _, s, *_ in mb for x in s.logprobs], device=device)
                lengths = cmask.sum(-1).clamp(min=1)
                w_correct = torch.tensor([(lab == 1) / correct.get(i, 1) for i, _, lab, _ in mb], device=device)
                c = torch.tensor(coef[m * args.micro_batch:m * args.micro_batch + len(mb)], device=device)
                grpo = grpo_loss(logps, gen_logps, ref_logps[m], torch.tensor([x[3] for x in mb], device=device), cmask,
                                 args.kl_beta, args.clip_eps)[0].sum() / n  # per group: the mean over its n responses
                rest = args.grpo_alpha * grpo + (w_correct * (args.nll_coef * -logps.sum(-1) / lengths
                                                              - args.entropy_coef * entropy.sum(-1) / lengths)).sum()
                # normaliser: this rank's prompts, skipped ones included; DDP averages over ranks, so the
                # gradient is that of (sum of group losses) / (prompts in the global batch)
                loss = weight * ((c * logps.sum(-1)).sum() + rest) / len(batch)
                loss.backward()
            with torch.no_grad():
                add_sums(sums, weight, loss=rest, tokens=cmask.sum(), entropy=entropy[cmask].sum(),
                         logp_gap=(logps - gen_logps)[cmask].sum(), kl=(logps - ref_logps[m])[cmask].sum())
        add_sums(sums, 1.0, loss=group_dpo)
        g = all_reduce(sums | task_sums(rows_n, flat) | {
            "prompts": len(batch), "rollouts": sum(map(len, rewards)), "reward": sum(map(sum, rewards)),
            "length": sum(len(s.token_ids) for grp in groups for s in grp), "reward_timeouts": timeouts})
        grad_norm, ok = optimizer_step(model, optimizer, scheduler, args.grad_clip, g["loss"])
        skipped, skipped_in_row = skipped + (not ok), 0 if ok else skipped_in_row + 1
        row["time_train"] = time.time() - t0

        # ---- log and checkpoint ----
        npairs, ntok = max(g["pairs"], 1), max(g["tokens"], 1)
        row |= {"reward": g["reward"] / g["rollouts"], "length": g["length"] / g["rollouts"], "loss": g["loss"] / g["prompts"],
                "pairs": int(g["pairs"]), "entropy": g["entropy"] / ntok, "logp_gap": g["logp_gap"] / ntok,
                "kl": g["kl"] / ntok, "margin": g["margin"] / npairs, "pair_acc": g["acc"] / npairs,
                "chosen_length": g["chosen_length"] / npairs, "rejected_length": g["rejected_length"] / npairs,
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
