"""Evaluation: sample each problem, score with the training reward, report accuracy +- standard error.

Paper section 6: temperature 0.6, top-p 0.9; the paper's benchmark numbers use 50 samples per problem,
validation during training 1. `evaluate` is the one function the training scripts validate with.
"""
import math

import torch.distributed as dist

from common import build_prompt, generate, score_responses


def evaluate(sampler, tokenizer, rows, samples=1, temperature=0.6, top_p=0.9, max_new_tokens=1024, seed=0, rm=None):
    """Mean reward over problems x samples, its standard error over problems, mean response length. Rows with
    an `answer` are scored by Math-Verify, the others by the reward model `rm` (common.score_responses).
    Under torchrun each rank takes every world-th problem; every rank gets the global result."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    mine = rows[rank::world]
    groups = generate(sampler, [build_prompt(tokenizer, r) for r in mine], samples, temperature, top_p,
                      max_new_tokens, seed=seed)
    flat = score_responses([r for r in mine for _ in range(samples)], [s.text for g in groups for s in g], rm)
    per_problem = [(sum(flat[i * samples:(i + 1) * samples]) / samples, sum(len(s.token_ids) for s in g) / samples)
                   for i, g in enumerate(groups)]
    generations = [{"problem": r["problem"], "answer": r.get("answer"), "responses": [s.text for s in g],
                    "rewards": flat[i * samples:(i + 1) * samples]} for i, (r, g) in enumerate(zip(mine, groups))]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, per_problem)
        per_problem = [x for part in gathered for x in part]
    acc = [a for a, _ in per_problem]
    mean = sum(acc) / len(acc)
    se = math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1) / len(acc)) if len(acc) > 1 else 0.0
    return {"reward": mean, "reward_se": se, "length": sum(l for _, l in per_problem) / len(per_problem),
            "problems": len(acc), "generations": generations}
