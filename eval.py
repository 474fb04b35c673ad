"""Evaluation and the task: prompts, data rows, rewards (Math-Verify, reward models), benchmarks.

Paper section 6: temperature 0.6, top-p 0.9, 50 samples per problem on benchmarks, 1 in validation. The task
lives here, beside `evaluate` (what the training scripts validate with), because the paper judges rollouts and
benchmark answers with the same verifier.

  python eval.py --model runs/dpo_semionline/step_000030 --benchmarks math500,amc23 --samples 50
  python eval.py --benchmarks math500=my_copy.jsonl --data_dir ~/data --limit 20 --samples 4   # quick look
  python eval.py --select runs/dpo_semionline          # best checkpoint by val reward / val length (section 6)
  python eval.py --model ... --benchmarks alpaca_eval,arena_hard --reward_model Nexusflow/Athene-RM-8B
  python eval.py --prepare_data data                   # NuminaMath splits and WildChat prompts (section 5)
  torchrun --nproc_per_node 8 eval.py --model ... --benchmarks math500,amc23,numina_test   # problems split over ranks

Benchmarks come from `--data_dir/<file>` (JSONL `{"problem", "answer"}`), `name=path.jsonl`, or the hub
(`pip install datasets`). Deliberate deviations from the paper:
  1. AlpacaEval and Arena-Hard: a reward model judges each output against the reference (AlpacaEval's) or
     baseline (Arena-Hard's GPT-4-0314) answer, where the paper uses GPT-4 judges; the length-controlled win
     rate is a two-parameter logistic fit (intercept + length difference in characters), not AlpacaEval's GLM.
     A cheap proxy; the files written alongside are what the real judges take: `alpaca_eval --model_outputs
     <out>/alpaca_eval_model_outputs.json`, and Arena-Hard-Auto's gen_judgment.py on <out>/arena_hard/model_answer.
  2. NuminaMath splits: the paper gives the sources it drops and the sizes, not its proof / multiple-choice
     rules or its shuffle; ours are in `numina_splits`, so our 1,980 test problems are not the paper's.
  3. Models without a chat template get a few-shot math prompt (build_prompt), in training as here.
"""
import glob, json, math, os, random, re, select, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist

from common import (check_model_path, checkpoints, default_model_path, fail, generate, load_tokenizer, load_weights,
                    make_sampler, pad_sequences, parse_args, print0, resolve, setup_dist, sync_weights)

# ---- Prompts and data rows ----

# Paper section 3.2: the math prompt, sent through the tokenizer's chat template (e.g. Llama-3.1-Instruct)
MATH_TEMPLATE = ("Given the following problem, reason and give a final answer to the problem.\nProblem: {problem}\n"
                 'Your response should end with "The final answer is $\\boxed{{[answer]}}$. I hope it is correct." '
                 "where [answer] is the response to the problem.")
# For base models without a chat template: the same answer format, shown three times (with one example the
# embedded Gemma-3-270M copies its answer); a blank line ends a response
FEWSHOT_TEMPLATE = "".join(f"Problem: What is {q}?\nSolution: {q} = {a}. The final answer is $\\boxed{{{{{a}}}}}$. "
                           "I hope it is correct.\n\n" for q, a in (("2 * 9", 18), ("15 + 7", 22), ("6 * 5", 30))) \
    + "Problem: {problem}\nSolution:"
PLAIN_TEMPLATE = "User: {problem}\nAssistant:"  # non-verifiable prompts, base models


