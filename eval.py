"""Rewards and evaluation: Math-Verify and reward-model rewards, in one file with the benchmarks as the paper judges
training rollouts and benchmark answers alike; validation, checkpoint selection (section 6) and the runs' curves.
Section 6: T=0.6, top-p 0.9, 50 samples per problem, 1 in validation. The data side of the task is in data.py.

  python eval.py --model runs/dpo_semionline/step_000030 --benchmarks math500,amc23 --samples 50
  python eval.py --benchmarks math500=my_copy.jsonl --data_dir ~/data --limit 20 --samples 4   # quick look
  python eval.py --select runs/dpo_semionline          # best checkpoint by val reward / val length (section 6)
  python eval.py --model ... --benchmarks alpaca_eval,arena_hard --reward_model Nexusflow/Athene-RM-8B
  python eval.py --plot runs/a runs/b --out curves.png # the runs' curves overlaid, and a table per method
  torchrun --nproc_per_node 8 eval.py --model ... --benchmarks math500,amc23,numina_test   # problems split over ranks

Benchmarks: --data_dir/<file> (JSONL {"problem", "answer"}), name=path.jsonl, or the hub; numina_test is the split
`python data.py` holds out. Deviation from the paper: AlpacaEval, Arena-Hard: a reward model, not GPT-4, judges each
output against the reference answer; the length-controlled win rate is a logistic fit on the length difference
(characters), not AlpacaEval's GLM. For the real judges: <out>/alpaca_eval_model_outputs.json and
<out>/arena_hard/model_answer (Arena-Hard-Auto's gen_judgment.py).
"""
import json, math, os, queue, re, select, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from common import (all_gather, checkpoints, fail, generate, iter_weights, load_tokenizer, load_weights,
                    make_sampler, pad_sequences, parse_args, print0, resolve, setup_dist, sync_weights)
from data import PLAIN_TEMPLATE, build_prompt, default_model_path, hub_rows, load_rows, load_task, read_jsonl, \
    stop_token_ids

# ---- Math reward: Math-Verify in a pool of worker processes, started once and awaited before any answer is
# timed, so a hang can be killed and any thread may call it. A worker is plain Python (no torch): it reads
# [response, answer] JSON lines and writes a reward per line ----

_WORKER = r'''
import json, logging, os, sys
reply = os.fdopen(os.dup(1), "w"); os.dup2(2, 1)  # only rewards on the pipe, whatever the libraries print
from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, math_metric
logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # "could not extract" is a 0 reward, not news
# PAPER.md section 5 (the authors' MathVerifyHandler): gold normalised, prediction prefers \boxed{}
gold_norm = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="none",
                                equations=False)
verify = math_metric(gold_extraction_target=(LatexExtractionConfig(normalization_config=gold_norm),),
                     pred_extraction_target=(LatexExtractionConfig(boxed_match_priority=0),),
                     aggregation_function=max, precision=6)
def score(response, answer):
    try:
        gold = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
        return float(verify([gold], [response])[0])
    except BaseException:  # Math-Verify raises on unparseable or timed-out input: reward 0
        return 0.0
score("$\\boxed{1}$", "1")  # sympy's lazy imports happen here, before the worker says it is ready
try:
    reply.write("ready\n"); reply.flush()
    for line in sys.stdin:
        reply.write(json.dumps(score(*json.loads(line))) + "\n"); reply.flush()
except (BrokenPipeError, KeyboardInterrupt):  # the trainer is gone
    pass
'''
_idle, _pool_lock, _pool_size = queue.LifoQueue(), threading.Lock(), [0]  # idle workers; how many were started


