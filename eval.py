"""Rewards and evaluation, one file as the paper judges rollouts and benchmark answers alike: the
rewards; the loops' rollouts, validation and end of run; benchmarks, checkpoint selection, curves.
Section 6: T=0.6, top-p 0.9, 50 samples per problem, 1 in validation.

  python eval.py --model runs/dpo_semionline/step_000030 --benchmarks math500,amc23 --samples 50
  python eval.py --benchmarks math500=my_copy.jsonl --data_dir ~/data --limit 20 --samples 4
  python eval.py --select runs/dpo_semionline          # best checkpoint: val reward / val length
  python eval.py --model M --benchmarks alpaca_eval,arena_hard --reward_model Nexusflow/Athene-RM-8B
  python eval.py --plot runs/a runs/b --out curves.png # the runs' curves overlaid
  torchrun --nproc_per_node 8 eval.py --model ... --benchmarks math500,amc23,numina_test

Deviation from the paper: on AlpacaEval and Arena-Hard a reward model, not GPT-4, judges each output
against the reference answer, and the length-controlled win rate is a logistic fit on the length
difference (characters), not AlpacaEval's GLM. The real judges read the outputs written here."""

import json
import math
import os
import queue
import select
import subprocess
import sys
import threading
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from common import (add_sums, all_gather, bf16_matmul, generate, iter_weights, make_sampler,
                    pad_sequences, print0, setup_dist, sync_weights)  # fmt: skip
from data import (BENCHMARKS, JUDGED, PLAIN_TEMPLATE, build_prompt, default_model_path,
                  load_benchmark, load_task, load_tokenizer, stop_token_ids)  # fmt: skip
from flags import (checkpoints, fail, flag, load_weights, log_metrics, parse_args,
                   save_checkpoint, trim_heap)  # fmt: skip

# ---- Math reward: Math-Verify in a pool of worker processes, started once and awaited before an
# answer is timed, so a hang can be killed and any thread may call it. A worker is plain Python (no
# torch): it reads [response, answer] JSON lines and writes a reward per line ----
_WORKER = r'''
import json, logging, os, sys
reply = os.fdopen(os.dup(1), "w"); os.dup2(2, 1)  # only rewards on the pipe, whatever is printed
from latex2sympy2_extended import NormalizationConfig
from math_verify import LatexExtractionConfig, math_metric
logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # "could not extract": a 0, not news
# PAPER.md section 5 (the authors' MathVerifyHandler): gold normalised, prediction prefers \boxed{}
gold_norm = NormalizationConfig(basic_latex=True, units=True, malformed_operators=True, nits=True,
                                boxed="none", equations=False)
verify = math_metric(
    gold_extraction_target=(LatexExtractionConfig(normalization_config=gold_norm),),
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
'''  # fmt: skip
_idle = queue.LifoQueue()  # ready workers
_pool_lock = threading.Lock()
_pool_size = [0]  # how many were started


def _start_worker(startup_timeout=300.0):
    """A ready worker process, or an error naming why none could start."""
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    proc = subprocess.Popen([sys.executable, "-c", _WORKER], text=True, bufsize=1, **pipes)
    answered = select.select([proc.stdout], [], [], startup_timeout)[0]
    if answered and proc.stdout.readline() == "ready\n":
        return proc
    proc.kill()
    proc.wait()
    why = "exited, see its error above" if answered else f"not ready after {startup_timeout:.0f} s"
    fail(f"Math-Verify could not start (its worker {why}): is math-verify installed? "
         "pip install -r requirements.txt")  # fmt: skip


def start_math_verify(num_workers):
    """Grows the pool to num_workers ready processes (started together, awaited untimed)."""
    with _pool_lock:
        missing = num_workers - _pool_size[0]
        _pool_size[0] = max(_pool_size[0], num_workers)
    if missing > 0:
        with ThreadPoolExecutor(missing) as pool:
            for proc in list(pool.map(lambda _: _start_worker(), range(missing))):
                _idle.put(proc)


