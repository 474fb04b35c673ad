"""GroupDPO: every correct response of a prompt paired with every incorrect one; + alpha GRPO.

Paper: "Bridging Offline and Online Reinforcement Learning for LLMs" (arXiv 2506.21495): GroupDPO
(eq. 4, on the DPO loss of eq. 3) and the combined loss L_GroupDPO + alpha L_GRPO (alpha 0.01,
0.001). The generator is synced every `--sync s` steps as in dpo_semionline.py (1 online, inf
offline).

Each step: (1) every s steps copy the trainer's weights into the generator (and, with --ref_sync,
into the reference model); (2) sample n responses per prompt; (3) score them (Math-Verify, or
--reward_model); (4) keep the prompts with both a correct and an incorrect response; (5) one AdamW
step on the GroupDPO loss of each kept prompt (+ alpha x its GRPO loss), divided by all prompts.

Deliberate deviations from the paper and the authors' code:
  1. Defaults are sized for the embedded default (Gemma-3-270M on arithmetic, on a CPU): a larger
     learning rate and grad clip, short responses, few prompts per step. The README's paper-scale
     command passes the paper's values.
  2. Validation (n=1, T=0.6, top-p 0.9) always measures the current policy: when it falls between
     two syncs, the generator is given the current weights for it and then its stale ones back.
  3. Resuming syncs the generator (and, with --ref_sync, the reference) at the resumed step, so the
     staleness window restarts there; with --sync inf both stay the seed model.
  4. The alpha GRPO term is grpo.py's token-level loss (the authors' unmerged code applied sequence
     log-probs against a token mask, weighting each response by its length), on the kept prompts
     only: on the others every advantage is 0 and only alpha x a small KL term would remain.
  5. The optional NLL and entropy terms are averaged over the prompt's correct responses.
  6. --micro_batch counts sequences, so a group may span micro-batches: a first pass computes every
     response's summed log-prob without a graph and eq. 4's derivative with respect to each; the
     second backpropagates that coefficient x log pi(y|x), micro-batch by micro-batch. The same
     gradient, at the cost of one more forward pass.

  python group_dpo.py                                              # embedded default, CPU ok
  torchrun --nproc_per_node 8 group_dpo.py --sync 10 --grpo_alpha 0.01 --model ...
"""

import math
import time
from dataclasses import dataclass

import torch

from common import (add_sums, all_reduce, copy_weights, dpo_loss,
                    generator_logps, grad_sync, grpo_advantages, grpo_loss,
                    load_models, micro_batches, optimizer_step, progress,
                    sequence_logps, start_run, sync_weights,
                    token_sums)  # fmt: skip
from data import load_task, rollout_steps, step_batch
from eval import end_run, load_reward_model, rollout, validate
from flags import RunArgs, end_step, flag, parse_args, save_checkpoint


@dataclass
class Args:
    # Algorithm specific arguments (eq. 4; the appendix table's values in the README)
    beta: float = flag(0.1, "DPO beta (eq. 3)", gt=0)
    sync: float = flag(10, "s: steps between syncs (1 online, inf offline)", min=1, whole=True)
    ref_sync: bool = flag(True, "refresh the reference model with the generator")
    # --num_responses: torchrun takes a bare --n for its own --nnodes
    n: int = flag(4, "responses sampled per prompt", min=2, aliases=["--num_responses"])
    grpo_alpha: float = flag(0.0, "weight of the token-level GRPO term (paper: 0.01, 0.001)", min=0)
    kl_beta: float = flag(0.001, "weight of the k3 KL to the reference in the GRPO term", min=0)
    clip_eps: float = flag(0.2, "PPO clip of the GRPO term's importance ratio", gt=0)
    std_normalize: bool = flag(True, "GRPO term: divide advantages by the group's reward std")
    nll_coef: float = flag(0.0, "weight of the length-normalised NLL of correct responses", min=0)
    entropy_coef: float = flag(0.0, "weight of the entropy bonus on correct responses", min=0)


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


def group_labels(rewards):
    """Eq. 4's sets: correct (label 1) and incorrect (label 0). Math rewards are 0/1 already;
    reward-model scores are split at the group's mean (above 1, below 0, at it 0.5: in neither set).
    Returns the labels and the indices of the prompts with both sets; the others are skipped."""
    means = [sum(r) / len(r) for r in rewards]
    labels = [[1.0 if x > m else 0.0 if x < m else 0.5 for x in r] for r, m in zip(rewards, means)]
    return labels, [i for i, group in enumerate(labels) if 1 in group and 0 in group]


def group_dpo_loss(policy_logps, ref_logps, labels, beta):
    """GroupDPO (eq. 4) for one prompt: every correct response (label 1) paired with every incorrect
    one (0). policy_logps, ref_logps: summed response log-probs (N,); labels: (N,). Returns the DPO
    loss of each of the |Y_c| x |Y_r| pairs (P,) (eq. 4 is their mean; P = 0 without both sets) and
    dpo_loss's diagnostics, with each pair's "chosen" and "rejected" response index (P,)."""
    correct = (labels == 1).nonzero()[:, 0]
    incorrect = (labels == 0).nonzero()[:, 0]
    chosen = correct.repeat_interleave(len(incorrect))  # all |Y_c| x |Y_r| pairs
    rejected = incorrect.repeat(len(correct))
    losses, diagnostics = dpo_loss(policy_logps[chosen], policy_logps[rejected], ref_logps[chosen],
                                   ref_logps[rejected], beta)  # fmt: skip
    return losses, diagnostics | {"chosen": chosen, "rejected": rejected}


