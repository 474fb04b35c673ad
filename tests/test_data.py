"""The data side: the order of training batches, data rows and pair files (a bad line named by file
and line), prompts over --max_prompt_tokens dropped, the benchmarks' answers, the NuminaMath filter
and scripts/prepare_data.py on local files, the shared local copies of the benchmarks."""

import argparse
import json
import os
import re
import sys

import pytest

from conftest import ROOT, SHARED, metrics, read_jsonl, run_script
from data import gsm8k_answer, load_benchmark, load_rows, load_task, step_batch
from dpo_offline import read_pairs

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import prepare_data  # noqa: E402


def test_step_batch_is_a_function_of_the_step():
    seen = [i for s in range(5) for i in step_batch(10, s, 4, seed=3)]
    # each epoch a permutation
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert step_batch(10, 3, 4, seed=3) == step_batch(10, 3, 4, seed=3)


def test_load_rows_names_file_and_line(tmp_path):
    """Every bad row stops with one line naming the file and the line (blank lines counted)."""
    p = tmp_path / "d.jsonl"
    cases = [
        ('{"question": "1+1?", "answer": 2}\n\n{"problem": "x"\n', r"d\.jsonl:3: not valid JSON"),
        (
            '{"question": "1+1?", "answer": 2}\n{"text": "no problem field"}\n',
            r"d\.jsonl:2: row has no 'problem'",
        ),
        ("[1, 2]\n", r"d\.jsonl:1: not a JSON object"),
        ("", r"d\.jsonl: no rows"),
    ]
    for text, message in cases:
        p.write_text(text)
        with pytest.raises(SystemExit, match=message):
            load_rows(str(p))
    p.write_bytes(b'{"problem": "1+1?", "answer": "2"}\n{"problem": "\xff\xfe"}\n')
    with pytest.raises(SystemExit, match=r"d\.jsonl:2: not UTF-8"):
        load_rows(str(p))
    p.write_text('{"question": "1+1?", "answer": 2}\n{"problem": "Tell a joke."}\n')
    with pytest.raises(SystemExit, match=r"d\.jsonl:2: row has no 'answer'"):
        load_rows(str(p), need_answer=True)
    assert load_rows(str(p)) == [
        {"question": "1+1?", "answer": "2", "problem": "1+1?"},
        {"problem": "Tell a joke."},
    ]


def test_read_pairs_names_file_and_line(tmp_path):
    p = tmp_path / "pairs.jsonl"
    first = '{"prompt": "What is 2 * 3?", "chosen": " 6", "rejected": " 5"}\n'
    p.write_text(first + '\n{"problem": "Hi", "chosen": "a", "rejected": "b"}\n')
    rows = read_pairs(str(p))
    assert [r["problem"] for r in rows] == ["What is 2 * 3?", "Hi"] and rows[0]["chosen"] == " 6"
    p.write_text(first + '\n{"prompt": "x", "chosen": "a"}\n')
    message = r"pairs\.jsonl:3: row needs 'prompt', 'chosen' and 'rejected' text"
    with pytest.raises(SystemExit, match=message):
        read_pairs(str(p))
    p.write_text("\n")
    with pytest.raises(SystemExit, match=r"pairs\.jsonl: no pairs"):
        read_pairs(str(p))
    with pytest.raises(SystemExit, match=r"--pairs \S+missing\.jsonl: no such file"):
        read_pairs(str(tmp_path / "missing.jsonl"))


def task_args(model, **flags):
    """The namespace load_task reads: RunArgs' task flags, as the scripts parse them."""
    task = {"model": model, "trust_remote_code": False, "data": "", "val_data": "", "seed": 0}
    task |= {"val_size": 250, "max_prompt_tokens": 2048, "reward_model": ""}
    return argparse.Namespace(**task | flags)


def test_long_prompts_dropped(tiny_model, tmp_path, capsys):
    rows = [
        {"problem": "What is 2 * 3?", "answer": "6"},
        {"problem": "x" * 5_000_000, "answer": "1"},
        {"problem": "What is 3 * 3? " * 40, "answer": "9"},
    ]
    path = str(tmp_path / "d.jsonl")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = task_args(tiny_model, data=path, val_data=path, val_size=0, max_prompt_tokens=200)
    tokenizer, train, val = load_task(args)
    assert [r["answer"] for r in train] == [r["answer"] for r in val] == ["6"]
    assert "--data: dropped 2 of 3 prompts over --max_prompt_tokens 200" in capsys.readouterr().out
    assert args.model == tiny_model and tokenizer.pad_token_id is not None
    # every prompt too long: one line, naming the flag
    with pytest.raises(SystemExit, match="--data: every prompt is over --max_prompt_tokens 1"):
        load_task(task_args(tiny_model, data=path, max_prompt_tokens=1))


def test_gsm8k_answer_and_last_boxed():
    last_boxed = prepare_data.last_boxed
    assert gsm8k_answer("She pays 1,000 + 234 = <<1000+234=1234>>1234.\n#### 1,234") == "1234"
    assert gsm8k_answer("18") == "18" and gsm8k_answer("#### -3.5") == "-3.5"
    assert last_boxed("so $\\boxed{1}$, then $\\boxed{\\frac{1}{2}}$.") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{\\{1, 2\\} \\cup {3}}") == "\\{1, 2\\} \\cup {3}"
    assert last_boxed("no answer") is None
    assert last_boxed("cut off \\boxed{\\frac{1}{2") is None


