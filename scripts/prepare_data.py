"""The paper's data files (PAPER.md section 5), from the hub or from local copies with its columns:

  python scripts/prepare_data.py --out data

writes data/numina_{train,val,test}.jsonl and data/wildchat_{1k,val}.jsonl.

NuminaMath-CoT -> problems with the final answer of their solution, to train on (numina_train), to
select checkpoints with (numina_val) and to test on (numina_test, eval.py's benchmark of that name).
WildChat-1M -> first-turn English prompts, 1,000 to train on and 470 held out. A source is a hub
dataset (`pip install datasets`), or a JSONL file or folder of them with the hub's columns.

Deviation from the paper: it gives the dropped sources and the sizes, not its proof and
multiple-choice rules or its shuffle; ours (numina_splits) hold out other 1,980 val and test
problems.
"""

import glob
import json
import os
import random
import re
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from data import hub_rows, read_jsonl  # noqa: E402
from flags import fail, flag, parse_args  # noqa: E402


@dataclass
class Args:
    out: str = flag("data", "folder to write the JSONL files to")
    numina_source: str = flag("AI-MO/NuminaMath-CoT", "hub id, or JSONL file or folder of them")
    wildchat_source: str = flag("allenai/WildChat-1M", "hub id, or JSONL file or folder of them")
    held_out: int = flag(1980, "NuminaMath validation and test problems each", min=1)
    seed: int = flag(0, "seed of the shuffles that draw the splits")


def last_boxed(text):
    """Content of the last \\boxed{...} in text (nested braces balanced), or None."""
    i = text.rfind("\\boxed")
    j = i + len("\\boxed")
    if i < 0 or text[j : j + 1] != "{":
        return None
    depth = 0
    for k in range(j, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1 : k]
    return None  # unbalanced: the solution was cut off


NUMINA_DROPPED_SOURCES = {"orca_math", "synthetic_amc", "synthetic_math"}  # PAPER.md section 5
PROOF = re.compile(r"\b(prove|proof|show that|demonstrate that)\b", re.I)
# options "(A) ... (B)", or lines "A: ..." "B: ..."
OPTIONS = re.compile(r"(\(A\)|(^|\n)\s*A[.:：])[\s\S]*(\(B\)|\n\s*B[.:：])")


def numina_splits(rows, seed, held_out):
    """NuminaMath-CoT rows {problem, solution, source} -> (train, val, test) rows {problem, answer:
    the last \\boxed{}}. PAPER.md section 5 drops the synthetic sources; our rules drop proofs
    (prove, show that, or no \\boxed{}) and multiple choice (options (A) (B), lines "A:" "B:", or
    a letter A-E as the answer). Val, then test, held out."""
    kept = []
    for r in rows:
        answer = (last_boxed(r["solution"]) or "").strip()
        letter = re.sub(r"\\text\{|[{}()$\s]", "", answer)
        dropped = r["source"] in NUMINA_DROPPED_SOURCES or not answer or letter in tuple("ABCDE")
        if dropped or PROOF.search(r["problem"]) or OPTIONS.search(r["problem"]):
            continue
        kept.append({"problem": r["problem"], "answer": answer, "source": r["source"]})
    if len(kept) <= 2 * held_out:
        fail(f"NuminaMath: {len(kept)} problems pass, too few to hold out {held_out} twice")
    random.Random(seed).shuffle(kept)
    return kept[2 * held_out :], kept[:held_out], kept[held_out : 2 * held_out]


def wildchat_prompts(rows):
    """First turns of WildChat-1M conversations: English, not toxic or redacted, deduplicated."""
    prompts = set()
    for r in rows:
        first = r["conversation"][0] if r["conversation"] else {}
        if r["language"] == "English" and not r["toxic"] and not r["redacted"]:
            prompts |= {first["content"]} if first.get("role") == "user" else set()
    return sorted(prompts)


def read_source(source, streamed=None):
    """Rows of a JSONL file, of a folder of them, else of a hub dataset (its first `streamed`)."""
    if os.path.exists(source):
        folder = os.path.isdir(source)
        files = sorted(glob.glob(os.path.join(source, "*.jsonl"))) if folder else [source]
        return [r for f in files for _, r in read_jsonl(f)]
    return hub_rows(source, "train", streamed=streamed)


def main():
    args = parse_args(Args)
    train, val, test = numina_splits(read_source(args.numina_source), args.seed, args.held_out)
    prompts = wildchat_prompts(read_source(args.wildchat_source, streamed=100_000))
    random.Random(args.seed).shuffle(prompts)
    if len(prompts) < 1000 + 470:
        print(
            f"WARNING: {len(prompts)} usable WildChat prompts: under 1000 to train + 470 held out"
        )
    files = {"numina_train": train, "numina_val": val, "numina_test": test,
             "wildchat_1k": [{"prompt": p} for p in prompts[:1000]],
             "wildchat_val": [{"prompt": p} for p in prompts[1000:1470]]}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    for name, rows in files.items():
        path = os.path.join(args.out, f"{name}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)  # a killed run leaves no half-written file under the name
        print(f"{path}: {len(rows)} rows")


if __name__ == "__main__":
    main()