def _start_worker(startup_timeout=300.0):
    """A ready worker process, or an error naming why none could start."""
    proc = subprocess.Popen([sys.executable, "-c", _WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            bufsize=1)
    answered = select.select([proc.stdout], [], [], startup_timeout)[0]
    if answered and proc.stdout.readline() == "ready\n":
        return proc
    proc.kill(), proc.wait()
    why = "exited, see its error above" if answered else f"not ready after {startup_timeout:.0f} s"
    fail(f"Math-Verify could not start (its worker {why}): is math-verify installed? pip install -r requirements.txt")


def start_math_verify(num_workers):
    """Grows the pool to num_workers ready processes (started together, awaited untimed). Idempotent."""
    with _pool_lock:
        missing = num_workers - _pool_size[0]
        _pool_size[0] = max(_pool_size[0], num_workers)
    if missing > 0:
        with ThreadPoolExecutor(missing) as pool:
            for proc in list(pool.map(lambda _: _start_worker(), range(missing))):
                _idle.put(proc)


def _verify(response, answer, timeout):
    """(reward, timed_out) for one answer on an idle worker; a worker that overruns or dies is killed and replaced."""
    proc = _idle.get()  # waiting for a free worker is not verification time
    try:
        proc.stdin.write(json.dumps([str(response), str(answer)]) + "\n")
        timed_out = not select.select([proc.stdout], [], [], timeout)[0]
        reward = None if timed_out else float(proc.stdout.readline())
    except (OSError, ValueError):  # the worker died under this answer
        reward, timed_out = None, False
    if reward is None:  # reward 0, a new worker
        proc.kill(), proc.wait()
        reward, proc = 0.0, _start_worker()
    _idle.put(proc)
    return reward, timed_out


def math_verify(responses, answers, num_workers=None, timeout=10.0):
    """Rewards (1.0 if Math-Verify finds the final answer equal to the gold one, else 0.0), and how many timed out."""
    num_workers = num_workers or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    start_math_verify(num_workers)
    with ThreadPoolExecutor(num_workers) as pool:
        results = list(pool.map(lambda ra: _verify(*ra, timeout), zip(responses, answers)))
    return [r for r, _ in results], sum(t for _, t in results)


def math_rewards(responses, answers, num_workers=None):
    """Math-Verify rewards of a batch, scored in parallel worker processes."""
    return math_verify(responses, answers, num_workers)[0]


def math_reward(response: str, answer: str) -> float:
    """1.0 if Math-Verify finds the response's final answer equal to `answer`, else 0.0. Never raises."""
    return math_verify([response], [answer], num_workers=1)[0][0]


# ---- Reward models (non-verifiable prompts) and mixed batches ----

@dataclass
class RewardModel:
    model: torch.nn.Module
    tokenizer: object
    cls_token_id: int | None  # appended to every input, the score read there (Athene-RM-8B's convention)
    max_length: int


def load_reward_model(path, device, max_length=4096, trust_remote_code=False):
    """Any transformers sequence-classification reward model (`num_labels=1`). An Athene architecture (Athene-RM-8B,
    PAPER.md section 5: a Llama whose `v_head` is loaded as the head) or a `cls_token_id` gets the CLS convention."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    athene = any("Athene" in a for a in config.architectures or [])
    cls = getattr(config, "cls_token_id", None) or (128003 if athene else None)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        trust_remote_code=trust_remote_code, key_mapping={r"^v_head\.": "score."} if athene else None)
    return RewardModel(model.to(device).eval().requires_grad_(False), load_tokenizer(path, trust_remote_code), cls,
                       max_length)


@torch.no_grad()
def rm_scores(rm, prompts, responses, batch_size=8):
    """Score of each (prompt, response): chat-templated [user, assistant] (else prompt + response as text), cut to
    max_length, + CLS if the model uses one; a decoder's head reads the last real token, an encoder pools its own."""
    tok, model, cls, seqs = rm.tokenizer, rm.model, rm.cls_token_id, []
    for p, r in zip(prompts, responses):
        ids = list(tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": r}],
                                           tokenize=True, return_dict=False)) if tok.chat_template \
            else tok(PLAIN_TEMPLATE.format(problem=p) + r)["input_ids"]
        seqs.append(ids[:rm.max_length - (cls is not None)] + ([cls] if cls is not None else []))
    device, scores = next(model.parameters()).device, []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i:i + batch_size]
        ids, attn, _ = pad_sequences(chunk, [[] for _ in chunk], 0, device)
        if hasattr(model, "score"):  # right padding: the last real token is at attention_mask.sum() - 1
            hidden = getattr(model, model.base_model_prefix)(input_ids=ids, attention_mask=attn).last_hidden_state
            logits = model.score(hidden[torch.arange(len(chunk), device=device), attn.sum(-1) - 1])
        else:
            logits = model(input_ids=ids, attention_mask=attn).logits
        scores += logits[:, 0].float().tolist()
    return scores


