"""GRPO: group-relative advantages, a token-level clipped surrogate, a k3 KL to a fixed reference.

Paper: "Bridging Offline and Online Reinforcement Learning for LLMs" (arXiv 2506.21495), its GRPO
baseline (section 3), run online (s = 1) as in the paper; `--sync s` > 1 gives semi-online GRPO,
which the paper names as future work. N = 8 responses per prompt, KL coefficient 0.001.

Each step: (1) every s steps copy the trainer's weights into the generator (and, with --ref_sync,
into the reference model); (2) sample n responses per prompt; (3) score them (Math-Verify, or
--reward_model); (4) advantages (r - mean) / (std + 1e-6) over each prompt's group; (5) one AdamW
step on the token-level loss, summed over each response and averaged over all responses.

Deliberate deviations from the paper and the authors' code:
  1. Defaults are sized for the embedded default (Gemma-3-270M on arithmetic, on a CPU): a larger
     learning rate and grad clip, short responses, few prompts per step. The README's paper-scale
     command passes the paper's values.
  2. Validation (n=1, T=0.6, top-p 0.9) always measures the current policy: when it falls between
     two syncs, the generator is given the current weights for it and then its stale ones back.
  3. Resuming syncs the generator (and, with --ref_sync, the reference) at the resumed step, so the
     staleness window restarts there; with --sync inf both stay the seed model.
  4. The importance ratio's denominator: at s = 1 the trainer's own detached log-prob, so the ratio
     is exactly 1 and the gradient is the paper's REINFORCE-like one (the authors' code), whatever
     the generator's numerics; at s > 1 the generator's log-prob of each sampled token, clipped
     PPO-style at 1 +- --clip_eps, which corrects for the staleness. logp_gap always measures the
     trainer against the generator.
  5. The entropy bonus (--entropy_coef, default 0) is the mean next-token entropy of each
     response, averaged over all responses, as the DPO scripts' bonus is over chosen responses.

  python grpo.py                                                   # embedded default, CPU ok
  torchrun --nproc_per_node 8 grpo.py --model meta-llama/Llama-3.1-8B-Instruct --num_responses 8 ...
"""

import math
import time
from dataclasses import dataclass

import torch

from common import (add_sums, all_reduce, copy_weights, generator_logps,
                    grad_sync, grpo_advantages, grpo_loss, load_models,
                    micro_batches, optimizer_step, progress, sequence_logps,
                    start_run, sync_weights, token_sums)  # fmt: skip
from data import load_task, rollout_steps, step_batch
from eval import end_run, load_reward_model, rollout, validate
from flags import RunArgs, end_step, flag, parse_args, save_checkpoint


@dataclass
class Args:
    # Algorithm specific arguments (section 3; the appendix table's values in the README)
    kl_beta: float = flag(0.001, "weight of the k3 KL to the reference, per token", min=0)
    clip_eps: float = flag(0.2, "PPO clip of the importance ratio to the generator", gt=0)
    std_normalize: bool = flag(True, "divide the advantages by the group's reward std")
    sync: float = flag(1, "s: steps between generator syncs (paper: 1, online)", min=1, whole=True)
    ref_sync: bool = flag(False, "refresh the reference model with the generator")
    # --num_responses: torchrun takes a bare --n for its own --nnodes
    n: int = flag(8, "responses sampled per prompt (the group)", min=2, aliases=["--num_responses"])
    entropy_coef: float = flag(0.0, "weight of the entropy bonus on all responses", min=0)


# the logged metrics: each one's sum over the global batch, divided by the count it is listed under
# (None: the sum itself); the README's glossary says what each one measures
MEANS = {
    "rollouts": ["reward", "length", "loss"],
    "n_math": ["reward_math"],
    "n_rm": ["reward_rm"],
    "prompts": ["frac_zero_std"],
    "tokens": ["entropy", "logp_gap", "kl", "clip_frac"],
    None: ["reward_timeouts"],
}


