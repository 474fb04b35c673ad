"""TRL's OnlineDPOTrainer / GRPOTrainer on the same work as this repo's dpo_semionline.py --sync 1
and grpo.py (embedded default: Gemma-3-270M, the arithmetic task, CPU), timed per optimizer step.

Matched: the repo's prompts (build_prompt's token ids, checked through TRL's own tokenization) in
the repo's batch order (step_batch, seed 0), Math-Verify rewards (eval.py's settings), fp32 on a
CPU, no gradient checkpointing, HF generate at T 1.0 / top-p 1.0 / no top-k, 40 new tokens, the
repo's stop tokens (EOS and the blank line), AdamW (fused, betas 0.9/0.95, eps 1e-4, wd 0.1), lr
3e-6 constant, grad clip 1.0, seed 0. online_dpo: 8 prompts x 2 completions per step (TRL samples
2), beta 0.1, sigmoid loss. grpo: 8 prompts x 4 completions per step, KL beta 0.001 (k3), clip
0.2, one step per generation batch, micro-batches of 8 sequences (the repo's --micro_batch).

  bench/.venv-trl/bin/python bench/trl_side.py --algo online_dpo --steps 2 --out dpo.json
  bench/.venv-trl/bin/python bench/trl_side.py --algo grpo --steps 2 --out grpo.json
"""

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, "/work/main")
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from latex2sympy2_extended import NormalizationConfig  # noqa: E402
from math_verify import LatexExtractionConfig, math_metric  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer  # noqa: E402

from data import arithmetic_task, build_prompt, load_tokenizer, step_batch, stop_token_ids  # noqa: E402

MODEL = os.path.expanduser("~/.cache/bridging-rl/gemma-3-270m")
PROMPTS_PER_STEP = 8

# ---- Reward: eval.py's Math-Verify worker, in-process ----
logging.getLogger("math_verify").setLevel(logging.CRITICAL)
gold_norm = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True,
                                boxed="none", equations=False)  # fmt: skip
verify = math_metric(
    gold_extraction_target=(LatexExtractionConfig(normalization_config=gold_norm),),
    pred_extraction_target=(LatexExtractionConfig(boxed_match_priority=0),),
    aggregation_function=max, precision=6)  # fmt: skip


def score(response, answer):
    try:
        gold = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
        return float(verify([gold], [response])[0])
    except BaseException:  # unparseable or timed out: reward 0, as in eval.py
        return 0.0


STATS = {"lengths": [], "stopped": 0, "samples": [], "rewards": []}


def make_reward(stops):
    def math_reward(completions, answer, completion_ids, **kwargs):
        """1.0 if Math-Verify finds the completion's final answer equal to `answer`; also records
        each completion's length in tokens (up to and including its first stop token)."""
        for ids, text in zip(completion_ids, completions):
            stop = next((i for i, t in enumerate(ids) if t in stops), None)
            STATS["lengths"].append(len(ids) if stop is None else stop + 1)
            STATS["stopped"] += stop is not None
            if len(STATS["samples"]) < 3:
                STATS["samples"].append(text)
        rewards = [score(c, a) for c, a in zip(completions, answer)]
        STATS["rewards"] += rewards
        return rewards

    return math_reward