def build_prompt(tokenizer, row):
    """Token ids of the prompt for one data row: a row with an `answer` gets the math prompt, one without (a
    non-verifiable instruction, scored by a reward model) is sent as it is."""
    math_row = row.get("answer") is not None
    if tokenizer.chat_template:
        content = MATH_TEMPLATE.format(problem=row["problem"]) if math_row else row["problem"]
        return list(tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    ids = tokenizer((FEWSHOT_TEMPLATE if math_row else PLAIN_TEMPLATE).format(problem=row["problem"]))["input_ids"]
    bos = tokenizer.bos_token_id  # some tokenizers (Gemma's from GGUF) do not add it; models trained with it need it
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def stop_token_ids(tokenizer):
    """EOS, plus the blank line that ends an answer in the few-shot template."""
    ids = [tokenizer.eos_token_id] + ([] if tokenizer.chat_template else tokenizer.encode("\n\n", add_special_tokens=False)[-1:])
    return sorted(set(i for i in ids if i is not None))


def arithmetic_task(seed, n_val=100):
    """The embedded default task: synthetic verifiable arithmetic `a * b` with a one-digit and b up to 19,
    both orders. Gemma-3-270M is right on about a third of its samples at T=1 (most one-digit products,
    few of the rest) and on somewhat under half at the validation T=0.6. Train and val do not overlap."""
    problems = sorted({f"{x} * {y}" for a in range(2, 10) for b in range(2, 20) for x, y in ((a, b), (b, a))})
    random.Random(seed).shuffle(problems)
    rows = [{"problem": f"What is {p}?", "answer": str(eval(p))} for p in problems]
    return rows[n_val:], rows[:n_val]


def read_jsonl(path):
    """(line number, row) for each row of a JSONL file; a bad line stops with one line naming the file and line."""
    numbered = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                fail(f"{path}:{i}: not UTF-8 text (byte {e.start + 1})")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                fail(f"{path}:{i}: not valid JSON ({getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')})")
            if not isinstance(row, dict):
                fail(f"{path}:{i}: not a JSON object")
            numbered.append((i, row))
    return numbered


def load_rows(path, split="train", need_answer=False):
    """JSONL rows {"problem", "answer"} ("prompt" or "question" accepted for "problem"), or a hub dataset."""
    if os.path.exists(path):
        numbered = read_jsonl(path)
    elif path.endswith((".jsonl", ".json")) or path.startswith((".", "/", "~")) or path.count("/") > 1:
        fail(f"{path}: no such file")
    else:
        try:
            import datasets
        except ImportError:
            fail(f"{path}: no such file (and `datasets` is not installed to load it from a hub)")
        numbered = list(enumerate((dict(r) for r in datasets.load_dataset(path, split=split)), 1))
    if not numbered:
        fail(f"{path}: no rows (empty file)")
    for i, r in numbered:
        r["problem"] = r.get("problem", r.get("prompt", r.get("question")))
        if not isinstance(r["problem"], str):
            fail(f"{path}:{i}: row has no 'problem' text (or 'prompt' / 'question')")
        if r.get("answer") is not None:
            r["answer"] = str(r["answer"])
        elif need_answer:
            fail(f"{path}:{i}: row has no 'answer' (rows without one need --reward_model)")
    return [r for _, r in numbered]


def load_task(tokenizer, data, val_data, val_size, seed, max_prompt_tokens, need_answer=True):
    """Training and validation rows (the embedded arithmetic task unless files are given), prompts over
    max_prompt_tokens dropped (and counted), the first val_size validation problems (0: all)."""
    train_rows, val_rows = arithmetic_task(seed)
    train_rows = load_rows(data, "train", need_answer) if data else train_rows
    val_rows = load_rows(val_data, "test", need_answer) if val_data else val_rows
    kept = []
    for name, rows in (("--data", train_rows), ("--val_data", val_rows)):
        # a prompt of more characters than 64 per allowed token is too long without tokenizing it
        short = [r for r in rows if len(r["problem"]) <= 64 * max_prompt_tokens
                 and len(build_prompt(tokenizer, r)) <= max_prompt_tokens]
        if len(short) < len(rows):
            print0(f"{name}: dropped {len(rows) - len(short)} of {len(rows)} prompts over --max_prompt_tokens {max_prompt_tokens}")
        if not short:
            fail(f"{name}: every prompt is over --max_prompt_tokens {max_prompt_tokens}")
        kept.append(short)
    return kept[0], kept[1][:val_size or None]


# ---- Math reward: Math-Verify in a pool of worker processes, started once and awaited before any answer is
# timed, so a hang can be killed and any thread may call it ----

# A worker: plain Python (no torch), reads [response, answer] JSON lines, writes a reward per line
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
_idle, _pool_lock, _pool_size = [], threading.Lock(), [0]
_idle_ready = threading.Condition(_pool_lock)


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
            started = list(pool.map(lambda _: _start_worker(), range(missing)))
        with _pool_lock:
            _idle.extend(started)
            _idle_ready.notify_all()


def _verify(response, answer, timeout):
    """(reward, timed_out) for one answer on an idle worker; a worker that overruns is killed and replaced."""
    with _pool_lock:
        _idle_ready.wait_for(lambda: _idle)  # waiting for a free worker is not verification time
        proc = _idle.pop()
    try:
        proc.stdin.write(json.dumps([str(response), str(answer)]) + "\n")
        if select.select([proc.stdout], [], [], timeout)[0]:
            reward, timed_out = float(proc.stdout.readline()), False
        else:
            proc.kill(), proc.wait()
            reward, timed_out, proc = 0.0, True, _start_worker()
    except (OSError, ValueError):  # the worker died under this answer: reward 0, a new worker
        proc.kill(), proc.wait()
        reward, timed_out, proc = 0.0, False, _start_worker()
    with _pool_lock:
        _idle.append(proc)
        _idle_ready.notify()
    return reward, timed_out


def math_verify(responses, answers, num_workers=None, timeout=10.0):
    """Rewards (1.0 when Math-Verify finds the response's final answer equal to the gold answer, else 0.0) and
    the count of answers scored 0 because their verification ran over `timeout` seconds."""
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
    """Any transformers sequence-classification reward model (one score, `num_labels=1`). A configuration that
    names an Athene architecture (Athene-RM-8B: a Llama with a `v_head`, PAPER.md section 5) or sets
    `cls_token_id` gets the CLS convention; Athene's `v_head` is loaded as the classification head."""
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
    """Score of each (prompt, response): chat-templated [user, assistant] (or prompt + response as text when
    the tokenizer has no template), truncated to max_length, + CLS when the model uses one; a decoder's head
    is read at the last real token (the CLS), an encoder uses its own pooling."""
    tok, model, cls = rm.tokenizer, rm.model, rm.cls_token_id
    seqs = []
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
    """Reward of each response, rows[k] being response k's data row: Math-Verify (0/1) when the row has an
    `answer`, the reward model otherwise, so a mixed batch (paper Table 3) scores each sample by its own reward.
    Returns (rewards, reward_timeouts). Stops the run when most answers time out: zeros would be trained on."""
    rewards, timeouts = [0.0] * len(rows), 0
    for task, idx in (("math", [k for k, r in enumerate(rows) if r.get("answer") is not None]),
                      ("rm", [k for k, r in enumerate(rows) if r.get("answer") is None])):
        if not idx:
            continue
        if task == "math":
            scores, timeouts = math_verify([responses[k] for k in idx], [rows[k]["answer"] for k in idx])
            if timeouts > len(idx) / 2:
                fail(f"Math-Verify timed out on {timeouts} of {len(idx)} answers: rewards would be silent zeros")
        elif rm is None:
            fail("rows without an 'answer' need --reward_model")
        else:
            scores = rm_scores(rm, [rows[k]["problem"] for k in idx], [responses[k] for k in idx])
        for k, x in zip(idx, scores):
            rewards[k] = x
    return rewards, timeouts


def task_sums(rows, rewards):
    """Per-task sums of a mixed batch, to all_reduce and then divide with task_means."""
    m = [x for r, x in zip(rows, rewards) if r.get("answer") is not None]
    o = [x for r, x in zip(rows, rewards) if r.get("answer") is None]
    return {"reward_math": sum(m), "n_math": len(m), "reward_rm": sum(o), "n_rm": len(o)}


def task_means(g):
    """reward_math and reward_rm from all-reduced task_sums, for the tasks present in the batch."""
    return {k: g[k] / g[n] for k, n in (("reward_math", "n_math"), ("reward_rm", "n_rm")) if g[n]}


# ---- Evaluation ----

def evaluate(sampler, tokenizer, rows, samples=1, temperature=0.6, top_p=0.9, max_new_tokens=1024, seed=0, rm=None):
    """Mean reward over problems x samples, its standard error over problems, mean response length. Rows with
    an `answer` are scored by Math-Verify, the others by the reward model `rm` (common.score_responses).
    Under torchrun each rank takes every world-th problem; every rank gets the global result."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
    mine = rows[rank::world]
    groups = generate(sampler, [build_prompt(tokenizer, r) for r in mine], samples, temperature, top_p,
                      max_new_tokens, seed=seed)
    flat, _ = score_responses([r for r in mine for _ in range(samples)], [s.text for g in groups for s in g], rm)
    per_problem = [(sum(flat[i * samples:(i + 1) * samples]) / samples, sum(len(s.token_ids) for s in g) / samples)
                   for i, g in enumerate(groups)]
    generations = [{"problem": r["problem"], "answer": r.get("answer"), "responses": [s.text for s in g],
                    "rewards": flat[i * samples:(i + 1) * samples]} for i, (r, g) in enumerate(zip(mine, groups))]
    per_problem = gather(per_problem, world)
    acc = [a for a, _ in per_problem]
    mean = sum(acc) / len(acc)
    se = math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1) / len(acc)) if len(acc) > 1 else 0.0
    return {"reward": mean, "reward_se": se, "length": sum(l for _, l in per_problem) / len(per_problem),
            "problems": len(acc), "generations": generations}


# ---- Command line ----

@dataclass
class Args:
    model: str = field(default="", metadata={"help": "hub id or local folder; empty: the embedded Gemma-3-270M"})
    benchmarks: str = field(default="math500,amc23,aime24,gsm8k", metadata={
        "help": "comma-separated names from BENCHMARKS (math500, amc23, aime24, gsm8k, numina_test, alpaca_eval, "
                "arena_hard), "
                "or name=path.jsonl"})
    data_dir: str = field(default="", metadata={"help": "folder with local JSONL copies (math500.jsonl, ...); "
                                                "empty or a missing file: the dataset hub"})
    samples: int = field(default=50, metadata={"help": "samples per problem (paper: 50); alpaca_eval, arena_hard 1",
                                               "min": 1})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (paper: 0.6)", "min": 0})
    top_p: float = field(default=0.9, metadata={"help": "top-p (paper: 0.9)", "gt": 0, "max": 1})
    max_new_tokens: int = field(default=1024, metadata={"help": "response length limit (paper trains with 2048)", "min": 1})
    limit: int = field(default=0, metadata={"help": "first N problems of each benchmark (0: all), for quick runs", "min": 0})
    reward_model: str = field(default="", metadata={"help": "sequence-classification reward model for rows without "
                                                    "an 'answer' (win rates of alpaca_eval, arena_hard)"})
    plot: list[str] = field(default_factory=list, metadata={"help": "run folders: overlay their curves in --out "
                                                             "(a .png file) and exit"})
    select: str = field(default="", metadata={"help": "run folder: rank its step_N checkpoints by validation reward / "
                                              "length instead of evaluating --model"})
    prepare_data: str = field(default="", metadata={"help": "folder: write the paper-scale data files there "
                                                    "(numina_{train,val,test}.jsonl, wildchat_{1k,val}.jsonl) and exit"})
    numina_source: str = field(default="AI-MO/NuminaMath-CoT", metadata={"help": "--prepare_data: hub id, or JSONL "
                                                                         "file / folder with the hub's columns"})
    wildchat_source: str = field(default="allenai/WildChat-1M", metadata={"help": "--prepare_data: hub id, or JSONL "
                                                                          "file / folder with the hub's columns"})
    held_out: int = field(default=1980, metadata={"help": "--prepare_data: NuminaMath validation and test problems each",
                                                  "min": 1})
    sampler: str = field(default="auto", metadata={"help": "vllm | hf | auto (vllm when installed)",
                                                   "choices": ["vllm", "hf", "auto"]})
    vllm_memory: float = field(default=0.5, metadata={"help": "fraction of GPU memory vLLM may take", "gt": 0, "max": 1})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 generator weights (default: on CUDA)"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    out: str = field(default="", metadata={"help": "output folder; empty: runs/eval/<model name>"})
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub"})


ARENA_HARD = ["arena-hard-v0.1/question.jsonl", "arena-hard-v0.1/model_answer/gpt-4-0314.jsonl"]
JUDGED = ("alpaca_eval", "arena_hard")  # outputs compared with a reference answer, one sample each
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
    "arena_hard": (ARENA_HARD, "lmarena-ai/arena-hard-auto", None, None, {}),  # arena_hard_rows
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


def numina_splits(rows, seed=0, held_out=NUMINA_HELD_OUT):
    """NuminaMath-CoT rows {problem, solution, source} -> (train, validation, test) rows {problem, answer, source}.
    Filter (PAPER.md section 5; the rules for proofs and multiple choice are ours): drop the synthetic sources;
    drop proofs (the problem says prove / show that, or the solution has no final \\boxed{} answer); drop
    multiple choice (the problem lists options (A) (B) or lines "A:" "B:", or the answer is a bare letter A-E).
    The answer is the solution's last \\boxed{}. A fixed-seed shuffle holds out validation then test."""
    kept = []
    for r in rows:
        answer = (last_boxed(r["solution"]) or "").strip()
        letter = re.sub(r"\\text\{|[{}()$\s]", "", answer)
        if (r["source"] in NUMINA_DROPPED_SOURCES or not answer or PROOF.search(r["problem"])
                or OPTIONS.search(r["problem"]) or letter in ("A", "B", "C", "D", "E")):
            continue
        kept.append({"problem": r["problem"], "answer": answer, "source": r["source"]})
    if len(kept) <= 2 * held_out:
        fail(f"NuminaMath: {len(kept)} problems pass the filter, too few to hold out {held_out} twice (--held_out)")
    random.Random(seed).shuffle(kept)
    return kept[2 * held_out:], kept[:held_out], kept[held_out:2 * held_out]


def read_source(source, streamed=None):
    """Rows of a local JSONL file or folder of them, or of a hub dataset (needs `datasets`; the first
    `streamed` rows only, when given)."""
    if os.path.isdir(source):
        return [r for f in sorted(glob.glob(os.path.join(source, "*.jsonl"))) for _, r in read_jsonl(f)]
    if os.path.exists(source):
        return [r for _, r in read_jsonl(source)]
    try:
        import datasets
    except ImportError:
        fail(f"{source}: no such file (and `datasets` is not installed to read it from the hub)")
    return datasets.load_dataset(source, split="train", streaming=True).take(streamed) if streamed \
        else datasets.load_dataset(source, split="train")


def prepare_data(out, numina_source, wildchat_source, seed=0, held_out=NUMINA_HELD_OUT, wildchat=(1000, 470)):
    """PAPER.md section 5: NuminaMath train / validation / test splits (numina_splits) and WildChat-1M prompts
    (first turns, English, not flagged toxic or redacted, deduplicated; 1,000 to train on, 470 held out for
    checkpoint selection), as JSONL in `out`: the files the README's paper-scale commands read."""
    numina = [{"problem": r["problem"], "solution": r["solution"], "source": r["source"]} for r in read_source(numina_source)]
    train, val, test = numina_splits(numina, seed, held_out)
    prompts = sorted({r["conversation"][0]["content"] for r in read_source(wildchat_source, streamed=100_000)
                      if r["language"] == "English" and not r["toxic"] and not r["redacted"]
                      and r["conversation"] and r["conversation"][0]["role"] == "user"})
    random.Random(seed).shuffle(prompts)
    if len(prompts) < sum(wildchat):
        print0(f"WARNING: {len(prompts)} usable WildChat prompts, fewer than {wildchat[0]} + {wildchat[1]} held out")
    files = {"numina_train": train, "numina_val": val, "numina_test": test,
             "wildchat_1k": [{"prompt": p} for p in prompts[:wildchat[0]]],
             "wildchat_val": [{"prompt": p} for p in prompts[wildchat[0]:sum(wildchat)]]}
    os.makedirs(out, exist_ok=True)
    for name, rows in files.items():
        with open(os.path.join(out, f"{name}.jsonl.tmp"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(os.path.join(out, f"{name}.jsonl.tmp"), os.path.join(out, f"{name}.jsonl"))
        print0(f"{out}/{name}.jsonl: {len(rows)} rows")


def arena_hard_rows(data_dir):
    """Arena-Hard-Auto v0.1: its 500 questions with the baseline's (GPT-4-0314) answers as references, from
    <data_dir> laid out as the benchmark's own data/ folder, else from the hub dataset (files, no `datasets`)."""
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
    else:
        try:
            import datasets  # only needed when there is no local copy
            hub_rows = datasets.load_dataset(hub, config, split=split)
        except Exception as e:
            fail(f"{name}: no local copy ({' or '.join(files)} in --data_dir {data_dir!r}) and the hub dataset "
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


def judged(sampler, tokenizer, rows, args, rm, generator, rank, world):
    """One output per instruction (as AlpacaEval and Arena-Hard take); with a reward model, each output and the
    reference are scored and compared: win 1, tie 0.5, loss 0."""
    mine = rows[rank::world]
    groups = generate(sampler, [build_prompt(tokenizer, r) for r in mine], 1, args.temperature, args.top_p,
                      args.max_new_tokens, seed=args.seed)
    outputs = [g[0].text for g in groups]
    instructions = [r["problem"] for r in mine]
    scores = rm_scores(rm, instructions, outputs) if rm else [None] * len(mine)
    ref_scores = rm_scores(rm, instructions, [r["reference"] for r in mine]) if rm else [None] * len(mine)
    gens = gather([{"instruction": r["problem"], "output": o, "generator": generator, "dataset": r.get("dataset"),
                    "question_id": r.get("question_id"),
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


def plot_runs(runs, path):
    """The curves of the paper's Figs. 2-3 from each run's metrics.jsonl, one line per run (labelled by its
    folder): training reward and validation accuracy, response length, entropy, logp_gap and KL against step,
    and validation accuracy against wall-clock seconds (the sum of time_gen, time_reward, time_train, time_sync)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    panels = [("reward", "val_reward"), ("length",), ("entropy",), ("logp_gap", "kl"), ("val_reward",)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6))
    for k, run in enumerate(runs):
        rows, clock, color = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))], 0.0, f"C{k}"
        for r in rows:
            r["seconds"] = clock
            clock += sum(r.get(t, 0.0) for t in ("time_gen", "time_reward", "time_train", "time_sync"))
        for i, (ax, keys) in enumerate(zip(axes, panels)):
            for key, style in zip(keys, ("-", "--")):
                x = "seconds" if i == len(panels) - 1 else "step"
                pts = [(r[x], r[key]) for r in rows if r.get(key) is not None and r[key] == r[key]]  # no NaN
                if pts:
                    ax.plot(*zip(*pts), style, color=color, marker="o" if key.startswith("val") else None, markersize=3,
                            label=f"{os.path.basename(os.path.normpath(run))} {key}")
    for i, (ax, keys) in enumerate(zip(axes, panels)):
        ax.set(title=" / ".join(keys), xlabel="seconds" if i == len(panels) - 1 else "step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def model_name(path):
    """runs/x/step_000030 -> x_step_000030; meta-llama/Llama-3.1-8B-Instruct -> Llama-3.1-8B-Instruct."""
    parts = os.path.normpath(path).split(os.sep)
    return "_".join(parts[-2:]) if parts[-1].startswith("step_") and len(parts) > 1 else parts[-1]


def select_checkpoint(args, rank, device):
    """PAPER.md section 6: the checkpoint with the highest mean validation reward / mean validation response
    length. Uses the validation the run logged at that step, else validates the checkpoint now exactly as the
    training scripts do (load_task's val set, n=1, T=0.6, top-p 0.9, their max_new_tokens and seed)."""
    run, logged, ranking, sampler = args.select, {}, [], None
    ckpts = checkpoints(run)
    if not ckpts or not os.path.exists(os.path.join(run, "args.json")):
        fail(f"--select {run}: no run with step_NNNNNN checkpoints there")
    run_args = json.load(open(os.path.join(run, "args.json")))
    if os.path.exists(os.path.join(run, "metrics.jsonl")):
        for r in map(json.loads, open(os.path.join(run, "metrics.jsonl"))):
            if "val_reward" in r and "val_length" in r:  # validation at the start of step N = after N optimizer steps
                logged[r["step"]] = (r["val_reward"], r["val_length"])
    for path in ckpts:
        step = int(os.path.basename(path)[len("step_"):])
        source = "log" if step in logged else "evaluated"
        if step not in logged:
            if sampler is None:  # one sampler for every checkpoint; each one's weights are copied in
                tokenizer = load_tokenizer(path, args.trust_remote_code)
                rm_path = args.reward_model or run_args.get("reward_model")
                _, val_rows = load_task(tokenizer, run_args.get("data"), run_args.get("val_data"), run_args["val_size"],
                                        run_args["seed"], run_args.get("max_prompt_tokens", 2048), not rm_path)
                rm = load_reward_model(rm_path, device, trust_remote_code=args.trust_remote_code) if rm_path else None
                sampler = make_sampler(args.sampler, path, tokenizer, device, run_args["seed"] + rank,
                                       stop_token_ids(tokenizer), run_args.get("max_prompt_tokens", 2048)
                                       + run_args["max_new_tokens"], run_args.get("bf16") or False, args.vllm_memory,
                                       args.trust_remote_code)
            sync_weights(sampler, load_weights(path).items())
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
    args = parse_args(Args)
    if args.plot:
        missing = [run for run in args.plot if not os.path.exists(os.path.join(run, "metrics.jsonl"))]
        if missing or not args.out.endswith(".png"):
            fail(f"--plot: no metrics.jsonl in {missing[0]}" if missing else "--plot needs --out FILE.png")
        return plot_runs(args.plot, args.out)
    if args.prepare_data:
        return prepare_data(args.prepare_data, args.numina_source, args.wildchat_source, args.seed, args.held_out)
    if args.model:
        check_model_path(args.model)
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
    generator = model_name(model_path)
    out = args.out or os.path.join("runs", "eval", generator)
    tokenizer = load_tokenizer(model_path, args.trust_remote_code)
    rm = load_reward_model(args.reward_model, device, trust_remote_code=args.trust_remote_code) \
        if args.reward_model else None
    max_prompt = max(len(build_prompt(tokenizer, r)) for rows in benchmarks.values() for r in rows)
    sampler = make_sampler(args.sampler, model_path, tokenizer, device, args.seed + rank, stop_token_ids(tokenizer),
                           max_prompt + args.max_new_tokens, resolve(args.bf16, device.type == "cuda"),
                           args.vllm_memory, args.trust_remote_code)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
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
            gens = gather(result.pop("generations"), world)
            result["samples"] = args.samples
        summary["benchmarks"][name] = result | {"seconds": time.time() - t0}
        if rank == 0:
            with open(os.path.join(out, f"{name}_generations.jsonl"), "w") as f:
                f.writelines(json.dumps(g) + "\n" for g in gens)
            if name == "alpaca_eval":  # AlpacaEval's submission format
                json.dump([{k: g[k] for k in ("instruction", "output", "generator", "dataset")} for g in gens],
                          open(os.path.join(out, "alpaca_eval_model_outputs.json"), "w"), indent=1)
            if name == "arena_hard":  # Arena-Hard-Auto's model_answer format, for its gen_judgment.py
                os.makedirs(os.path.join(out, "arena_hard", "model_answer"), exist_ok=True)
                with open(os.path.join(out, "arena_hard", "model_answer", f"{generator}.jsonl"), "w") as f:
                    f.writelines(json.dumps({"question_id": g["question_id"], "answer_id": f"{generator}-{g['question_id']}",
                                             "model_id": generator, "tstamp": time.time(), "choices": [
                                                 {"index": 0, "turns": [{"content": g["output"], "token_len": g["length"]}]}]})
                                 + "\n" for g in gens)
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