def group_dpo_coefficients(policy_logps, ref_logps, kept, n, beta, sums):
    """Pass (a) of deviation 6: eq. 4 summed over the kept groups (n consecutive responses each),
    and its derivative with respect to each response's summed log-prob: the coefficient that carries
    eq. 4's gradient in pass (b). policy_logps, ref_logps: lists of the micro-batches' (B,), the S
    kept responses' then any dummies' (no list entry if no rank has a group); kept: (prompt index,
    Sample, label, advantage) of each. Adds the pairs' sums to `sums` (on every rank). Returns the
    summed loss and the coefficients (S,)."""
    policy_logps, ref_logps = (torch.cat(x or [torch.zeros(0)]) for x in (policy_logps, ref_logps))
    policy_logps = policy_logps[: len(kept)].detach().requires_grad_()
    labels = torch.tensor([x[2] for x in kept], device=policy_logps.device)  # 1: correct
    lengths = torch.tensor([len(x[1].token_ids) for x in kept], device=policy_logps.device).float()
    add_sums(sums, 0.0, pairs=0, margin=0, pair_acc=0, chosen_length=0, rejected_length=0)
    loss = 0.0
    for k in range(len(kept) // n):  # group k: responses k*n .. (k+1)*n - 1
        g = slice(k * n, (k + 1) * n)
        losses, diagnostics = group_dpo_loss(policy_logps[g], ref_logps[g], labels[g], beta)
        loss = loss + losses.mean()  # eq. 4: the mean over the group's |Y_c| x |Y_r| pairs
        pair = {name: diagnostics[name].sum() for name in ("margin", "pair_acc")}
        add_sums(sums, 1.0, pairs=len(losses), **pair)
        add_sums(sums, 1.0, chosen_length=lengths[g][diagnostics["chosen"]].sum())
        add_sums(sums, 1.0, rejected_length=lengths[g][diagnostics["rejected"]].sum())
    if not kept:
        return loss, policy_logps.detach()
    return loss, torch.autograd.grad(loss, policy_logps)[0]


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

        # ---- 4. groups: the prompts with both a correct and an incorrect response ----
        labels, mixed = group_labels(rewards)
        advantages = grpo_advantages(torch.tensor(rewards), args.std_normalize).tolist()
        kept = []  # the kept groups' responses, in order: (prompt index, Sample, label, advantage)
        for i in mixed:
            kept += zip([i] * args.n, groups[i], labels[i], advantages[i])

        # ---- 5. train: one optimizer step on the groups of the global batch ----
        t0 = time.time()
        run.model.train()
        dummy = (0, groups[0][0], 0.5, 0.0)  # a rank short of responses trains on it, weight 0
        micro = micro_batches(kept, args.micro_batch, dummy)
        inputs = [([prompts[i] for i, *_ in mb], [s for _, s, *_ in mb]) for mb, _, _ in micro]
        # (a) deviation 6: each response's summed log-prob without a graph, then eq. 4's gradient
        with torch.no_grad():
            policy_seq = [sequence_logps(run, run.model, *x)[0].sum(-1) for x in inputs]
            ref_logps = [sequence_logps(run, run.ref, *x)[0] for x in inputs]
        ref_seq = [r.sum(-1) for r in ref_logps]
        group_dpo, coef = group_dpo_coefficients(policy_seq, ref_seq, kept, args.n, args.beta, sums)
        coef = torch.cat([coef, coef.new_zeros(len(micro) * args.micro_batch)])  # the dummies': 0
        correct = {i: max(1, labels[i].count(1.0)) for i in mixed}  # NLL, entropy: their mean
        # (b) each micro-batch: coefficient x log pi(y|x) carries eq. 4's gradient; + alpha GRPO
        for m, (mb, weight, last) in enumerate(micro):
            # around the forward too: DDP decides there whether this backward all-reduces
            with grad_sync(run.model, last):
                logps, entropy, completion_mask = sequence_logps(run, run.model, *inputs[m])
                gen_logps = generator_logps(inputs[m][1], completion_mask)
                c = coef[m * args.micro_batch : m * args.micro_batch + len(mb)]
                mb_advantages = torch.tensor([a for *_, a in mb], device=run.device)
                old_logps = logps.detach() if args.sync == 1 else gen_logps  # as grpo.py's
                grpo = grpo_loss(logps, old_logps, ref_logps[m], mb_advantages, completion_mask,
                                 args.kl_beta, args.clip_eps)[0].sum() / args.n  # fmt: skip
                w = [(x == 1) / correct.get(i, 1) for i, _, x, _ in mb]  # correct ones: deviation 5
                w = torch.tensor(w, device=run.device)
                tokens = completion_mask.sum(-1).clamp(min=1)
                nll = -logps.sum(-1) / tokens
                mean_entropy = entropy.sum(-1) / tokens
                ablations = args.nll_coef * nll - args.entropy_coef * mean_entropy
                rest = args.grpo_alpha * grpo + (w * ablations).sum()
                # normaliser: this rank's prompts, skipped ones included; DDP averages over ranks,
                # so the gradient is that of (sum of group losses) / (prompts in the global batch)
                loss = weight * ((c * logps.sum(-1)).sum() + rest) / len(prompts)
                loss.backward()
            token = token_sums(logps, ref_logps[m], gen_logps, entropy, completion_mask)
            add_sums(sums, weight, loss=rest, **token)
        add_sums(sums, 1.0, loss=group_dpo)

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
