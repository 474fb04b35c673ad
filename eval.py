"""Evaluation: sample each problem, score with the training reward, report accuracy +- standard error.

Paper section 6: temperature 0.6, top-p 0.9; the paper's benchmark numbers use 50 samples per problem,
validation during training 1. `evaluate` is the one function the training scripts validate with; the
command line below runs it on benchmarks, selects a run's checkpoint, and writes AlpacaEval submissions.

  python eval.py --model runs/dpo_semionline/step_000030 --benchmarks math500,amc23 --samples 50
  python eval.py --benchmarks math500=my_copy.jsonl --data_dir ~/data --limit 20 --samples 4   # quick look
  python eval.py --select runs/dpo_semionline          # best checkpoint by val reward / val length (section 6)
  python eval.py --model ... --benchmarks alpaca_eval --reward_model Nexusflow/Athene-RM-8B
  torchrun --nproc_per_node 8 eval.py --model ... --benchmarks math500,amc23,numina_test   # problems split over ranks

Benchmarks are read from `--data_dir/<file>` when the file is there (JSONL, `{"problem", "answer"}`), else from
the dataset hub (needs `pip install datasets` and hub access); `name=path.jsonl` gives a file explicitly.

Deliberate deviations from the paper:
  1. AlpacaEval: the paper reports AlpacaEval 2.0 with GPT-4 judges. Here a reward model judges each output
     against the dataset's reference output, and the length-controlled win rate is a two-parameter logistic
     fit (intercept + length difference in characters), not AlpacaEval's GLM (which adds a tanh and
     per-instruction terms). The numbers are a cheap proxy; the submission file written alongside is what
     the real AlpacaEval takes (`alpaca_eval --model_outputs <out>/alpaca_eval_model_outputs.json`).
  2. NuminaMath test split: the paper gives the sources it drops and the sizes, not its proof / multiple-choice
     rules or its shuffle; ours are in `numina_splits`, so our 1,980 test problems are not the paper's.
  3. Models without a chat template get the few-shot math prompt (common.build_prompt), as in training.
"""
import json, math, os, random, re, sys, time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch.distributed as dist

from common import (arithmetic_task, build_prompt, checkpoints, default_model_path, generate, load_reward_model,
                    load_rows, load_tokenizer, load_weights, make_sampler, print0, rm_scores, score_responses, setup_dist,
                    stop_token_ids, sync_weights)


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


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