def score_responses(rows, responses, rm=None):
    """(rewards, reward_timeouts): Math-Verify (0/1) for a row with an `answer`, else the reward model, so a mixed
    batch (paper Table 3) scores each sample by its own reward. Most answers timing out stops the run (zeros)."""
    math_idx = [k for k, r in enumerate(rows) if r.get("answer") is not None]
    rm_idx = [k for k, r in enumerate(rows) if r.get("answer") is None]
    rewards, timeouts = {}, 0
    if math_idx:
        scores, timeouts = math_verify([responses[k] for k in math_idx], [rows[k]["answer"] for k in math_idx])
        if timeouts > len(math_idx) / 2:
            fail(f"Math-Verify timed out on {timeouts} of {len(math_idx)} answers: rewards would be silent zeros")
        rewards.update(zip(math_idx, scores))
    if rm_idx and rm is None:
        fail("rows without an 'answer' need --reward_model")
    if rm_idx:
        rewards.update(zip(rm_idx, rm_scores(rm, [rows[k]["problem"] for k in rm_idx], [responses[k] for k in rm_idx])))
    return [rewards[k] for k in range(len(rows))], timeouts


def task_sums(rows, rewards):
    """Per-task sums of a mixed batch, to all_reduce and then divide with task_means."""
    m = [x for r, x in zip(rows, rewards) if r.get("answer") is not None]
    o = [x for r, x in zip(rows, rewards) if r.get("answer") is None]
    return {"reward_math": sum(m), "n_math": len(m), "reward_rm": sum(o), "n_rm": len(o)}


def task_means(g):
    """reward_math and reward_rm from all-reduced task_sums, for the tasks present in the batch."""
    return {k: g[k] / g[n] for k, n in (("reward_math", "n_math"), ("reward_rm", "n_rm")) if g[n]}


# ---- Evaluation ----

