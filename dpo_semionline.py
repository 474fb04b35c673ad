"""Semi-online DPO: the generator is synced with the trained model every `--sync s` optimizer steps.

Paper: "Bridging Offline and Online Reinforcement Learning for LLMs" (arXiv 2506.21495), section 2,
DPO loss eq. 3. s = 1 is online DPO, s = 5..100 semi-online, `--sync inf` offline on the fly
(responses always come from the seed model).

Each step: (1) every s steps copy the trainer's weights into the generator (and, with --ref_sync,
into the reference model); (2) sample n responses per prompt; (3) score them (Math-Verify, or
--reward_model); (4) pair a random correct response with a random incorrect one; (5) one AdamW step.

Deliberate deviations from the paper and the authors' code:
  1. Defaults are sized for the embedded default (Gemma-3-270M on arithmetic, on a CPU): a larger
     learning rate and grad clip, short responses, few prompts per step. The README's paper-scale
     command passes the paper's values.
  2. Validation (n=1, T=0.6, top-p 0.9) always measures the current policy: when it falls between
     two syncs, the generator is given the current weights for it and then its stale ones back.
  3. Resuming syncs the generator (and, with --ref_sync, the reference) at the resumed step, so the
     staleness window restarts there; with --sync inf both stay the seed model.

  python dpo_semionline.py                                         # embedded default, CPU ok
  torchrun --nproc_per_node 8 dpo_semionline.py --sync 10 --model meta-llama/Llama-3.1-8B ...
"""

import math
import random
import time
from dataclasses import dataclass

import torch

from common import (add_sums, all_reduce, copy_weights, dpo_loss,
                    generator_logps, grad_sync, load_models, micro_batches,
                    optimizer_step, progress, sequence_logps, start_run,
                    sync_weights, token_sums)  # fmt: skip
from data import load_task, rollout_steps, step_batch
from eval import end_run, load_reward_model, rollout, validate
from flags import RunArgs, end_step, flag, parse_args, save_checkpoint


@dataclass
class Args:
    # Algorithm specific arguments (section 2; the appendix table's values in the README)
    beta: float = flag(0.1, "DPO beta (eq. 3)", gt=0)
    sync: float = flag(10, "s: steps between syncs (1 online, inf offline)", min=1, whole=True)
    ref_sync: bool = flag(True, "refresh the reference model with the generator")
    # --num_responses: torchrun takes a bare --n for its own --nnodes
    n: int = flag(4, "responses sampled per prompt", min=2, aliases=["--num_responses"])
    nll_coef: float = flag(0.0, "weight of the length-normalised NLL of chosen responses", min=0)
    entropy_coef: float = flag(0.0, "weight of the entropy bonus on chosen responses", min=0)
    micro_batch: int = flag(16, "sequences per forward/backward; a pair is 2", min=2)


# the logged metrics: each one's sum over the global batch, divided by the count it is listed under
# (None: the sum itself); the README's glossary says what each one measures
MEANS = {
    "rollouts": ["reward", "length"],
    "n_math": ["reward_math"],
    "n_rm": ["reward_rm"],
    "prompts": ["loss"],
    "tokens": ["entropy", "logp_gap", "kl"],
    "pairs": ["margin", "pair_acc", "chosen_length", "rejected_length"],
    None: ["pairs", "reward_timeouts"],
}


def make_pairs(groups, rewards, rng):
    """Paper section 2: chosen is a random highest-reward response, rejected a random lowest-reward
    one (with 0/1 rewards: a random correct vs a random incorrect one). A prompt whose rewards are
    all equal is skipped. Returns (prompt index, chosen Sample, rejected Sample) triples."""
    pairs = []
    for i, (samples, r) in enumerate(zip(groups, rewards)):
        if max(r) > min(r):
            chosen = rng.choice([s for s, x in zip(samples, r) if x == max(r)])
            rejected = rng.choice([s for s, x in zip(samples, r) if x == min(r)])
            pairs.append((i, chosen, rejected))
    return pairs


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

        # ---- 4. pairs: a random correct response against a random incorrect one ----
        pairs = make_pairs(groups, rewards, random.Random(f"{args.seed}-{step}-{run.rank}"))

        # ---- 5. train: one optimizer step on the pairs of the global batch ----
        t0 = time.time()
        run.model.train()
        dummy = (0, groups[0][0], groups[0][0])  # a rank short of pairs trains on it, weight 0
        for pairs_mb, weight, last in micro_batches(pairs, args.micro_batch // 2, dummy):
            mb_prompts = [prompts[i] for i, _, _ in pairs_mb] * 2
            responses = [c for _, c, _ in pairs_mb] + [r for _, _, r in pairs_mb]  # chosen first
            # around the forward too: DDP decides there whether this backward all-reduces
            with grad_sync(run.model, last):
                logps, entropy, completion_mask = sequence_logps(
                    run, run.model, mb_prompts, responses
                )
                with torch.no_grad():
                    ref_logps, _, _ = sequence_logps(run, run.ref, mb_prompts, responses)
                policy_chosen_logps, policy_rejected_logps = logps.sum(-1).chunk(2)  # (B,) each
                ref_chosen_logps, ref_rejected_logps = ref_logps.sum(-1).chunk(2)
                losses, diagnostics = dpo_loss(  # eq. 3
                    policy_chosen_logps,
                    policy_rejected_logps,
                    ref_chosen_logps,
                    ref_rejected_logps,
                    args.beta,
                )
                chosen_lengths, rejected_lengths = completion_mask.sum(-1).chunk(2)
                chosen_tokens = chosen_lengths.clamp(min=1)
                chosen_entropy = entropy.sum(-1).chunk(2)[0] / chosen_tokens
                # the ablations (section 2): the chosen response's NLL (length-normalised), entropy
                losses = losses + args.nll_coef * (-policy_chosen_logps / chosen_tokens)
                losses = losses - args.entropy_coef * chosen_entropy
                # normaliser: this rank's prompts, skipped ones included; DDP averages over ranks,
                # so the gradient is that of (sum of pair losses) / (prompts in the global batch)
                loss = weight * losses.sum() / len(prompts)
                loss.backward()
            gen_logps = generator_logps(responses, completion_mask)
            token = token_sums(logps, ref_logps, gen_logps, entropy, completion_mask)
            pair = {k: v.sum() for k, v in diagnostics.items()}  # margin, pair_acc
            add_sums(sums, weight, loss=losses.sum(), pairs=len(pairs_mb), **token, **pair)
            add_sums(sums, weight, chosen_length=chosen_lengths.sum())
            add_sums(sums, weight, rejected_length=rejected_lengths.sum())

        # ---- end of step (TRY NOT TO MODIFY): sums over ranks, AdamW, log, checkpoint ----
        totals = all_reduce(sums)
        metrics |= optimizer_step(run, args.grad_clip, totals)  # skipped if not finite
        metrics["time_train"] = time.time() - t0
        end_step(run, metrics, totals, MEANS)  # three skipped updates in a row stop the run
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(run, step + 1)

    # ---- after training: validate the final policy, save ----
    end_run(run, val_rows, args.steps)


if __name__ == "__main__":
    main()