@dataclass
class Args:
    model: str = field(default="", metadata={"help": "hub id or local folder; empty: the embedded Gemma-3-270M"})
    benchmarks: str = field(default="math500,amc23,aime24,gsm8k", metadata={
        "help": "comma-separated names from BENCHMARKS (math500, amc23, aime24, gsm8k, numina_test, alpaca_eval), "
                "or name=path.jsonl"})
    data_dir: str = field(default="", metadata={"help": "folder with local JSONL copies (math500.jsonl, ...); "
                                                "empty or a missing file: the dataset hub"})
    samples: int = field(default=50, metadata={"help": "samples per problem (paper: 50); alpaca_eval always 1"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (paper: 0.6)"})
    top_p: float = field(default=0.9, metadata={"help": "top-p (paper: 0.9)"})
    max_new_tokens: int = field(default=1024, metadata={"help": "response length limit (paper trains with 2048)"})
    limit: int = field(default=0, metadata={"help": "first N problems of each benchmark (0: all), for quick runs"})
    reward_model: str = field(default="", metadata={"help": "sequence-classification reward model for rows without "
                                                    "an 'answer' (alpaca_eval win rates; --select of such runs)"})
    select: str = field(default="", metadata={"help": "run folder: rank its step_N checkpoints by validation reward / "
                                              "length instead of evaluating --model"})
    sampler: str = field(default="auto", metadata={"help": "vllm | hf | auto (vllm when installed)"})
    vllm_memory: float = field(default=0.5, metadata={"help": "fraction of GPU memory vLLM may take"})
    vllm_tp: int = field(default=1, metadata={"help": "vLLM tensor-parallel size, across torchrun ranks"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    out: str = field(default="", metadata={"help": "output folder; empty: runs/eval/<model name>"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})


# name: (local file names, hub dataset id, hub config, hub split, {our field: hub field})
BENCHMARKS = {
    "math500": (["math500.jsonl"], "HuggingFaceH4/MATH-500", None, "test", {"problem": "problem", "answer": "answer"}),
    "amc23": (["amc23.jsonl"], "math-ai/amc23", None, "test", {"problem": "question", "answer": "answer"}),
    "aime24": (["aime24.jsonl"], "HuggingFaceH4/aime_2024", None, "train", {"problem": "problem", "answer": "answer"}),
    "gsm8k": (["gsm8k_test.jsonl", "gsm8k.jsonl"], "openai/gsm8k", "main", "test",
              {"problem": "question", "answer": "answer"}),
    # the paper's held-out test split, built from the full training set by numina_splits
    "numina_test": (["numina_test.jsonl"], "AI-MO/NuminaMath-CoT", None, "train",
                    {"problem": "problem", "solution": "solution", "source": "source"}),
    "alpaca_eval": (["alpaca_eval.jsonl"], "tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline", "eval",
                    {"problem": "instruction", "reference": "output", "dataset": "dataset"}),
}


def gsm8k_answer(answer):
    """The hub's GSM8K `answer` is a worked solution ending "#### 1,234": keep the number, without commas."""
    return answer.split("####")[-1].strip().replace(",", "")


def last_boxed(text):
    """Content of the last \\boxed{...} in text (nested braces balanced), or None."""
    i = text.rfind("\\boxed")
    j = i + len("\\boxed")
    if i < 0 or text[j:j + 1] != "{":
        return None
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None  # unbalanced: the solution was cut off


NUMINA_DROPPED_SOURCES = {"orca_math", "synthetic_amc", "synthetic_math"}  # PAPER.md section 5
NUMINA_HELD_OUT = 1980  # validation and test problems each (PAPER.md section 5)
PROOF = re.compile(r"\b(prove|proof|show that|demonstrate that)\b", re.I)
OPTIONS = re.compile(r"(\(A\)|(^|\n)\s*A[.:：])[\s\S]*(\(B\)|\n\s*B[.:：])")  # "(A) ... (B)" or lines "A: ..." "B: ..."


def numina_splits(rows, seed=0):
    """NuminaMath-CoT rows {problem, solution, source} -> (train, validation, test) rows {problem, answer, source}.
    Filter (PAPER.md section 5; the rules for proofs and multiple choice are ours): drop the synthetic sources;
    drop proofs (the problem says prove / show that, or the solution has no final \\boxed{} answer); drop
    multiple choice (the problem lists options (A) (B) or lines "A:" "B:", or the answer is a bare letter A-E).
    The answer is the solution's last \\boxed{}. A fixed-seed shuffle holds out validation then test.
    Needs the hub (NuminaMath-CoT is not among the local copies): untested here beyond a few synthetic rows."""
    kept = []
    for r in rows:
        answer = (last_boxed(r["solution"]) or "").strip()
        letter = re.sub(r"\\text\{|[{}()$\s]", "", answer)
        if (r["source"] in NUMINA_DROPPED_SOURCES or not answer or PROOF.search(r["problem"])
                or OPTIONS.search(r["problem"]) or letter in ("A", "B", "C", "D", "E")):
            continue
        kept.append({"problem": r["problem"], "answer": answer, "source": r["source"]})
    random.Random(seed).shuffle(kept)
    n = NUMINA_HELD_OUT
    return kept[2 * n:], kept[:n], kept[n:2 * n]


def wildchat_prompts(path, n=1000, seed=0, pool=100_000):
    """Writes n first-turn WildChat-1M prompts (English, not flagged toxic, not redacted) as JSONL {prompt}
    rows: the paper's non-verifiable training prompts (section 5). Needs `datasets` and hub access; it
    samples from the first `pool` conversations, streamed."""
    import datasets  # only needed here
    rows = datasets.load_dataset("allenai/WildChat-1M", split="train", streaming=True).take(pool)
    prompts = [r["conversation"][0]["content"] for r in rows if r["language"] == "English" and not r["toxic"]
               and not r["redacted"] and r["conversation"][0]["role"] == "user"]
    prompts = random.Random(seed).sample(sorted(set(prompts)), n)
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": p}) + "\n" for p in prompts)


def load_benchmark(spec, data_dir, limit):
    """`name` or `name=path.jsonl` -> rows: the explicit path, else <data_dir>/<local file>, else the hub."""
    name, _, path = spec.partition("=")
    files, hub, config, split, fields = BENCHMARKS.get(name, ([], None, None, None, {}))
    local = [os.path.join(data_dir, f) for f in files if data_dir and os.path.exists(os.path.join(data_dir, f))]
    path = path or (local[0] if local else "")
    if path:
        rows = load_rows(path)  # reports a malformed line as file:line
    else:
        try:
            import datasets  # only needed when there is no local copy
            hub_rows = datasets.load_dataset(hub, config, split=split)
        except Exception as e:
            sys.exit(f"{name}: no local copy ({' or '.join(files)} in --data_dir {data_dir!r}) and the hub dataset "
                     f"{hub} could not be loaded ({type(e).__name__}: {e}); `pip install datasets` or pass --data_dir")
        rows = [{ours: r[theirs] for ours, theirs in fields.items()} for r in hub_rows]
        if name == "numina_test":
            rows = numina_splits(rows)[2]
        for r in rows:
            r["answer"] = None if r.get("answer") is None else str(r["answer"])
    if name == "gsm8k":
        for r in rows:
            r["answer"] = r["answer"] if r.get("answer") is None else gsm8k_answer(r["answer"])
    return rows[:limit or None]


def gather(mine, world):
    """The inverse of rows[rank::world]: every rank's part, back in the original order."""
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return [parts[i % world][i // world] for i in range(sum(map(len, parts)))]


def lc_win_rate(wins, length_diff, iters=50, l2=1e-4):
    """Length-controlled win rate: logistic regression (IRLS / Newton) of win in [0, 1] (ties 0.5) on
    x = length_diff / std(length_diff), P(win) = sigmoid(b0 + b1 x); returns (sigmoid(b0), [b0, b1]), the win
    rate predicted for an output as long as its reference. x is scaled but not centred: centring would move b0
    to the mean length difference. The tiny l2 keeps the fit finite when every comparison is won or lost."""
    y, d = np.asarray(wins, dtype=float), np.asarray(length_diff, dtype=float)
    X = np.stack([np.ones_like(d), d / (d.std() or 1.0)], 1)
    w = np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ w))
        hessian = X.T @ (X * (p * (1 - p))[:, None]) + l2 * len(y) * np.eye(2)
        step = np.linalg.solve(hessian, X.T @ (y - p) - l2 * len(y) * w)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-w[0]))), w.tolist()


def alpaca_eval(sampler, tokenizer, rows, args, rm, generator, rank, world):
    """One output per instruction (AlpacaEval's format has one); with a reward model, each output and the
    reference are scored and compared: win 1, tie 0.5, loss 0."""
    mine = rows[rank::world]
    groups = generate(sampler, [build_prompt(tokenizer, r) for r in mine], 1, args.temperature, args.top_p,
                      args.max_new_tokens, seed=args.seed)
    outputs = [g[0].text for g in groups]
    instructions = [r["problem"] for r in mine]
    scores = rm_scores(rm, instructions, outputs) if rm else [None] * len(mine)
    ref_scores = rm_scores(rm, instructions, [r["reference"] for r in mine]) if rm else [None] * len(mine)
    gens = gather([{"instruction": r["problem"], "output": o, "generator": generator, "dataset": r.get("dataset"),
                    "reference": r.get("reference"), "length": len(g[0].token_ids), "score": s, "reference_score": rs}
                   for r, o, g, s, rs in zip(mine, outputs, groups, scores, ref_scores)], world)
    result = {"problems": len(gens), "samples": 1, "length": sum(g["length"] for g in gens) / len(gens)}
    if rm:
        wins = np.array([1.0 if g["score"] > g["reference_score"] else 0.5 if g["score"] == g["reference_score"]
                         else 0.0 for g in gens])
        # length in characters, as AlpacaEval measures it: comparable across tokenizers
        lc, coef = lc_win_rate(wins, [len(g["output"]) - len(g["reference"]) for g in gens])
        se = float(wins.std(ddof=1) / math.sqrt(len(wins))) if len(wins) > 1 else 0.0
        result |= {"reward": float(wins.mean()), "reward_se": se, "win_rate": float(wins.mean()), "win_rate_se": se,
                   "lc_win_rate": lc, "lc_coef": coef, "rm_score": float(np.mean([g["score"] for g in gens])),
                   "reference_rm_score": float(np.mean([g["reference_score"] for g in gens]))}
    return result, gens


def model_name(path):
    """runs/x/step_000030 -> x_step_000030; meta-llama/Llama-3.1-8B-Instruct -> Llama-3.1-8B-Instruct."""
    parts = os.path.normpath(path).split(os.sep)
    return "_".join(parts[-2:]) if parts[-1].startswith("step_") and len(parts) > 1 else parts[-1]


def select(args, rank, device):
    """PAPER.md section 6: the checkpoint with the highest mean validation reward / mean validation response
    length. Uses the validation the run logged at that step, else validates the checkpoint now exactly as the
    training scripts do (their val set, n=1, T=0.6, top-p 0.9, their max_new_tokens and seed)."""
    run = args.select
    run_args = json.load(open(os.path.join(run, "args.json")))
    ckpts = checkpoints(run)
    assert ckpts, f"--select {run}: no step_NNNNNN checkpoint there"
    logged = {}
    if os.path.exists(os.path.join(run, "metrics.jsonl")):
        for line in open(os.path.join(run, "metrics.jsonl")):
            r = json.loads(line)
            if "val_reward" in r and "val_length" in r:  # validation at the start of step N = after N optimizer steps
                logged[r["step"]] = (r["val_reward"], r["val_length"])
    ranking, sampler = [], None
    for path in ckpts:
        step = int(os.path.basename(path)[len("step_"):])
        source = "log" if step in logged else "evaluated"
        if step not in logged:
            if sampler is None:  # one sampler for every checkpoint; each one's weights are copied in
                val_rows = load_rows(run_args["val_data"], split="test") if run_args.get("val_data") \
                    else arithmetic_task(run_args["seed"])[1]
                val_rows = val_rows[:run_args.get("val_size") or None]
                rm_path = args.reward_model or run_args.get("reward_model")
                rm = load_reward_model(rm_path, device, trust_remote_code=args.trust_remote_code) if rm_path else None
                tokenizer = load_tokenizer(path, args.trust_remote_code)
                sampler = make_sampler(args.sampler, path, tokenizer, device, run_args["seed"] + rank,
                                       stop_token_ids(tokenizer), max(len(build_prompt(tokenizer, r)) for r in val_rows)
                                       + run_args["max_new_tokens"], args.vllm_memory, args.vllm_tp,
                                       args.trust_remote_code)
            sync_weights(sampler, load_weights(path))
            val = evaluate(sampler, tokenizer, val_rows, max_new_tokens=run_args["max_new_tokens"],
                           seed=run_args["seed"], rm=rm)
            logged[step] = (val["reward"], val["length"])
        reward, length = logged[step]
        ranking.append({"step": step, "path": path, "val_reward": reward, "val_length": length,
                        "ratio": reward / length if length > 0 else 0.0, "source": source})
    ranking.sort(key=lambda r: (-r["ratio"], r["step"]))
    print0(f"{'step':>8} {'val_reward':>11} {'val_length':>11} {'ratio':>10}  source")
    for r in ranking:
        print0(f"{r['step']:>8} {r['val_reward']:>11.4f} {r['val_length']:>11.1f} {r['ratio']:>10.5f}  {r['source']}")
    print0(f"best checkpoint: {ranking[0]['path']}")
    if rank == 0:
        json.dump({"best": ranking[0]["path"], "ranking": ranking}, open(os.path.join(run, "selection.json"), "w"),
                  indent=1)


def main():
    from transformers import HfArgumentParser
    args = HfArgumentParser(Args).parse_args_into_dataclasses()[0]
    assert args.sampler in ("vllm", "hf", "auto"), "--sampler: vllm, hf or auto"
    assert args.samples >= 1, "--samples: at least 1"
    if args.select:
        rank, world, device = setup_dist()
        return select(args, rank, device)
    # data first: an unknown name or a malformed file fails before any model loads
    specs = [s.strip() for s in args.benchmarks.split(",") if s.strip()]
    for s in specs:
        assert "=" in s or s in BENCHMARKS, \
            f"--benchmarks: unknown {s!r} (known: {', '.join(BENCHMARKS)}; or name=path.jsonl)"
    benchmarks = {s.partition("=")[0]: load_benchmark(s, args.data_dir, args.limit) for s in specs}
    for name, rows in benchmarks.items():
        assert rows, f"{name}: no problems"
        assert name == "alpaca_eval" or args.reward_model or all(r.get("answer") is not None for r in rows), \
            f"{name}: rows without an 'answer' need --reward_model"
        assert name != "alpaca_eval" or not args.reward_model or all(r.get("reference") for r in rows), \
            "alpaca_eval: --reward_model compares each output with the row's 'reference', and a row has none"
    rank, world, device = setup_dist()

    model_path = args.model or default_model_path()
    generator = model_name(model_path)
    out = args.out or os.path.join("runs", "eval", generator)
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    rm = load_reward_model(args.reward_model, device, trust_remote_code=args.trust_remote_code) \
        if args.reward_model else None
    max_prompt = max(len(build_prompt(tokenizer, r)) for rows in benchmarks.values() for r in rows)
    sampler = make_sampler(args.sampler, model_path, tokenizer, device, args.seed + rank, stop_token_ids(tokenizer),
                           max_prompt + args.max_new_tokens, args.vllm_memory, args.vllm_tp, args.trust_remote_code)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    summary = {"model": model_path, "sampler": sampler.kind, "samples": args.samples, "temperature": args.temperature,
               "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": args.seed, "world_size": world,
               "args": asdict(args), "benchmarks": {}}

    for name, rows in benchmarks.items():
        t0 = time.time()
        if name == "alpaca_eval":
            result, gens = alpaca_eval(sampler, tokenizer, rows, args, rm, generator, rank, world)
        else:
            result = evaluate(sampler, tokenizer, rows, args.samples, args.temperature, args.top_p,
                              args.max_new_tokens, args.seed, rm)
            gens = gather(result.pop("generations"), world)
            result["samples"] = args.samples
        summary["benchmarks"][name] = result | {"seconds": time.time() - t0}
        if rank == 0:
            with open(os.path.join(out, f"{name}_generations.jsonl"), "w") as f:
                f.writelines(json.dumps(g) + "\n" for g in gens)
            if name == "alpaca_eval":  # AlpacaEval's submission format
                json.dump([{k: g[k] for k in ("instruction", "output", "generator", "dataset")} for g in gens],
                          open(os.path.join(out, "alpaca_eval_model_outputs.json"), "w"), indent=1)
        print0(f"{name}: {json.dumps({k: v for k, v in result.items() if not isinstance(v, list)})}")

    if rank == 0:
        json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
    # accuracy: Math-Verify mean over problems x samples; for alpaca_eval the win rate against the reference
    print0(f"\n{'benchmark':<14}{'problems':>9}{'samples':>8}{'accuracy':>10}{'se':>8}{'length':>9}")
    for name, r in summary["benchmarks"].items():
        acc = f"{r['reward']:>10.4f}{r['reward_se']:>8.4f}" if "reward" in r else f"{'-':>10}{'-':>8}"
        note = f"  (win rate; length-controlled {r['lc_win_rate']:.4f})" if "lc_win_rate" in r else ""
        print0(f"{name:<14}{r['problems']:>9}{r['samples']:>8}{acc}{r['length']:>9.1f}{note}")
    print0(f"model {model_path}, T={args.temperature}, top-p {args.top_p}, max_new_tokens {args.max_new_tokens}; "
           f"written to {out}")


if __name__ == "__main__":
    main()