def _verify(response, answer, timeout):
    """(reward, timed_out) of an answer on an idle worker; one hung or dead is replaced."""
    proc = _idle.get()  # waiting for a free worker is not verification time
    try:
        proc.stdin.write(json.dumps([str(response), str(answer)]) + "\n")
        timed_out = not select.select([proc.stdout], [], [], timeout)[0]
        reward = None if timed_out else float(proc.stdout.readline())
    except (OSError, ValueError):  # the worker died under this answer
        reward = None
        timed_out = False
    if reward is None:  # reward 0, a new worker
        proc.kill()
        proc.wait()
        reward = 0.0
        proc = _start_worker()
    _idle.put(proc)
    return reward, timed_out


def math_verify(responses, answers, num_workers=None, timeout=10.0):
    """Rewards (1.0 if Math-Verify finds the final answer equal to the gold one, else 0.0), and how
    many timed out."""
    cores = (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    num_workers = num_workers or max(1, cores)
    start_math_verify(num_workers)
    with ThreadPoolExecutor(num_workers) as pool:
        results = list(pool.map(lambda ra: _verify(*ra, timeout), zip(responses, answers)))
    return [r for r, _ in results], sum(t for _, t in results)


def math_rewards(responses, answers, num_workers=None):
    """Math-Verify rewards of a batch, scored in parallel worker processes."""
    return math_verify(responses, answers, num_workers)[0]


def math_reward(response: str, answer: str) -> float:
    """1.0 if Math-Verify finds the response's final answer equal to `answer`, else 0.0."""
    return math_verify([response], [answer], num_workers=1)[0][0]


# ---- Reward models (non-verifiable prompts) and mixed batches ----
@dataclass
class RewardModel:
    model: torch.nn.Module
    tokenizer: object
    cls_token_id: int | None  # appended to every input, the score read there (Athene-RM-8B)
    max_length: int


def load_reward_model(path, device, trust_remote_code=False, max_length=4096):
    """A transformers sequence-classification reward model (`num_labels=1`); None without a path.
    An Athene architecture (Athene-RM-8B, PAPER.md section 5: a Llama whose `v_head` is the head)
    or a config's `cls_token_id` gets the CLS convention."""
    if not path:
        return None
    from transformers import AutoConfig, AutoModelForSequenceClassification as Classifier

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    athene = any("Athene" in a for a in config.architectures or [])
    cls = getattr(config, "cls_token_id", None) or (128003 if athene else None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    keys = {r"^v_head\.": "score."} if athene else None
    model = Classifier.from_pretrained(path, num_labels=1, dtype=dtype, key_mapping=keys,
                                       trust_remote_code=trust_remote_code)  # fmt: skip
    model = model.to(device).eval().requires_grad_(False)
    return RewardModel(model, load_tokenizer(path, trust_remote_code), cls, max_length)


@torch.no_grad()
def rm_scores(rm, prompts, responses, batch_size=8):
    """Score of each (prompt, response): chat-templated [user, assistant] (else the text), cut to
    max_length, + CLS if the model uses one; a decoder's head reads the last real token."""
    tok = rm.tokenizer
    cls = rm.cls_token_id
    seqs = []
    for p, r in zip(prompts, responses):
        if tok.chat_template:
            chat = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            ids = list(tok.apply_chat_template(chat, tokenize=True, return_dict=False))
        else:
            ids = tok(PLAIN_TEMPLATE.format(problem=p) + r)["input_ids"]
        seqs.append(ids[: rm.max_length - (cls is not None)] + ([cls] if cls is not None else []))
    model = rm.model
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        ids, attn, _ = pad_sequences(chunk, [[] for _ in chunk], 0, device)
        if hasattr(model, "score"):  # right padding: the last real token is at attn.sum() - 1
            base = getattr(model, model.base_model_prefix)
            hidden = base(input_ids=ids, attention_mask=attn).last_hidden_state
            logits = model.score(hidden[torch.arange(len(chunk), device=device), attn.sum(-1) - 1])
        else:
            logits = model(input_ids=ids, attention_mask=attn).logits
        scores += logits[:, 0].float().tolist()
    return scores


def score_responses(rows, responses, rm=None):
    """(rewards, reward_timeouts): Math-Verify (0/1) for a row with an `answer`, else the reward
    model, so a mixed batch (paper Table 3) scores each sample by its own reward. Most answers
    timing out stops the run: the rewards would be silent zeros."""
    math_idx = [k for k, r in enumerate(rows) if r.get("answer") is not None]
    rm_idx = [k for k, r in enumerate(rows) if r.get("answer") is None]
    rewards = {}
    timeouts = 0
    if math_idx:
        answers = [rows[k]["answer"] for k in math_idx]
        scores, timeouts = math_verify([responses[k] for k in math_idx], answers)
        if timeouts > len(math_idx) / 2:
            fail(f"Math-Verify timed out on {timeouts} of {len(math_idx)} answers: "
                 "rewards would be silent zeros")  # fmt: skip
        rewards.update(zip(math_idx, scores))
    if rm_idx and rm is None:
        fail("rows without an 'answer' need --reward_model")
    if rm_idx:
        instructions = [rows[k]["problem"] for k in rm_idx]
        rewards.update(zip(rm_idx, rm_scores(rm, instructions, [responses[k] for k in rm_idx])))
    return [rewards[k] for k in range(len(rows))], timeouts


def task_sums(rows, rewards):
    """A mixed batch's per-task sums: the math rows' (reward_math over n_math) and the others'."""
    on_math = [x for r, x in zip(rows, rewards) if r.get("answer") is not None]
    on_rm = [x for r, x in zip(rows, rewards) if r.get("answer") is None]
    return {"reward_math": sum(on_math), "n_math": len(on_math), "reward_rm": sum(on_rm),
            "n_rm": len(on_rm)}  # fmt: skip


# ---- The training loops' rollouts, validation and end of run ----
def rollout(run, rows, batches, n, step, metrics):
    """Phases 2-3 of one or more steps: n responses from the generator for each row of each batch
    (row indices, this rank's; sampled as the run's rollouts are), all in one call, as between two
    syncs the generator does not change; scored by score_responses. Returns, per batch, the prompts'
    token ids, the groups of Samples, their rewards ([prompts][n]) and sums: prompts, rollouts,
    reward, length, reward_timeouts, task_sums. Adds the call's time_gen and time_reward to
    `metrics`. The HF sampler's draws are seeded by run.seed, the batch's step (`step` on) and the
    rank, one call per batch: a resumed run samples what it would have."""
    t0 = time.time()
    prompts = [[build_prompt(run.tokenizer, rows[i]) for i in batch] for batch in batches]
    sampling = (run.temperature, run.top_p, run.max_new_tokens)
    if run.sampler.kind == "vllm":
        flat = iter(generate(run.sampler, [p for ps in prompts for p in ps], n, *sampling))
        groups = [[next(flat) for _ in ps] for ps in prompts]
    else:
        seeds = [run.seed * 100003 + (step + k) * run.world + run.rank for k in range(len(batches))]
        groups = [generate(run.sampler, ps, n, *sampling, seed=s) for ps, s in zip(prompts, seeds)]
    trim_heap()  # the engine's freed buffers, else under the next backward's peak
    metrics["time_gen"] = metrics.get("time_gen", 0.0) + time.time() - t0
    t0 = time.time()
    results = []
    for batch, batch_prompts, batch_groups in zip(batches, prompts, groups):
        rows_n = [rows[i] for i in batch for _ in range(n)]  # each response's data row
        responses = [s.text for g in batch_groups for s in g]
        flat_rewards, timeouts = score_responses(rows_n, responses, run.rm)
        rewards = [flat_rewards[k * n : (k + 1) * n] for k in range(len(batch))]
        sums = {}  # this rank's sums by metric name, all-reduced and divided as MEANS says
        length = sum(len(s.token_ids) for g in batch_groups for s in g)
        add_sums(sums, 1.0, prompts=len(batch), rollouts=len(rows_n), reward=sum(flat_rewards),
                 length=length, reward_timeouts=timeouts,
                 **task_sums(rows_n, flat_rewards))  # fmt: skip
        results.append((batch_prompts, batch_groups, rewards, sums))
    metrics["time_reward"] = metrics.get("time_reward", 0.0) + time.time() - t0
    return results


def validate(run, rows, current):
    """Validation of the current policy (section 6: n=1, T=0.6, top-p 0.9), as metrics. Deviation 2:
    a generator that does not hold the current weights (between syncs, or offline DPO's) is given
    them for it, then the weights it held if they are kept (sampler.held)."""
    if not current:
        sync_weights(run.sampler, run.model, keep=False)
    val = evaluate(run.sampler, run.tokenizer, rows, max_new_tokens=run.max_new_tokens,
                   seed=run.seed, rm=run.rm)  # fmt: skip
    if not current and run.sampler.held is not None:
        sync_weights(run.sampler, run.sampler.held, keep=False)
    return {"val_reward": val["reward"], "val_reward_se": val["reward_se"],
            "val_length": val["length"], "time_val": val["seconds"]}  # fmt: skip


def end_run(run, val_rows, steps):
    """After training: validate the final policy and log it, save the last checkpoint, print each
    rank's weight fingerprint (the ranks must end identical) and validation before and after, draw
    <out>/metrics.png (the paper's Figs. 2-3)."""
    run.sampler.held = None  # the generator keeps the final weights: nothing to give back
    log_metrics(run, {"step": steps} | validate(run, val_rows, current=False))
    save_checkpoint(run, steps)
    # float64, 2^20 values at a time: sum(dtype=) casts the whole tensor (an embedding: 1.3 GB)
    weights = (t.reshape(-1).split(2**20) for _, t in iter_weights(run.model))
    fingerprint = sum(c.sum(dtype=torch.float64).item() for chunks in weights for c in chunks)
    line = f"rank {run.rank} weights fingerprint {fingerprint:.17g}\n"
    print(line, end="", flush=True)  # one write: the ranks' lines do not interleave
    validated = [r for r in run.history if "val_reward" in r]
    ends = [("before", validated[0])] * (len(validated) > 1) + [("after", validated[-1])]
    for name, r in ends:
        accuracy = f"{r['val_reward']:.3f} +- {r['val_reward_se']:.3f}"
        print0(f"val_reward {name} (step {r['step']}): {accuracy}  (length {r['val_length']:.1f})")
    if run.rank == 0:
        plot_runs([run.out], os.path.join(run.out, "metrics.png"))


# ---- Evaluation ----
def gather(mine):
    """The inverse of rows[rank::world]: every rank's part of a list, back in the original order."""
    parts = all_gather(mine)
    return [parts[i % len(parts)][i // len(parts)] for i in range(sum(map(len, parts)))]


def evaluate(sampler, tokenizer, rows, samples=1, temperature=0.6, top_p=0.9, max_new_tokens=1024,
             seed=0, rm=None):  # fmt: skip
    """Mean reward (score_responses) over problems x samples, its standard error over problems, mean
    response length. Each torchrun rank samples every world-th problem; all get the result."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    mine = rows[rank::world]
    t0 = time.time()
    prompts = [build_prompt(tokenizer, r) for r in mine]
    groups = generate(sampler, prompts, samples, temperature, top_p, max_new_tokens, seed=seed)
    rows_n = [r for r in mine for _ in range(samples)]
    flat, _ = score_responses(rows_n, [s.text for g in groups for s in g], rm)
    rewards = [flat[i * samples : (i + 1) * samples] for i in range(len(groups))]
    generations = []
    for r, g, x in zip(mine, groups, rewards):
        texts = [s.text for s in g]
        generations.append({"problem": r["problem"], "answer": r.get("answer"), "responses": texts,
                            "rewards": x})  # fmt: skip
    lengths = [sum(len(s.token_ids) for s in g) / samples for g in groups]
    acc, lengths = zip(*gather([(sum(x) / samples, n) for x, n in zip(rewards, lengths)]))
    mean = sum(acc) / len(acc)
    var = sum((a - mean) ** 2 for a in acc) / (len(acc) - 1) if len(acc) > 1 else 0.0
    return {"reward": mean, "reward_se": math.sqrt(var / len(acc)), "problems": len(acc),
            "length": sum(lengths) / len(lengths), "seconds": time.time() - t0,
            "generations": generations}  # fmt: skip


def lc_win_rate(wins, length_diff, iters=50, l2=1e-4):
    """Length-controlled win rate: logistic regression (IRLS / Newton) of win (1, tie 0.5, 0) on
    x = length_diff / std(length_diff); returns (sigmoid(b0), [b0, b1]), the win rate at the
    reference's length. x is not centred (that would move b0 to the mean length difference); the
    tiny l2 keeps the fit finite when all is won or lost."""
    y = np.asarray(wins, dtype=float)
    d = np.asarray(length_diff, dtype=float)
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


def judged(sampler, tokenizer, rows, args, rm, generator, rank, world):
    """One output per instruction (as AlpacaEval, Arena-Hard take), scored by `rm` against the
    row's reference."""
    mine = rows[rank::world]
    prompts = [build_prompt(tokenizer, r) for r in mine]
    groups = generate(sampler, prompts, 1, args.temperature, args.top_p, args.max_new_tokens,
                      seed=args.seed)  # fmt: skip
    outputs = [g[0].text for g in groups]
    instructions = [r["problem"] for r in mine]
    scores = rm_scores(rm, instructions, outputs) if rm else [None] * len(mine)
    ref_scores = rm_scores(rm, instructions, [r.get("reference") for r in mine]) if rm else scores
    gens = []
    for r, o, g, s, rs in zip(mine, outputs, groups, scores, ref_scores):
        gens.append({"instruction": r["problem"], "output": o, "generator": generator,
                     "dataset": r.get("dataset"), "question_id": r.get("question_id"),
                     "reference": r.get("reference"), "length": len(g[0].token_ids), "score": s,
                     "reference_score": rs})  # fmt: skip
    gens = gather(gens)
    length = float(np.mean([g["length"] for g in gens]))
    result = {"problems": len(gens), "samples": 1, "length": length}
    if rm:  # win 1, tie 0.5, loss 0
        pairs = [(g["score"], g["reference_score"]) for g in gens]
        wins = np.array([((s > rs) + (s >= rs)) / 2 for s, rs in pairs])
        # length in characters, as AlpacaEval measures it: comparable across tokenizers
        lc, coef = lc_win_rate(wins, [len(g["output"]) - len(g["reference"]) for g in gens])
        se = float(wins.std(ddof=1) / math.sqrt(len(wins))) if len(wins) > 1 else 0.0
        means = np.mean(pairs, 0)
        means = {"rm_score": means[0], "reference_rm_score": means[1]}
        result |= {"reward": float(wins.mean()), "reward_se": se, "win_rate": float(wins.mean()),
                   "win_rate_se": se, "lc_win_rate": lc, "lc_coef": coef}  # fmt: skip
        result |= {k: float(v) for k, v in means.items()}
    return result, gens


# ---- Plots, checkpoint selection, command line ----
def plot_runs(runs, path):
    """The paper's Figs. 2-3 from each run's metrics.jsonl, a line per run (labelled by its folder):
    reward, val accuracy, length, entropy, logp_gap and KL against step; val accuracy against the
    logged seconds. A study's mean over seeds: scripts/study.py."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [("step", "reward", "val_reward"), ("step", "length"), ("step", "entropy"),
              ("step", "logp_gap", "kl"), ("seconds", "val_reward")]  # (x, the curves)  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for k, run in enumerate(runs):
        rows = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
        clock = 0.0
        for r in rows:
            r["seconds"] = clock
            clock += sum(r.get(f"time_{t}", 0.0) for t in ("gen", "reward", "train", "sync"))
        for ax, (x, *keys) in zip(axes, panels):
            for key, style in zip(keys, ("-", "--")):
                points = [(r[x], r[key]) for r in rows if r.get(key, math.nan) == r.get(key)]
                dots = key.startswith("val") or len(points) == 1  # offline DPO samples once, at 0
                label = f"{os.path.basename(os.path.normpath(run))} {key}"
                marker = "o" if dots else None
                if points:
                    ax.plot(*zip(*points), style, color=f"C{k}", marker=marker, ms=3, label=label)
    for ax, (x, *keys) in zip(axes, panels):
        ax.set(title=" / ".join(keys), xlabel=x)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def select_checkpoint(args, rank, device):
    """PAPER.md section 6: the checkpoint with the highest mean val reward / mean val response
    length, as logged at its step, else validated now as training does (the run's val set, n=1, its
    max_new_tokens and seed)."""
    run = args.select
    ckpts = checkpoints(run)
    if not ckpts or not os.path.exists(os.path.join(run, "args.json")):
        fail(f"--select {run}: no run with step_NNNNNN checkpoints there")
    run_args = json.load(open(os.path.join(run, "args.json")))
    metrics = os.path.join(run, "metrics.jsonl")
    logged = {}
    for r in map(json.loads, open(metrics)) if os.path.exists(metrics) else []:
        if "val_reward" in r and "val_length" in r:  # validation at the start of step N: N steps in
            logged[r["step"]] = (r["val_reward"], r["val_length"], "log")
    sampler = None
    trust = args.trust_remote_code
    ranking = []
    for path in ckpts:
        step = int(os.path.basename(path)[len("step_") :])
        if step not in logged:
            if sampler is None:  # one sampler for every checkpoint; each one's weights copied in
                rm_path = args.reward_model or run_args.get("reward_model")
                task = {"data": "", "val_data": "", "max_prompt_tokens": 2048} | run_args
                task |= {"model": path, "reward_model": rm_path, "trust_remote_code": trust}
                tokenizer, _, val_rows = load_task(Namespace(**task))
                rm = load_reward_model(rm_path, device, trust)
                max_len = task["max_prompt_tokens"] + run_args["max_new_tokens"]
                seed = run_args["seed"] + rank
                bf16 = run_args.get("bf16") or False
                sampler = make_sampler(args.sampler, path, tokenizer, device, seed,
                                       stop_token_ids(tokenizer), max_len, bf16, args.vllm_memory,
                                       trust)  # fmt: skip
            sync_weights(sampler, load_weights(path).items())
            val = evaluate(sampler, tokenizer, val_rows, max_new_tokens=run_args["max_new_tokens"],
                           seed=run_args["seed"], rm=rm)  # fmt: skip
            logged[step] = (val["reward"], val["length"], "evaluated")
        reward, length, source = logged[step]
        ratio = reward / length if length > 0 else 0.0
        ranking.append({"step": step, "path": path, "val_reward": reward, "val_length": length,
                        "ratio": ratio, "source": source})  # fmt: skip
    ranking.sort(key=lambda r: (-r["ratio"], r["step"]))
    print0(f"{'step':>8} {'val_reward':>11} {'val_length':>11} {'ratio':>10}  source")
    for r in ranking:
        cells = f"{r['step']:>8} {r['val_reward']:>11.4f} {r['val_length']:>11.1f}"
        print0(f"{cells} {r['ratio']:>10.5f}  {r['source']}")
    print0(f"best checkpoint: {ranking[0]['path']}")
    if rank == 0:
        selection = {"best": ranking[0]["path"], "ranking": ranking}
        json.dump(selection, open(os.path.join(run, "selection.json"), "w"), indent=1)


@dataclass
class Args:
    model: str = flag("", "hub id or local folder; empty: the embedded Gemma-3-270M", model=True)
    benchmarks: str = flag("math500,amc23,aime24,gsm8k", "comma-separated: names of "
                           "data.BENCHMARKS, or name=path.jsonl")  # fmt: skip
    data_dir: str = flag("", "folder of local copies (math500.jsonl, ...); else the hub")
    samples: int = flag(50, "per problem (paper: 50); alpaca_eval, arena_hard: 1", min=1)
    temperature: float = flag(0.6, "sampling temperature (paper: 0.6)", min=0)
    top_p: float = flag(0.9, "top-p (paper: 0.9)", gt=0, max=1)
    max_new_tokens: int = flag(1024, "max response tokens (paper trains: 2048)", min=1)
    limit: int = flag(0, "first N problems of each benchmark (0: all)", min=0)
    reward_model: str = flag("", "reward model for rows without an answer ", model=True)
    plot: list[str] = flag([], "run folders: overlay their curves in --out (a .png file) and exit")
    select: str = flag("", "run folder: rank its checkpoints by val reward / val length")
    sampler: str = flag("auto", "vllm, hf or auto", choices=["vllm", "hf", "auto"])
    vllm_memory: float = flag(0.5, "share of GPU memory vLLM may take", gt=0, max=1)
    bf16: bool | None = flag(
        None, "bf16 weights (default: the config's dtype, on a GPU or bf16 CPU)"
    )
    seed: int = flag(0, "sampling seed")
    out: str = flag("", "output folder; empty: runs/eval/<model name>")
    trust_remote_code: bool = flag(False, "allow model code from the hub")


def write_outputs(out, name, gens, generator):
    """<out>/<name>_generations.jsonl; AlpacaEval's submission file; Arena-Hard-Auto's answers."""
    with open(os.path.join(out, f"{name}_generations.jsonl"), "w") as f:
        f.writelines(json.dumps(g) + "\n" for g in gens)
    if name == "alpaca_eval":  # AlpacaEval's submission format
        keys = ("instruction", "output", "generator", "dataset")
        submission = [{k: g[k] for k in keys} for g in gens]
        path = os.path.join(out, "alpaca_eval_model_outputs.json")
        json.dump(submission, open(path, "w"), indent=1)
    if name == "arena_hard":  # Arena-Hard-Auto's model_answer format, for its gen_judgment.py
        with open(os.path.join(out, "arena_hard", "model_answer", f"{generator}.jsonl"), "w") as f:
            for g in gens:
                q = g["question_id"]
                turns = [{"content": g["output"], "token_len": g["length"]}]
                choices = [{"index": 0, "turns": turns}]
                answer = {"question_id": q, "answer_id": f"{generator}-{q}", "model_id": generator,
                          "tstamp": time.time(), "choices": choices}  # fmt: skip
                f.write(json.dumps(answer) + "\n")


def main():
    args = parse_args(Args)
    if args.plot:
        missing = [r for r in args.plot if not os.path.exists(os.path.join(r, "metrics.jsonl"))]
        if missing:
            fail(f"--plot: no metrics.jsonl in {missing[0]}")
        if not args.out.endswith(".png"):
            fail("--plot needs --out FILE.png")
        return plot_runs(args.plot, args.out)
    if args.select:
        rank, world, device = setup_dist()
        return select_checkpoint(args, rank, device)
    # data first: an unknown name or a malformed file fails before any model loads
    specs = [s.strip() for s in args.benchmarks.split(",") if s.strip()]
    for s in specs:
        if "=" not in s and s not in BENCHMARKS:
            known = ", ".join(BENCHMARKS)
            fail(f"--benchmarks: unknown {s!r} (known: {known}; or name=path.jsonl)")
    benchmarks = {s.partition("=")[0]: load_benchmark(s, args.data_dir, args.limit) for s in specs}
    for name, rows in benchmarks.items():
        unanswered = any(r.get("answer") is None for r in rows)
        if name not in JUDGED and not args.reward_model and unanswered:
            fail(f"{name}: rows without an 'answer' need --reward_model")
        if name in JUDGED and args.reward_model and not all(r.get("reference") for r in rows):
            fail(f"{name}: --reward_model compares each output with the row's 'reference', and a "
                 "row has none")  # fmt: skip
    rank, world, device = setup_dist()

    model_path = args.model or default_model_path()
    parts = os.path.normpath(model_path).split(os.sep)  # runs/x/step_000030 -> x_step_000030
    checkpoint = parts[-1].startswith("step_") and len(parts) > 1
    generator = "_".join(parts[-2:]) if checkpoint else parts[-1]
    out = args.out or os.path.join("runs", "eval", generator)
    trust = args.trust_remote_code
    tokenizer = load_tokenizer(model_path, trust)
    rm = load_reward_model(args.reward_model, device, trust)
    max_prompt = max(len(build_prompt(tokenizer, r)) for rows in benchmarks.values() for r in rows)
    # unset: the dtype the model declares (a run that computed in bf16 saves "bfloat16": what it
    # trained and validated is the bf16 cast of its fp32 weights), where the device has bf16 matmul
    from transformers import AutoConfig

    declared = AutoConfig.from_pretrained(model_path, trust_remote_code=trust).dtype
    native = bf16_matmul(device)
    bf16 = native and "bfloat16" in str(declared) if args.bf16 is None else args.bf16
    sampler = make_sampler(args.sampler, model_path, tokenizer, device, args.seed + rank,
                           stop_token_ids(tokenizer), max_prompt + args.max_new_tokens, bf16,
                           args.vllm_memory, trust)  # fmt: skip
    if rank == 0:
        answers = os.path.join(out, "arena_hard", "model_answer")
        os.makedirs(answers if "arena_hard" in benchmarks else out, exist_ok=True)
    summary = {"model": model_path, "sampler": sampler.kind, "samples": args.samples,
               "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
               "max_new_tokens": args.max_new_tokens, "world_size": world, "args": asdict(args),
               "benchmarks": {}}  # fmt: skip
    for name, rows in benchmarks.items():
        t0 = time.time()
        if name in JUDGED:
            result, gens = judged(sampler, tokenizer, rows, args, rm, generator, rank, world)
        else:
            result = evaluate(sampler, tokenizer, rows, args.samples, args.temperature, args.top_p,
                              args.max_new_tokens, args.seed, rm)  # fmt: skip
            gens = gather(result.pop("generations"))
            result["samples"] = args.samples
        summary["benchmarks"][name] = result | {"seconds": time.time() - t0}
        if rank == 0:
            write_outputs(out, name, gens, generator)
        shown = {k: v for k, v in result.items() if not isinstance(v, list)}
        print0(f"{name}: {json.dumps(shown)}")
    if rank == 0:
        json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
    # accuracy: Math-Verify mean over problems x samples; for alpaca_eval, arena_hard the win rate
    header = f"{'problems':>9}{'samples':>8}{'accuracy':>10}{'se':>8}{'length':>9}"
    print0(f"\n{'benchmark':<14}{header}")
    for name, r in summary["benchmarks"].items():
        acc = f"{'-':>10}{'-':>8}"
        if "reward" in r:
            acc = f"{r['reward']:>10.4f}{r['reward_se']:>8.4f}"
        note = ""
        if "lc_win_rate" in r:
            note = f"  (win rate; length-controlled {r['lc_win_rate']:.4f})"
        print0(f"{name:<14}{r['problems']:>9}{r['samples']:>8}{acc}{r['length']:>9.1f}{note}")
    print0(f"model {model_path}, T={args.temperature}, top-p {args.top_p}, "
           f"max_new_tokens {args.max_new_tokens}; written to {out}")  # fmt: skip


if __name__ == "__main__":
    main()