def test_numina_filter():
    """Synthetic NuminaMath-CoT rows through the paper's filter (the real split needs the hub)."""
    good = [
        {"problem": f"Compute {k} + 1.", "solution": f"It is $\\boxed{{{k + 1}}}$."}
        | {"source": "olympiads"}
        for k in range(6)
    ]
    bad = [
        {"problem": "Compute 1 + 1.", "solution": "$\\boxed{2}$", "source": s}
        for s in ("orca_math", "synthetic_amc", "synthetic_math")
    ]
    bad += [
        {
            "problem": "Prove that there are infinitely many primes.",
            "solution": "So $\\boxed{\\infty}$",
            "source": "aops_forum",
        },
        {
            "problem": "Show that x > 0.",
            "solution": "Since ... $\\boxed{x > 0}$",
            "source": "olympiads",
        },
        {"problem": "Find x.", "solution": "No boxed answer here.", "source": "olympiads"},
        {
            "problem": "Which is larger? (A) 1 (B) 2 (C) 3",
            "solution": "$\\boxed{3}$",
            "source": "amc_aime",
        },
        {
            "problem": "Which set is empty?\nA: {1}\nB: {}\nC: {2}",
            "solution": "$\\boxed{B}$",
            "source": "cn_k12",
        },
        {
            "problem": "Pick the right one.",
            "solution": "$\\boxed{\\text{(D)}}$",
            "source": "olympiads",
        },
    ]
    train, val, test = prepare_data.numina_splits(bad + good + [dict(good[0])], seed=0, held_out=2)
    assert len(val) == len(test) == 2 and len(train) == 3
    kept = train + val + test
    assert {r["source"] for r in kept} == {"olympiads"}
    assert all(r["problem"].startswith("Compute") for r in kept)
    assert all(r["answer"] == str(int(r["problem"].split()[1]) + 1) for r in kept)

    def order(seed):
        return [r["problem"] for r in sum(prepare_data.numina_splits(good, seed, held_out=2), [])]

    assert order(0) == order(0) != order(1)  # a seeded shuffle
    with pytest.raises(
        SystemExit, match="NuminaMath: 6 problems pass, too few to hold out 3 twice"
    ):
        prepare_data.numina_splits(good, 0, held_out=3)


def test_prepare_data_from_local_files(tiny_model, tmp_path):
    """The paper-scale data command on local files with the hub's columns, then the README's
    paper-scale command (scaled down) on what it wrote."""
    numina = [
        {
            "problem": f"Compute {k} + 1.",
            "solution": f"So $\\boxed{{{k + 1}}}$.",
            "source": "olympiads",
            "messages": [],
        }
        for k in range(12)
    ]
    numina += [
        {
            "problem": "Compute 1 + 1.",
            "solution": "$\\boxed{2}$",
            "source": "orca_math",
            "messages": [],
        },
        {
            "problem": "Prove that 1 < 2.",
            "solution": "Clear.",
            "source": "olympiads",
            "messages": [],
        },
    ]
    chats = [
        {
            "conversation": [
                {"role": "user", "content": f"Tell me about the number {k}."},
                {"role": "assistant", "content": "..."},
            ],
            "language": "English",
            "toxic": False,
            "redacted": False,
        }
        for k in range(8)
    ]
    # dropped, or a duplicate
    chats += [dict(chats[0], language="French"), dict(chats[1], toxic=True), dict(chats[2])]
    (tmp_path / "numina").mkdir()
    (tmp_path / "numina" / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in numina))
    (tmp_path / "wildchat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    data = tmp_path / "data"
    run_script("scripts/prepare_data.py", "--out", data, "--numina_source", tmp_path / "numina",
               "--wildchat_source", tmp_path / "wildchat.jsonl", "--held_out", 2)  # fmt: skip

    def read(name):
        return read_jsonl(data / f"{name}.jsonl")

    assert [len(read(n)) for n in ("numina_train", "numina_val", "numina_test")] == [8, 2, 2]
    for name in ("numina_train", "numina_val"):
        assert all(r["answer"] == str(int(r["problem"].split()[1]) + 1) for r in read(name))
    prompts = [r["prompt"] for r in read("wildchat_1k") + read("wildchat_val")]
    assert sorted(prompts) == sorted(f"Tell me about the number {k}." for k in range(8))
    assert not [f for f in os.listdir(data) if f.endswith(".tmp")]
    out = tmp_path / "run"
    run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "hf",
               "--data", data / "numina_train.jsonl", "--val_data", data / "numina_val.jsonl",
               "--val_size", 0, "--sync", 10, "--ref_sync", "true", "--steps", 1,
               "--prompts_per_step", 4, "--num_responses", 2, "--max_new_tokens", 16,
               "--lr", 1e-6, "--adam_eps", 1e-4, "--grad_clip", 0.1, "--beta", 0.1,
               "--micro_batch", 2, "--vllm_memory", 0.3, "--val_every", 100, "--save_every", 100,
               "--out", out)  # fmt: skip
    assert [r["step"] for r in metrics(out)] == [0, 1]


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="no ../shared/data")
def test_shared_local_copies_load():
    sizes = {"math500": 500, "amc23": 40, "aime24": 30, "gsm8k": 1319, "alpaca_eval": 805}
    for name, n in sizes.items():
        rows = load_benchmark(name, SHARED, 0)
        assert len(rows) == n and all(r["problem"] for r in rows)
        if name == "alpaca_eval":
            assert all(r.get("reference") for r in rows)
        else:
            assert all(r["answer"] for r in rows)
    assert all(re.fullmatch(r"-?[\d.]+", r["answer"]) for r in load_benchmark("gsm8k", SHARED, 0))