def gather(mine):
    """The inverse of rows[rank::world]: every rank's part of a list, back in the original order."""
    parts = all_gather(mine)
    return [parts[i % len(parts)][i // len(parts)] for i in range(sum(map(len, parts)))]


def evaluate(sampler, tokenizer, rows, samples=1, temperature=0.6, top_p=0.9, max_new_tokens=1024, seed=0, rm=None):
    """Mean reward (score_responses) over problems x samples, its standard error over problems, mean response length.
    Under torchrun each rank samples every world-th problem; every rank gets the global result."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    mine, t0 = rows[rank::world], time.time()
    groups = generate(sampler, [build_prompt(tokenizer, r) for r in mine], samples, temperature, top_p,
                      max_new_tokens, seed=seed)
    flat, _ = score_responses([r for r in mine for _ in range(samples)], [s.text for g in groups for s in g], rm)
    rewards = [flat[i * samples:(i + 1) * samples] for i in range(len(groups))]
    generations = [{"problem": r["problem"], "answer": r.get("answer"), "responses": [s.text for s in g],
                    "rewards": x} for r, g, x in zip(mine, groups, rewards)]
    acc, lengths = zip(*gather([(sum(x) / samples, sum(len(s.token_ids) for s in g) / samples)
                                for g, x in zip(groups, rewards)]))
    mean = sum(acc) / len(acc)
    se = math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1) / len(acc)) if len(acc) > 1 else 0.0
    return {"reward": mean, "reward_se": se, "length": sum(lengths) / len(lengths), "problems": len(acc),
            "seconds": time.time() - t0, "generations": generations}


def print_summary(rank, model, val_history):
    """Each rank's weight fingerprint (ranks must end identical), then validation before and after training."""
    fingerprint = sum(t.double().sum().item() for _, t in iter_weights(model))
    sys.stdout.write(f"rank {rank} weights fingerprint {fingerprint:.17g}\n")  # one write: ranks' lines don't interleave
    sys.stdout.flush()
    for name, (s, v) in [("before", val_history[0])] * (len(val_history) > 1) + [("after", val_history[-1])]:
        print0(f"val_reward {name} (step {s}): {v['reward']:.3f} +- {v['reward_se']:.3f}  (length {v['length']:.1f})")


def lc_win_rate(wins, length_diff, iters=50, l2=1e-4):
    """Length-controlled win rate: logistic regression (IRLS / Newton) of win (1, tie 0.5, 0) on x = length_diff /
    std(length_diff); returns (sigmoid(b0), [b0, b1]), the win rate at the reference's length. x is not centred
    (that would move b0 to the mean length difference); the tiny l2 keeps the fit finite when all is won or lost."""
    y, d = np.asarray(wins, dtype=float), np.asarray(length_diff, dtype=float)
    X, w = np.stack([np.ones_like(d), d / (d.std() or 1.0)], 1), np.zeros(2)
    for _ in range(iters):
        p = 1 / (1 + np.exp(-X @ w))
        hessian = X.T @ (X * (p * (1 - p))[:, None]) + l2 * len(y) * np.eye(2)
        step = np.linalg.solve(hessian, X.T @ (y - p) - l2 * len(y) * w)
        w += step
        if np.abs(step).max() < 1e-10:
            break
    return float(1 / (1 + np.exp(-w[0]))), w.tolist()


def judged(sampler, tokenizer, rows, args, rm, generator, rank, world):
    """One output per instruction (as AlpacaEval, Arena-Hard take), with `rm` scored against the row's reference."""
    mine = rows[rank::world]
    groups = generate(sampler, [build_prompt(tokenizer, r) for r in mine], 1, args.temperature, args.top_p,
                      args.max_new_tokens, seed=args.seed)
    outputs, instructions = [g[0].text for g in groups], [r["problem"] for r in mine]
    scores, ref_scores = [rm_scores(rm, instructions, x) if rm else [None] * len(mine)
                          for x in (outputs, [r.get("reference") for r in mine])]
    gens = gather([{"instruction": r["problem"], "output": o, "generator": generator, "dataset": r.get("dataset"),
                    "question_id": r.get("question_id"), "reference": r.get("reference"),
                    "length": len(g[0].token_ids), "score": s, "reference_score": rs}
                   for r, o, g, s, rs in zip(mine, outputs, groups, scores, ref_scores)])
    result = {"problems": len(gens), "samples": 1, "length": sum(g["length"] for g in gens) / len(gens)}
    if rm:  # win 1, tie 0.5, loss 0
        wins = np.array([((g["score"] > g["reference_score"]) + (g["score"] >= g["reference_score"])) / 2
                         for g in gens])
        # length in characters, as AlpacaEval measures it: comparable across tokenizers
        lc, coef = lc_win_rate(wins, [len(g["output"]) - len(g["reference"]) for g in gens])
        se = float(wins.std(ddof=1) / math.sqrt(len(wins))) if len(wins) > 1 else 0.0
        result |= {"reward": float(wins.mean()), "reward_se": se, "win_rate": float(wins.mean()), "win_rate_se": se,
                   "lc_win_rate": lc, "lc_coef": coef, "rm_score": float(np.mean([g["score"] for g in gens])),
                   "reference_rm_score": float(np.mean([g["reference_score"] for g in gens]))}
    return result, gens


# ---- Benchmarks ----

ARENA_HARD = ["arena-hard-v0.1/question.jsonl", "arena-hard-v0.1/model_answer/gpt-4-0314.jsonl"]
JUDGED = ("alpaca_eval", "arena_hard")  # outputs compared with a reference answer, one sample each
# name: (local file names, hub dataset id, hub config, hub split, {our field: hub field})
BENCHMARKS = {
    "math500": (["math500.jsonl"], "HuggingFaceH4/MATH-500", None, "test", {"problem": "problem", "answer": "answer"}),
    "amc23": (["amc23.jsonl"], "math-ai/amc23", None, "test", {"problem": "question", "answer": "answer"}),
    "aime24": (["aime24.jsonl"], "HuggingFaceH4/aime_2024", None, "train", {"problem": "problem", "answer": "answer"}),
    "gsm8k": (["gsm8k_test.jsonl", "gsm8k.jsonl"], "openai/gsm8k", "main", "test",
              {"problem": "question", "answer": "answer"}),
    "numina_test": (["numina_test.jsonl"], None, None, None, {}),  # data.py's split, held out from training
    "arena_hard": (ARENA_HARD, "lmarena-ai/arena-hard-auto", None, None, {}),  # arena_hard_rows
    "alpaca_eval": (["alpaca_eval.jsonl"], "tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline", "eval",
                    {"problem": "instruction", "reference": "output", "dataset": "dataset"}),
}


def gsm8k_answer(answer):
    """The hub's GSM8K `answer` is a worked solution ending "#### 1,234": keep the number, without commas."""
    return answer.split("####")[-1].strip().replace(",", "")


def arena_hard_rows(data_dir):
    """Arena-Hard-Auto v0.1's 500 questions, the GPT-4-0314 baseline's answers as references, from <data_dir> laid out
    as the benchmark's data/ folder, else from the hub dataset's files (no `datasets` needed)."""
    paths = [os.path.join(data_dir, f) for f in ARENA_HARD]
    if not all(os.path.exists(p) for p in paths):
        from huggingface_hub import hf_hub_download
        paths = [hf_hub_download(BENCHMARKS["arena_hard"][1], "data/" + f, repo_type="dataset") for f in ARENA_HARD]
    baseline = {r["question_id"]: r["choices"][0]["turns"][0]["content"] for _, r in read_jsonl(paths[1])}
    return [{"problem": q["turns"][0]["content"], "reference": baseline.get(q["question_id"]),
             "question_id": q["question_id"], "dataset": q.get("category")} for _, q in read_jsonl(paths[0])]


def load_benchmark(spec, data_dir, limit):
    """`name` or `name=path.jsonl` -> rows: the explicit path, else <data_dir>/<local file>, else the hub."""
    name, _, path = spec.partition("=")
    files, hub, config, split, fields = BENCHMARKS.get(name, ([], None, None, None, {}))
    local = [os.path.join(data_dir, f) for f in files if data_dir and os.path.exists(os.path.join(data_dir, f))]
    if name == "arena_hard" and not path:  # name=path.jsonl: rows {prompt, reference} like the others
        rows = arena_hard_rows(data_dir)
    elif path or local:
        rows = load_rows(path or local[0])  # reports a malformed line as file:line
    elif hub is None:  # numina_test: only the split held out from the training file is a test set
        fail(f"{name}: no {files[0]} in --data_dir {data_dir!r} (python data.py --out DIR writes it)")
    else:
        missing = f"{name}: no local copy ({' or '.join(files)} in --data_dir {data_dir!r})"
        hub_data = hub_rows(hub, split, config, missing=missing)
        rows = [{ours: r[theirs] for ours, theirs in fields.items()} for r in hub_data]
    for r in rows:  # answers as text; the hub's GSM8K answer is a worked solution
        if r.get("answer") is not None:
            r["answer"] = gsm8k_answer(str(r["answer"])) if name == "gsm8k" else str(r["answer"])
    return rows[:limit or None]


# ---- Plots, checkpoint selection, command line ----

def method_name(run):
    """runs/study/grpo_seed1 -> grpo: the README's study names a run <method>_seed<k>."""
    return re.sub(r"_seed\d+$", "", os.path.basename(os.path.normpath(run)))


def plot_runs(runs, path):
    """The paper's Figs. 2-3 from each run's metrics.jsonl, a line per run: reward, val accuracy, length, entropy,
    logp_gap and KL against step; val accuracy against seconds (time_gen + time_reward + time_train + time_sync)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    panels = [("step", "reward", "val_reward"), ("step", "length"), ("step", "entropy"), ("step", "logp_gap", "kl"),
              ("seconds", "val_reward")]  # (x, the curves)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    methods = list(dict.fromkeys(map(method_name, runs)))  # a colour per method; its seeds share it
    for i, run in enumerate(runs):
        k, first = methods.index(method_name(run)), method_name(run) not in map(method_name, runs[:i])
        rows, clock = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))], 0.0
        for r in rows:
            r["seconds"] = clock
            clock += sum(r.get(t, 0.0) for t in ("time_gen", "time_reward", "time_train", "time_sync"))
        for ax, (x, *keys) in zip(axes, panels):
            for key, style in zip(keys, ("-", "--")):
                pts = [(r[x], r[key]) for r in rows if r.get(key) is not None and r[key] == r[key]]  # no NaN
                if pts:
                    dots = key.startswith("val") or len(pts) == 1  # e.g. offline DPO samples once, at step 0
                    ax.plot(*zip(*pts), style, color=f"C{k}", marker="o" if dots else None, markersize=3,
                            label=f"{methods[k]} {key}" if first else None)
    for ax, (x, *keys) in zip(axes, panels):
        ax.set(title=" / ".join(keys), xlabel=x)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summarize_runs(runs):
    """A markdown table, a row per method (runs named <method>_seed<k>, as the README's study names them): mean +- SE
    over seeds of val accuracy before and after, its gain, the entropy of the last 10 steps (those that trained on a
    token: a step without a DPO pair logs 0) and the final val length; one run's SE; median minutes of logged time
    (steps and validations) and of wall clock (<run>/wall_seconds, a line per launch, written by the study command).
    A second table: val accuracy after, row minus column, paired by seed (regimes of one seed share the val set),
    mean +- SE over seeds; * where the difference exceeds 2 SE."""
    def mean_se(xs):
        m = sum(xs) / len(xs)
        return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs)) if len(xs) > 1 else float("nan")
    methods = {}
    for run in runs:
        rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
        val, last = [r for r in rows if "val_reward" in r], max(r["step"] for r in rows)
        methods.setdefault(method_name(run), []).append({
            "before": val[0]["val_reward"], "after": val[-1]["val_reward"], "gain": val[-1]["val_reward"] - val[0]["val_reward"],
            "entropy": np.mean([r["entropy"] for r in rows if r["step"] >= last - 10 and r.get("entropy", 0) > 0] or [np.nan]),
            "length": val[-1]["val_length"], "se": val[-1]["val_reward_se"],
            "minutes": sum(r.get(k, 0.0) for r in rows for k in ("time_gen", "time_reward", "time_train", "time_sync",
                                                                   "time_val")) / 60, "seed": os.path.basename(os.path.normpath(run))[len(method_name(run)):],
            "wall": sum(map(float, open(wall))) / 60 if os.path.exists(wall := os.path.join(run, "wall_seconds")) else np.nan})
    keys = ["before", "after", "gain", "entropy", "length"]
    lines = ["| method | runs | val before | val after | gain | entropy, last 10 steps | val length after | one run's SE "
             "| minutes per run, logged (median) | wall clock (median) |", "|" + " --- |" * 10]
    for name, rs in methods.items():
        cells = ["%.3f +- %.3f" % mean_se([r[k] for r in rs]) for k in keys]
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {np.mean([r['se'] for r in rs]):.3f} | "
                     f"{np.median([r['minutes'] for r in rs]):.1f} | {np.median([r['wall'] for r in rs]):.1f} |")
    after = {name: {r["seed"]: r["after"] for r in rs} for name, rs in methods.items()}
    lines += ["", "| val after: row - column | " + " | ".join(methods) + " |", "|" + " --- |" * (len(methods) + 1)]
    for a in methods:
        cells = []
        for b in methods:
            d = [after[a][k] - after[b][k] for k in after[a] if k in after[b]] if a != b else []
            m, se = mean_se(d) if d else (0, 0)
            cells.append("%+.3f +- %.3f%s" % (m, se, "*" if abs(m) > 2 * se else "") if d else "")
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def select_checkpoint(args, rank, device):
    """PAPER.md section 6: the checkpoint with the highest mean val reward / mean val response length, as logged at
    its step, else validated now exactly as training does (load_task's val set, n=1, its max_new_tokens and seed)."""
    run, ckpts, logged, ranking, sampler = args.select, checkpoints(args.select), {}, [], None
    if not ckpts or not os.path.exists(os.path.join(run, "args.json")):
        fail(f"--select {run}: no run with step_NNNNNN checkpoints there")
    run_args = json.load(open(os.path.join(run, "args.json")))
    max_prompt, metrics = run_args.get("max_prompt_tokens", 2048), os.path.join(run, "metrics.jsonl")
    for r in map(json.loads, open(metrics)) if os.path.exists(metrics) else []:
        if "val_reward" in r and "val_length" in r:  # validation at the start of step N = after N optimizer steps
            logged[r["step"]] = (r["val_reward"], r["val_length"], "log")
    for path in ckpts:
        step = int(os.path.basename(path)[len("step_"):])
        if step not in logged:
            if sampler is None:  # one sampler for every checkpoint; each one's weights are copied in
                tokenizer = load_tokenizer(path, args.trust_remote_code)
                rm_path = args.reward_model or run_args.get("reward_model")
                _, val_rows = load_task(tokenizer, run_args.get("data"), run_args.get("val_data"), run_args["val_size"],
                                        run_args["seed"], max_prompt, not rm_path)
                rm = load_reward_model(rm_path, device, trust_remote_code=args.trust_remote_code) if rm_path else None
                sampler = make_sampler(args.sampler, path, tokenizer, device, run_args["seed"] + rank,
                                       stop_token_ids(tokenizer), max_prompt + run_args["max_new_tokens"],
                                       run_args.get("bf16") or False, args.vllm_memory, args.trust_remote_code)
            sync_weights(sampler, load_weights(path).items())
            val = evaluate(sampler, tokenizer, val_rows, max_new_tokens=run_args["max_new_tokens"],
                           seed=run_args["seed"], rm=rm)
            logged[step] = (val["reward"], val["length"], "evaluated")
        reward, length, source = logged[step]
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


@dataclass
class Args:
    model: str = field(default="", metadata={"help": "hub id or local folder; empty: the embedded Gemma-3-270M",
                                             "model": True})
    benchmarks: str = field(default="math500,amc23,aime24,gsm8k", metadata={"help": "comma-separated BENCHMARKS "
                            "(math500, amc23, aime24, gsm8k, numina_test, alpaca_eval, arena_hard) or name=path.jsonl"})
    data_dir: str = field(default="", metadata={"help": "folder of local copies (math500.jsonl, ...); else the hub"})
    samples: int = field(default=50, metadata={"help": "per problem (paper: 50); alpaca_eval, arena_hard: 1", "min": 1})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (paper: 0.6)", "min": 0})
    top_p: float = field(default=0.9, metadata={"help": "top-p (paper: 0.9)", "gt": 0, "max": 1})
    max_new_tokens: int = field(default=1024, metadata={"help": "max response tokens (paper trains: 2048)", "min": 1})
    limit: int = field(default=0, metadata={"help": "first N problems of each benchmark (0: all)", "min": 0})
    reward_model: str = field(default="", metadata={"help": "sequence-classification reward model for rows without "
                                                    "an 'answer' (alpaca_eval, arena_hard win rates)", "model": True})
    plot: list[str] = field(default_factory=list, metadata={"help": "run folders: overlay their curves in --out "
                                                             "(a .png file) and exit"})
    select: str = field(default="", metadata={"help": "run folder: rank its checkpoints by val reward / val length"})
    sampler: str = field(default="auto", metadata={"help": "vllm | hf | auto (vllm when installed)",
                                                   "choices": ["vllm", "hf", "auto"]})
    vllm_memory: float = field(default=0.5, metadata={"help": "share of GPU memory vLLM may take", "gt": 0, "max": 1})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 generator weights (default: on CUDA)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    out: str = field(default="", metadata={"help": "output folder; empty: runs/eval/<model name>"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})


def main():
    args = parse_args(Args)
    if args.plot:
        missing = [run for run in args.plot if not os.path.exists(os.path.join(run, "metrics.jsonl"))]
        if missing or not args.out.endswith(".png"):
            fail(f"--plot: no metrics.jsonl in {missing[0]}" if missing else "--plot needs --out FILE.png")
        plot_runs(args.plot, args.out)
        return print(summarize_runs(args.plot))
    if args.select:
        rank, world, device = setup_dist()
        return select_checkpoint(args, rank, device)
    # data first: an unknown name or a malformed file fails before any model loads
    specs = [s.strip() for s in args.benchmarks.split(",") if s.strip()]
    for s in specs:
        if "=" not in s and s not in BENCHMARKS:
            fail(f"--benchmarks: unknown {s!r} (known: {', '.join(BENCHMARKS)}; or name=path.jsonl)")
    benchmarks = {s.partition("=")[0]: load_benchmark(s, args.data_dir, args.limit) for s in specs}
    for name, rows in benchmarks.items():
        if name not in JUDGED and not args.reward_model and any(r.get("answer") is None for r in rows):
            fail(f"{name}: rows without an 'answer' need --reward_model")
        if name in JUDGED and args.reward_model and not all(r.get("reference") for r in rows):
            fail(f"{name}: --reward_model compares each output with the row's 'reference', and a row has none")
    rank, world, device = setup_dist()

    model_path = args.model or default_model_path()
    parts = os.path.normpath(model_path).split(os.sep)  # runs/x/step_000030 -> x_step_000030; org/name -> name
    generator = "_".join(parts[-2:]) if parts[-1].startswith("step_") and len(parts) > 1 else parts[-1]
    out = args.out or os.path.join("runs", "eval", generator)
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    rm = load_reward_model(args.reward_model, device, trust_remote_code=args.trust_remote_code) \
        if args.reward_model else None
    max_prompt = max(len(build_prompt(tokenizer, r)) for rows in benchmarks.values() for r in rows)
    sampler = make_sampler(args.sampler, model_path, tokenizer, device, args.seed + rank, stop_token_ids(tokenizer),
                           max_prompt + args.max_new_tokens, resolve(args.bf16, device.type == "cuda"),
                           args.vllm_memory, args.trust_remote_code)
    if rank == 0:
        os.makedirs(os.path.join(out, "arena_hard", "model_answer") if "arena_hard" in benchmarks else out,
                    exist_ok=True)
    summary = {"model": model_path, "sampler": sampler.kind, "samples": args.samples, "temperature": args.temperature,
               "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": args.seed, "world_size": world,
               "args": asdict(args), "benchmarks": {}}
    for name, rows in benchmarks.items():
        t0 = time.time()
        if name in JUDGED:
            result, gens = judged(sampler, tokenizer, rows, args, rm, generator, rank, world)
        else:
            result = evaluate(sampler, tokenizer, rows, args.samples, args.temperature, args.top_p,
                              args.max_new_tokens, args.seed, rm)
            gens = gather(result.pop("generations"))
            result["samples"] = args.samples
        summary["benchmarks"][name] = result | {"seconds": time.time() - t0}
        if rank == 0:
            with open(os.path.join(out, f"{name}_generations.jsonl"), "w") as f:
                f.writelines(json.dumps(g) + "\n" for g in gens)
            if name == "alpaca_eval":  # AlpacaEval's submission format
                json.dump([{k: g[k] for k in ("instruction", "output", "generator", "dataset")} for g in gens],
                          open(os.path.join(out, "alpaca_eval_model_outputs.json"), "w"), indent=1)
            if name == "arena_hard":  # Arena-Hard-Auto's model_answer format, for its gen_judgment.py
                with open(os.path.join(out, "arena_hard", "model_answer", f"{generator}.jsonl"), "w") as f:
                    for g in gens:
                        q, turn = g["question_id"], {"content": g["output"], "token_len": g["length"]}
                        f.write(json.dumps({"question_id": q, "answer_id": f"{generator}-{q}", "model_id": generator,
                                            "tstamp": time.time(), "choices": [{"index": 0, "turns": [turn]}]}) + "\n")
        print0(f"{name}: {json.dumps({k: v for k, v in result.items() if not isinstance(v, list)})}")
    if rank == 0:
        json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
    # accuracy: Math-Verify mean over problems x samples; for alpaca_eval, arena_hard the win rate
    print0(f"\n{'benchmark':<14}{'problems':>9}{'samples':>8}{'accuracy':>10}{'se':>8}{'length':>9}")
    for name, r in summary["benchmarks"].items():
        acc = f"{r['reward']:>10.4f}{r['reward_se']:>8.4f}" if "reward" in r else f"{'-':>10}{'-':>8}"
        note = f"  (win rate; length-controlled {r['lc_win_rate']:.4f})" if "lc_win_rate" in r else ""
        print0(f"{name:<14}{r['problems']:>9}{r['samples']:>8}{acc}{r['length']:>9.1f}{note}")
    print0(f"model {model_path}, T={args.temperature}, top-p {args.top_p}, max_new_tokens {args.max_new_tokens}; "
           f"written to {out}")


if __name__ == "__main__":
    main()