def main():
    args = parse_args(Args, RunArgs)
    # ---- setup (TRY NOT TO MODIFY): torchrun and the run folder; the task; the models ----
    run = start_run(args)
    tokenizer, train_rows, val_rows = load_task(args)  # a bad row stops here, before any model
    keep = args.val_every % args.sync != 0  # a validation can fall between two syncs: deviation 2
    load_models(run, args, tokenizer, train_rows, keep)  # policy, ref, generator
    run.rm = load_reward_model(args.reward_model, run.device, args.trust_remote_code)

    ahead = {}  # rollouts sampled ahead of their step (rollout_steps), by step
    share = (args.prompts_per_step, args.seed, run.rank, run.world)  # this rank's share of a batch
    for step in progress(run, args.steps):
        # ---- 1. sync the generator (and the reference) every s steps; deviation 3 on resuming ----
        synced = step % args.sync == 0 or (step == run.start and math.isfinite(args.sync))
        metrics = {"step": step, "synced": int(synced), "time_sync": 0.0}
        if synced:
            metrics["time_sync"] = sync_weights(run.sampler, run.model)
            if args.ref_sync:
                copy_weights(run.ref, run.model)

        # ---- validate the current policy (deviation 2) ----
        if step == 0 or (args.val_every and step % args.val_every == 0):
            metrics |= validate(run, val_rows, current=synced)

        # ---- 2-3. generate n responses for each of this rank's prompts, score them: at a sync,
        # for every step until the next one, in one call (the generator is the same until then) ----
        if step not in ahead:
            steps = rollout_steps(step, args.sync, args.steps)
            batches = [step_batch(len(train_rows), t, *share) for t in steps]
            ahead = dict(zip(steps, rollout(run, train_rows, batches, args.n, step, metrics)))
        prompts, groups, rewards, sums = ahead.pop(step)  # sums: all-reduced, divided as in MEANS

        # ---- 4. advantages: each response's reward against its prompt's group (section 3) ----
        advantages = grpo_advantages(torch.tensor(rewards), args.std_normalize)  # (prompts, n)
        rollouts = []
        for i, (group, group_advantages) in enumerate(zip(groups, advantages.tolist())):
            rollouts += [(i, sample, a) for sample, a in zip(group, group_advantages)]
        add_sums(sums, 1.0, adv=advantages.sum(), adv_sq=advantages.square().sum())
        add_sums(sums, 1.0, frac_zero_std=sum(max(r) == min(r) for r in rewards))

        # ---- 5. train: one optimizer step on all responses of the global batch ----
        t0 = time.time()
        run.model.train()
        dummy = (0, groups[0][0], 0.0)  # a rank short of responses trains on it, weight 0
        for rollouts_mb, weight, last in micro_batches(rollouts, args.micro_batch, dummy):
            mb_prompts = [prompts[i] for i, _, _ in rollouts_mb]
            responses = [sample for _, sample, _ in rollouts_mb]
            # around the forward too: DDP decides there whether this backward all-reduces
            with grad_sync(run.model, last):
                logps, entropy, completion_mask = sequence_logps(
                    run, run.model, mb_prompts, responses
                )
                with torch.no_grad():
                    ref_logps, _, _ = sequence_logps(run, run.ref, mb_prompts, responses)
                gen_logps = generator_logps(responses, completion_mask)
                old_logps = logps.detach() if args.sync == 1 else gen_logps  # deviation 4
                mb_advantages = torch.tensor([a for _, _, a in rollouts_mb], device=run.device)
                losses, diagnostics = grpo_loss(
                    logps,
                    old_logps,
                    ref_logps,
                    mb_advantages,
                    completion_mask,
                    args.kl_beta,
                    args.clip_eps,
                )
                mean_entropy = entropy.sum(-1) / completion_mask.sum(-1).clamp(min=1)
                losses = losses - args.entropy_coef * mean_entropy  # deviation 5
                # normaliser: this rank's responses; DDP averages over ranks, so the gradient is
                # that of (sum of per-response losses) / (responses in the global batch)
                loss = weight * losses.sum() / len(rollouts)
                loss.backward()
            token = token_sums(logps, ref_logps, gen_logps, entropy, completion_mask)
            clip_frac = diagnostics["clipped"].sum()
            add_sums(sums, weight, loss=losses.sum(), clip_frac=clip_frac, **token)

        # ---- end of step (TRY NOT TO MODIFY): sums over ranks, AdamW, log, checkpoint ----
        totals = all_reduce(sums)
        metrics |= optimizer_step(run, args.grad_clip, totals)  # skipped if not finite
        metrics["time_train"] = time.time() - t0
        adv_mean = totals["adv"] / totals["rollouts"]
        metrics["adv_std"] = math.sqrt(max(totals["adv_sq"] / totals["rollouts"] - adv_mean**2, 0))
        end_step(run, metrics, totals, MEANS)  # three skipped updates in a row stop the run
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(run, step + 1)

    # ---- after training: validate the final policy, save ----
    end_run(run, val_rows, args.steps)


if __name__ == "__main__":
    main()
