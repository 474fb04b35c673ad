"""Offline DPO: pairs sampled once from the seed model, then DPO on that fixed dataset (s = inf).

Paper: "Bridging Offline and Online Reinforcement Learning for LLMs" (arXiv 2506.21495), section 2,
DPO loss eq. 3, offline regime: the generator is never synced, the same as generating the pairs
once beforehand, which this script does. The reference stays the seed model.

Phase 1 (pair_dataset): n responses of the seed model to every prompt the run will visit, scored
(Math-Verify, or --reward_model), a random correct one paired with a random incorrect one, in
<out>/pairs.jsonl. Phase 2, each step: the online scripts' prompts of the step and their pairs (a
prompt without one is skipped, and counted in the normaliser), one AdamW step. `--pairs F.jsonl`
skips phase 1: plain DPO on rows {prompt, chosen, rejected} (text, the prompt templated).

Deliberate deviations from the paper and the authors' code:
  1. Defaults are sized for the embedded default (Gemma-3-270M on arithmetic, on a CPU): a larger
     learning rate and grad clip, short responses, few prompts per step. The README's paper-scale
     command passes the paper's values.
  2. Validation (n=1, T=0.6, top-p 0.9) always measures the current policy: the generator, which
     phase 2 otherwise never uses, is given the current weights for it.
  3. Resuming reuses <out>/pairs.jsonl: phase 1 is not repeated.
  4. A prompt visited in two epochs gets the same pair both times (`dpo_semionline.py --sync inf`
     samples it afresh). Phase 1 is logged in the step-0 row (time_gen, time_reward, the reward).
  5. Pairs given as text are tokenized without special tokens and end with EOS; their generator
     log-probs are unknown and count as a logp_gap of 0.

  python dpo_offline.py                                            # embedded default, CPU ok
  python dpo_offline.py --pairs my_pairs.jsonl --model ...         # plain DPO on a pair dataset
  torchrun --nproc_per_node 8 dpo_offline.py --model meta-llama/Llama-3.1-8B-Instruct ...
"""

import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from common import (Sample, add_sums, all_gather, all_reduce, dpo_loss,
                    generator_logps, grad_sync, load_models, micro_batches,
                    optimizer_step, print0, progress, sequence_logps, start_run,
                    token_sums)  # fmt: skip
from data import build_prompt, load_task, read_jsonl, step_batch
from dpo_semionline import make_pairs  # section 2's pairs, as online
from eval import end_run, load_reward_model, rollout, validate
from flags import RunArgs, barrier, end_step, fail, flag, parse_args, save_checkpoint


@dataclass
class Args:
    # Algorithm specific arguments (section 2; the appendix table's values in the README)
    beta: float = flag(0.1, "DPO beta (eq. 3)", gt=0)
    pairs: str = flag("", "JSONL {prompt, chosen, rejected} (text) to train on; skips phase 1")
    # --num_responses: torchrun takes a bare --n for its own --nnodes
    n: int = flag(4, "phase 1: responses sampled per prompt", min=2, aliases=["--num_responses"])
    nll_coef: float = flag(0.0, "weight of the length-normalised NLL of chosen responses", min=0)
    entropy_coef: float = flag(0.0, "weight of the entropy bonus on chosen responses", min=0)
    micro_batch: int = flag(16, "sequences per forward/backward; a pair is 2", min=2)


# the logged metrics: each one's sum over the global batch, divided by the count it is listed under
# (None: the sum itself); the README's glossary says what each one measures. Phase 1's in step 0.
MEANS = {
    "rollouts": ["reward", "length"],
    "n_math": ["reward_math"],
    "n_rm": ["reward_rm"],
    "prompts": ["loss"],
    "tokens": ["entropy", "logp_gap", "kl"],
    "pairs": ["margin", "pair_acc", "chosen_length", "rejected_length"],
    None: ["pairs", "reward_timeouts"],
}


def read_pairs(path):
    """A pair file's rows; a bad line or a row without prompt, chosen, rejected text: its line."""
    if not os.path.isfile(path):
        fail(f"--pairs {path}: no such file")
    rows = []
    for i, x in read_jsonl(path):
        x["problem"] = x.get("prompt", x.get("problem"))
        if not all(isinstance(x.get(k), str) for k in ("problem", "chosen", "rejected")):
            fail(f"{path}:{i}: row needs 'prompt', 'chosen' and 'rejected' text")
        rows.append(x)
    if not rows:
        fail(f"{path}: no pairs (phase 1 found no prompt with a correct and an incorrect response)")
    return rows