class StepTimer(TrainerCallback):
    """Wall-clock seconds of each optimizer step: generation, rewards, forward/backward, AdamW."""

    def __init__(self):
        self.seconds, self.t0 = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.t0)
        print(f"step {state.global_step}: {self.seconds[-1]:.1f} s", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--algo", choices=["online_dpo", "grpo"], required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    tokenizer = load_tokenizer(MODEL)
    train_rows, _ = arithmetic_task(0)
    stops = stop_token_ids(tokenizer)  # [EOS, "\n\n"]
    # the repo's batches in its order; TRL then reads the rows sequentially
    order = [
        i for s in range(args.steps) for i in step_batch(len(train_rows), s, PROMPTS_PER_STEP, 0)
    ]
    rows = [train_rows[i] for i in order]
    # build_prompt prepends <bos>; neither trainer's tokenizer call adds it (Gemma's tokenizer from
    # GGUF adds no special tokens), so the text keeps "<bos>", which tokenizes back to the BOS id
    prompt_ids = [build_prompt(tokenizer, r) for r in rows]
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompt_ids]
    dataset = Dataset.from_list([{"prompt": t, "answer": r["answer"]} for t, r in zip(texts, rows)])

    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)  # saved as bf16
    model.generation_config.eos_token_id = stops  # both trainers take their EOS ids from here
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="trl_side_"), max_steps=args.steps, seed=0,
        use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
        learning_rate=3e-6, lr_scheduler_type="constant", warmup_steps=0,
        optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-4,
        weight_decay=0.1, max_grad_norm=1.0, use_vllm=False,
        temperature=1.0, top_p=1.0, top_k=0,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none",
        dataloader_num_workers=0,
    )  # fmt: skip
    timer = StepTimer()
    reward = make_reward(stops)
    if args.algo == "online_dpo":
        config = OnlineDPOConfig(
            # 2 micro-batches of 4 prompts = 8 sequences per forward (the repo's --micro_batch 8;
            # 16 at once ran out of memory). OnlineDPOTrainer does not divide the loss by the
            # accumulation steps: the gradient is 2x the mean's, the same after clipping at norm 1
            **common, per_device_train_batch_size=4, gradient_accumulation_steps=2,
            max_new_tokens=40, beta=[0.1], loss_type="sigmoid",
            train_sampling_strategy="sequential",
        )  # fmt: skip
        trainer = OnlineDPOTrainer(model=model, reward_funcs=reward, args=config,
                                   train_dataset=dataset, processing_class=tokenizer,
                                   callbacks=[timer])  # fmt: skip
        # OnlineDPOTrainer._generate: processing_class(text=..., add_special_tokens=False)
        trl_ids = trainer.processing_class(text=texts[:4], add_special_tokens=False)["input_ids"]
    else:
        n = 4
        # loss_type "luspo" with token-level ratios is (per_token_loss * mask).sum(-1).mean() / grad
        # accumulation: summed over each sequence's tokens, averaged over sequences, exactly the
        # repo's grpo_loss normaliser ("grpo" divides each sequence by its length; "dr_grpo" is the
        # same up to a constant 1/max_completion_length; "dapo"/"bnpo" divide by the token count)
        config = GRPOConfig(
            **common, per_device_train_batch_size=8, gradient_accumulation_steps=n,
            steps_per_generation=n, num_generations=n, num_iterations=1,
            max_completion_length=40, beta=0.001, epsilon=0.2, loss_type="luspo",
            importance_sampling_level="token", scale_rewards="group", shuffle_dataset=False,
        )  # fmt: skip
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config,
                              train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[timer])  # fmt: skip
        trl_ids = trainer._tokenize_prompts(texts[:4])[0]
    match = [list(a) for a in trl_ids] == prompt_ids[:4]
    print(f"TRL's prompt ids equal build_prompt's (first 4 rows): {match}", flush=True)

    trainer.train()

    lengths = STATS["lengths"]
    result = {
        "algo": args.algo,
        "steps": args.steps,
        "step_seconds": [round(s, 2) for s in timer.seconds],
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
        "mean_completion_tokens": round(sum(lengths) / max(len(lengths), 1), 2),
        "stopped_fraction": round(STATS["stopped"] / max(len(lengths), 1), 3),
        "completions": len(lengths),
        "mean_reward": round(sum(STATS["rewards"]) / max(len(lengths), 1), 3),
        "prompt_ids_match": match,
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "sample_completions": STATS["samples"],
        "notes": NOTES[args.algo],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


NOTES = {
    "online_dpo": "TRL OnlineDPOTrainer (trl.experimental): always 2 completions per prompt and "
    "all 8 pairs trained, (better, worse) by reward, a tie keeps the first as chosen "
    "(dpo_semionline.py pairs a correct with an incorrect response and drops prompts without "
    "both); generated and trained in 2 micro-batches of 4 prompts (8 sequences), the loss not "
    "divided by the 2 accumulation steps; reference logps in the train step; HF generate, not "
    "vLLM. {common}",
    "grpo": "TRL GRPOTrainer, loss_type luspo at token level (= the repo's sum-over-tokens, "
    "mean-over-sequences loss); advantages (r - mean) / (std + 1e-4) (the repo: + 1e-6); "
    "reference logps computed after generation, in chunks of 8; 4 micro-batches of 8 sequences; "
    "HF generate, not vLLM. {common}",
}
COMMON_NOTE = ("TRL's AdamW skips weight decay on norm/bias weights (the repo decays all); lr "
               "constant (the repo: warmup and cosine).")  # fmt: skip
NOTES = {k: v.format(common=COMMON_NOTE) for k, v in NOTES.items()}

if __name__ == "__main__":
    main()