def pair_dataset(run, args, train_rows):
    """Phase 1: the seed's n responses to every prompt the run will visit, scored and paired once,
    in <out>/pairs.jsonl (atomically; read back on resuming). Returns the pairs by prompt index (a
    --pairs file's rows are the prompts), how many prompts there are, phase 1's metrics and sums."""
    pairs_file = args.pairs or f"{args.out}/pairs.jsonl"
    metrics = {}
    sums = {}
    if not args.pairs and not (run.start and os.path.exists(pairs_file)):
        steps = range(args.steps)
        size = args.prompts_per_step
        visited = {i for t in steps for i in step_batch(len(train_rows), t, size, args.seed)}
        mine = sorted(visited)[run.rank :: run.world]
        rng = random.Random(f"{args.seed}-{run.rank}")
        rows = []
        for c in tqdm(range(0, len(mine), 256), "phase 1: sample the seed", disable=run.rank > 0):
            chunk = mine[c : c + 256]
            batch = [train_rows[i] for i in chunk]
            [(_, groups, rewards, part)] = rollout(run, train_rows, [chunk], args.n, c, metrics)
            add_sums(sums, 1.0, **part)
            for k, chosen, rejected in make_pairs(groups, rewards, rng):
                pair = {"index": chunk[k], "prompt": batch[k]["problem"]}
                pair["answer"] = batch[k].get("answer")
                for key, x in (("chosen", chosen), ("rejected", rejected)):
                    pair |= {key: x.text, f"{key}_token_ids": x.token_ids}
                    pair[f"{key}_logprobs"] = x.logprobs
                pair |= {"chosen_reward": max(rewards[k]), "rejected_reward": min(rewards[k])}
                rows.append(pair)
        gathered = all_gather(rows)
        if run.rank == 0:
            with open(pairs_file + ".tmp", "w") as f:
                f.writelines(json.dumps(x) + "\n" for part in gathered for x in part)
            os.replace(pairs_file + ".tmp", pairs_file)
            print0(f"phase 1: {len(visited)} prompts, {sum(map(len, gathered))} pairs")
        barrier()
    phase1 = (metrics, all_reduce(sums))
    data = read_pairs(pairs_file)
    if args.pairs:
        return dict(enumerate(data)), len(data), phase1
    return {x["index"]: x for x in data}, len(train_rows), phase1  # keyed by training row


def row_to_pair(row, tokenizer):
    """A pairs.jsonl row -> (chosen, rejected) Samples: phase 1's keep token ids and log-probs;
    text is tokenized, EOS appended, its log-probs unknown (NaN; deviation 5)."""

    def sample(key):
        if f"{key}_token_ids" in row:
            return Sample(row[f"{key}_token_ids"], row[key], row[f"{key}_logprobs"])
        ids = tokenizer(row[key], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return Sample(ids, row[key], [math.nan] * len(ids))

    return sample("chosen"), sample("rejected")


def main():
    args = parse_args(Args, RunArgs)
    if args.pairs:
        read_pairs(args.pairs)  # a bad pair file stops here, before any model
    # ---- setup (TRY NOT TO MODIFY): torchrun and the run folder; the task; the models ----
    run = start_run(args)
    tokenizer, train_rows, val_rows = load_task(args)  # a bad row stops here, before any model
    load_models(run, args, tokenizer, train_rows)  # policy, ref, generator
    run.rm = load_reward_model(args.reward_model, run.device, args.trust_remote_code)

    # ---- phase 1: n responses per prompt from the seed model, once, paired: <out>/pairs.jsonl ----
    by_index, num_prompts, phase1 = pair_dataset(run, args, train_rows)
    placeholder = next(iter(by_index.values()))  # for a prompt without a pair: never trained

    for step in progress(run, args.steps):
        metrics = {"step": step, "synced": 0, "time_sync": 0.0}

        # ---- validate the current policy (deviation 2) ----
        if step == 0 or (args.val_every and step % args.val_every == 0):
            metrics |= validate(run, val_rows, current=False)

        # ---- 2-4. the step's prompts and their pairs, from the fixed dataset: nothing sampled ----
        sums = {}  # this rank's sums by metric name, all-reduced and divided as MEANS says
        batch = step_batch(num_prompts, step, args.prompts_per_step, args.seed, run.rank, run.world)
        step_rows = [by_index.get(i, placeholder) for i in batch]
        prompts = [build_prompt(tokenizer, x) for x in step_rows]
        paired = [k for k, i in enumerate(batch) if i in by_index]  # the others are skipped
        pairs = [(k, *row_to_pair(step_rows[k], tokenizer)) for k in paired]
        add_sums(sums, 1.0, prompts=len(batch))

        # ---- 5. train: one optimizer step on the pairs of the global batch ----
        t0 = time.time()
        run.model.train()
        dummy = (0, *row_to_pair(step_rows[0], tokenizer))  # a rank short of pairs: weight 0
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
                loss = weight * losses.sum() / len(batch)
                loss.backward()
            gen_logps = generator_logps(responses, completion_mask)  # NaN if unknown: deviation 5
            token = token_sums(logps, ref_logps, gen_logps, entropy, completion_mask)
            pair = {k: v.sum() for k, v in diagnostics.items()}  # margin, pair_acc
            add_sums(sums, weight, loss=losses.sum(), pairs=len(pairs_mb), **token, **pair)
            add_sums(sums, weight, chosen_length=chosen_lengths.sum())
            add_sums(sums, weight, rejected_length=rejected_lengths.sum())

        # ---- end of step (TRY NOT TO MODIFY): sums over ranks, AdamW, log, checkpoint ----
        totals = all_reduce(sums)
        metrics |= optimizer_step(run, args.grad_clip, totals)  # skipped if not finite
        metrics["time_train"] = time.time() - t0
        if step == 0:  # phase 1's sampling and rewards, logged once (deviation 4)
            metrics |= phase1[0]
            totals = phase1[1] | totals
        end_step(run, metrics, totals, MEANS)  # three skipped updates in a row stop the run
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_checkpoint(run, step + 1)

    # ---- after training: validate the final policy, save ----
    end_run(run, val_rows, args.steps)


if __name__ == "__main__":
    main()
