"""Bad input gets one line and loses nothing; reruns refuse to overwrite; a NaN is skipped, three stop the run;
a run killed with SIGKILL (mid-checkpoint, or at a random step) resumes to the same end; bf16 compute on fp32
master weights moves the weights; Math-Verify holds on any machine; the paper-scale data command."""
import hashlib, json, os, random, signal, subprocess, sys, time

import pytest
import torch

from conftest import ROOT, SMALL, metrics, run_script

SMALL = SMALL[:SMALL.index("--lr")]  # the scripts' own learning rate: these runs check plumbing, not learning
FILES = {"bad3.jsonl": b'{"problem": "1 + 1", "answer": "2"}\n{"problem": "2 + 2", "answer": "4"}\n{"problem": \n',
         "latin1.jsonl": b'{"problem": "1 + 1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n',
         "empty.jsonl": b"", "noanswer.jsonl": b'{"problem": "1 + 1", "answer": "2"}\n{"problem": "Tell a joke."}\n',
         "pairs_bad.jsonl": b'{"prompt": "What is 2 * 3?", "chosen": " 6", "rejected": " 5"}\n{"prompt": "What is 2 * 4?"}\n'}

# (script, flags, what the one line must say); {tmp} is the test's folder, {model} the tiny model
MATRIX = [
    ("dpo_semionline.py", ["--sync", "0"], "--sync 0.0: must be >= 1"),
    ("dpo_semionline.py", ["--sync", "2.5"], "--sync 2.5: must be >= 1 (an integer, or inf)"),
    ("dpo_semionline.py", ["--n", "1"], "--n 1: must be >= 2"),
    ("dpo_semionline.py", ["--sampler", "foo"], "--sampler: invalid choice 'foo'"),
    ("dpo_semionline.py", ["--resume", "/nonexistent"], "--resume /nonexistent: no checkpoint there"),
    ("dpo_semionline.py", ["--lr", "-1"], "--lr -1.0: must be > 0"),
    ("dpo_semionline.py", ["--max_new_tokens", "0"], "--max_new_tokens 0: must be >= 1"),
    ("dpo_semionline.py", ["--prompts_per_step", "0"], "--prompts_per_step 0: must be >= 1"),
    ("dpo_semionline.py", ["--beta", "0"], "--beta 0.0: must be > 0"),
    ("dpo_semionline.py", ["--steps", "0"], "--steps 0: must be >= 1"),
    ("dpo_semionline.py", ["--temperature", "0"], "--temperature 0.0: must be > 0"),
    ("dpo_semionline.py", ["--top_p", "1.5"], "--top_p 1.5: must be > 0 and <= 1"),
    ("dpo_semionline.py", ["--micro_batch", "1"], "--micro_batch 1: must be >= 2"),
    ("dpo_semionline.py", ["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    ("dpo_semionline.py", ["--bf16", "maybe"], "argument --bf16: invalid true_or_false value: 'maybe'"),
    ("dpo_semionline.py", ["--model", "/nonexistent"], "--model /nonexistent: no such model folder"),
    ("grpo.py", ["--reward_model", "./no_rm"], "--reward_model ./no_rm: no such model folder"),
    ("dpo_semionline.py", ["--sync_every", "5"], "unrecognized arguments: --sync_every 5"),
    ("dpo_semionline.py", ["--data", "{tmp}/bad3.jsonl"], "bad3.jsonl:3: not valid JSON"),
    ("dpo_semionline.py", ["--data", "{tmp}/latin1.jsonl"], "latin1.jsonl:2: not UTF-8 text"),
    ("dpo_semionline.py", ["--data", "{tmp}/empty.jsonl"], "empty.jsonl: no rows (empty file)"),
    ("dpo_semionline.py", ["--data", "{tmp}/noanswer.jsonl"], "noanswer.jsonl:2: row has no 'answer'"),
    ("dpo_semionline.py", ["--val_data", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
    ("grpo.py", ["--clip_eps", "0"], "--clip_eps 0.0: must be > 0"),
    ("grpo.py", ["--kl_beta", "-1"], "--kl_beta -1.0: must be >= 0"),
    ("grpo.py", ["--micro_batch", "0"], "--micro_batch 0: must be >= 1"),
    ("group_dpo.py", ["--grpo_alpha", "-0.1"], "--grpo_alpha -0.1: must be >= 0"),
    ("group_dpo.py", ["--sync", "1.5"], "--sync 1.5: must be >= 1 (an integer, or inf)"),
    ("dpo_offline.py", ["--pairs", "/nonexistent.jsonl"], "--pairs /nonexistent.jsonl: no such file"),
    ("dpo_offline.py", ["--pairs", "{tmp}/pairs_bad.jsonl"], "pairs_bad.jsonl:2: row needs 'prompt', 'chosen' and 'rejected'"),
    ("eval.py", ["--benchmarks", "math500,nope"], "--benchmarks: unknown 'nope'"),
    ("eval.py", ["--samples", "0"], "--samples 0: must be >= 1"),
    ("eval.py", ["--benchmarks", "gsm8k={tmp}/bad3.jsonl"], "bad3.jsonl:3: not valid JSON"),
    ("eval.py", ["--benchmarks", "numina_test", "--data_dir", "{tmp}"], "numina_test: no numina_test.jsonl in --data_dir"),
    ("eval.py", ["--select", "{tmp}"], "no run with step_NNNNNN checkpoints there"),
]


@pytest.fixture(scope="module")
def matrix_runs(tiny_model, tmp_path_factory):
    """Every row of MATRIX under `python -O` (no asserts), three at a time: each process mostly imports torch."""
    from concurrent.futures import ThreadPoolExecutor
    def run(case):
        script, flags, _ = case
        tmp = tmp_path_factory.mktemp("bad")
        for name, data in FILES.items():
            (tmp / name).write_bytes(data)
        flags = [f.format(tmp=tmp) for f in flags]
        model = [] if "--model" in flags or script == "eval.py" and "--select" in flags else ["--model", tiny_model]
        out = [] if script == "eval.py" else ["--out", str(tmp / "run")]
        p = subprocess.run([sys.executable, "-O", os.path.join(ROOT, script), *model, *out, *flags], cwd=tmp,
                           capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        return p, os.path.exists(tmp / "run")
    with ThreadPoolExecutor(3) as pool:
        return dict(zip(range(len(MATRIX)), pool.map(run, MATRIX)))


@pytest.mark.parametrize("case", range(len(MATRIX)), ids=[f"{s}:{' '.join(f)}" for s, f, _ in MATRIX])
def test_bad_input_is_one_line(matrix_runs, case):
    """Exit 1 or 2, one line on stderr naming the problem, no traceback, no model loaded, no --out left behind."""
    script, _, message = MATRIX[case]
    p, out_left = matrix_runs[case]
    lines = p.stderr.strip().splitlines()
    assert p.returncode in (1, 2) and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[0].startswith(f"{script}: error: ") and message in lines[0], lines[0]
    assert "Loading weights" not in p.stdout and not out_left


def tree(folder):
    """Every file under folder with a hash of its bytes."""
    return {os.path.relpath(os.path.join(d, f), folder): hashlib.md5(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, files in os.walk(folder) for f in files}


def test_rerun_into_same_out_is_refused(tiny_model, tmp_path):
    out = str(tmp_path / "run")
    args = ["--model", tiny_model, "--sampler", "hf", "--steps", 1, "--out", out, *SMALL]
    run_script("dpo_semionline.py", *args)
    before = tree(out)
    p = run_script("dpo_semionline.py", *args, check=False)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [
        f"dpo_semionline.py: error: --out {out} already holds a run: --resume {out} continues it, --overwrite replaces it"]
    assert tree(out) == before  # nothing of the first run changed
    (tmp_path / "run" / "stale.txt").write_text("from before")
    run_script("dpo_semionline.py", *args, "--overwrite", "--steps", 2)
    assert not os.path.exists(tmp_path / "run" / "stale.txt")
    assert [r["step"] for r in metrics(out) if "loss" in r] == [0, 1]


def test_long_prompts_dropped(tiny_model, tmp_path, capsys):
    from common import load_tokenizer
    from data import load_task
    rows = [{"problem": "What is 2 * 3?", "answer": "6"}, {"problem": "x" * 5_000_000, "answer": "1"},
            {"problem": "What is 3 * 3? " * 40, "answer": "9"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, val = load_task(load_tokenizer(tiny_model), str(tmp_path / "d.jsonl"), str(tmp_path / "d.jsonl"), 0, 0, 200)
    assert [r["answer"] for r in train] == [r["answer"] for r in val] == ["6"]
    assert "--data: dropped 2 of 3 prompts over --max_prompt_tokens 200" in capsys.readouterr().out


def run_patched(tmp_path, patch, script, *args):
    """Runs a script as `python script.py` with `patch` (Python source) applied to the modules first: faults are
    injected from the test, the scripts hold no hook for them."""
    wrapper = tmp_path / "patched.py"
    wrapper.write_text(f"import runpy, sys, time\nsys.path.insert(0, {ROOT!r})\nimport common, data, eval, torch\n{patch}\n"
                       f"sys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    return subprocess.Popen([sys.executable, str(wrapper), os.path.join(ROOT, script), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# the loss of every micro-batch of the listed steps becomes NaN (step read where the loop asks for its batch)
NAN_PATCH = """
nan_steps, current = {steps}, [0]
step_batch, dpo_loss = data.step_batch, common.dpo_loss
data.step_batch = lambda n, step, *a: current.__setitem__(0, step) or step_batch(n, step, *a)
def nan_dpo_loss(*a):
    losses, diagnostics = dpo_loss(*a)
    return losses * (float("nan") if current[0] in nan_steps else 1.0), diagnostics
common.dpo_loss = nan_dpo_loss
"""


def test_nan_step_is_skipped(tiny_model, tmp_path):
    out = str(tmp_path / "run")
    p = run_patched(tmp_path, NAN_PATCH.format(steps="{1}"), "dpo_semionline.py", "--model", tiny_model, "--sampler",
                    "hf", "--steps", 3, "--sync", 1, "--lr", 1e-3, "--out", out, *SMALL)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    train = [r for r in metrics(out) if "loss" in r]
    assert [r["skipped_steps"] for r in train] == [0, 1, 1]
    assert train[1]["grad_norm"] != train[1]["grad_norm"] and train[2]["grad_norm"] == train[2]["grad_norm"]  # nan, then not


def test_three_nans_in_a_row_stop_the_run(tiny_model, tmp_path):
    out = str(tmp_path / "run")
    p = run_patched(tmp_path, NAN_PATCH.format(steps="range(1, 99)"), "dpo_semionline.py", "--model", tiny_model,
                    "--sampler", "hf", "--steps", 6, "--save_every", 1, "--lr", 1e-3, "--out", out, *SMALL)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 1 and stderr.strip().splitlines()[-1] == (
        f"dpo_semionline.py: error: non-finite loss or gradient norm 3 steps in a row (steps 1-3), updates skipped: "
        f"stopping; the last checkpoint in {out} is intact"), stderr[-3000:]
    from common import checkpoints, load_weights
    assert [os.path.basename(c) for c in checkpoints(out)] == ["step_000001", "step_000002", "step_000003"]
    good = load_weights(os.path.join(out, "step_000001"))
    for c in checkpoints(out):  # every update after step 0 was skipped: the same finite weights throughout
        w = load_weights(c)
        assert w and all(torch.isfinite(v).all() and torch.equal(v, good[k]) for k, v in w.items())
    assert [r["skipped_steps"] for r in metrics(out) if "loss" in r] == [0, 1, 2, 3]


# the second checkpoint's trainer_state.pt is where the run is killed: model weights written, state not yet
SLOW_SAVE = """
save, calls = torch.save, [0]
def slow_save(obj, path, *a, **k):
    calls[0] += 1
    if calls[0] == 2:
        open(path + ".killme", "w").close()
        time.sleep(600)
    return save(obj, path, *a, **k)
torch.save = slow_save
"""


def test_sigkill_mid_checkpoint_and_at_a_random_step_then_resume(tiny_model, tmp_path):
    """An uninterrupted run, and the same run killed with SIGKILL while writing step_000004 and again at a random
    moment after that, each time resumed: every checkpoint is whole, the metrics have each step once, and the
    final weights are the uninterrupted run's (same data order, same samples: the HF sampler is seeded per call)."""
    args = ["--model", tiny_model, "--sampler", "hf", "--steps", 6, "--save_every", 2, "--sync", 2, "--lr", 1e-3, *SMALL]
    ref = run_script("dpo_semionline.py", *args, "--out", tmp_path / "ref")
    out = tmp_path / "run"
    p = run_patched(tmp_path, SLOW_SAVE, "dpo_semionline.py", *args, "--out", out)
    deadline = time.time() + 300
    while not os.path.exists(out / "step_000004.tmp" / "trainer_state.pt.killme") and time.time() < deadline:
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(out / "step_000004.tmp" / "model.safetensors")  # killed mid-save
    from common import checkpoints
    assert [os.path.basename(c) for c in checkpoints(out)] == ["step_000002"]
    # resume, and kill again at a random moment once it is under way (steps take about a second here)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "dpo_semionline.py"), *map(str, args), "--out", out,
                          "--resume", out], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert "resumed from" in p.stdout.readline() + p.stdout.readline()
    delay = random.uniform(0, 3)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = run_script("dpo_semionline.py", *args, "--out", out, "--resume", out)
    assert [os.path.basename(c) for c in checkpoints(out)] == ["step_000002", "step_000004", "step_000006"], delay
    assert not any(f.endswith((".tmp", ".old")) for f in os.listdir(out))
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(6)), delay
    finger = lambda p: [l for l in p.stdout.splitlines() if "fingerprint" in l]
    assert finger(done) == finger(ref), (delay, finger(done), finger(ref))
    ref_rows = [r for r in metrics(tmp_path / "ref") if "loss" in r]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-6)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bf16_compute_moves_fp32_master_weights(tiny_model, rm_task, tmp_path, device):
    """One step at the paper's lr 1e-6 with bf16 compute moves nearly every weight; the checkpoint is fp32. With
    bf16 parameters (AdamW updating them in bf16) about 0.5% of them moved, measured on this model."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    out = str(tmp_path / "run")
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    # reward-model prompts: every prompt's responses get distinct scores, so the step has pairs by construction
    run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "hf", "--steps", 1, "--bf16", "true", "--lr", 1e-6,
               "--prompts_per_step", 8, "--n", 4, "--max_new_tokens", 48, "--val_size", 4, "--data", rm_task[0],
               "--val_data", rm_task[0], "--reward_model", rm_task[1], "--out", out, env=env)
    assert metrics(out)[0]["pairs"] > 0
    from common import load_weights
    seed, trained = load_weights(tiny_model), load_weights(os.path.join(out, "step_000001"))
    assert trained and all(v.dtype == torch.float32 for v in trained.values())
    names = [k for k in seed if "embed_tokens" not in k]
    moved = sum((seed[k] != trained[k]).sum().item() for k in names) / sum(seed[k].numel() for k in names)
    assert moved >= 0.95, moved


def test_math_rewards_hold_with_16_workers_on_2_cores():
    """From a process that imported torch and transformers: 64 plainly correct answers, 16 workers, twice."""
    code = ("import torch, transformers, transformers.models.llama\nfrom eval import math_rewards\n"
            "responses = [f'{a} * 6 = {a * 6}. The final answer is $\\\\boxed{{{a * 6}}}$.' for a in range(64)]\n"
            "for _ in range(2):\n    print(sum(math_rewards(responses, [str(a * 6) for a in range(64)], num_workers=16)))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.split() == ["64.0", "64.0"], p.stdout + p.stderr[-3000:]


def test_reward_timeouts_counted_and_fatal():
    """The pool's own machinery with a stand-in worker that hangs on demand: a hung answer is scored 0 and counted,
    its worker replaced; when most answers of a batch time out the run stops."""
    worker = ("import sys, time\nprint('ready', flush=True)\nfor line in sys.stdin:\n"
              "    time.sleep(1000 if 'hang' in line else 0)\n    print(1.0, flush=True)\n")
    code = (f"import eval\neval._WORKER = {worker!r}\n"
            "print(eval.math_verify(['ok', 'hang', 'ok', 'hang'], ['1'] * 4, num_workers=2, timeout=1.0))\n"
            "print(eval.math_verify(['ok'] * 3, ['1'] * 3, num_workers=2, timeout=1.0))\n"
            "eval.score_responses([{'problem': 'p', 'answer': '1'}] * 3, ['hang', 'hang', 'ok'])\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.stdout.splitlines() == ["([1.0, 0.0, 1.0, 0.0], 2)", "([1.0, 1.0, 1.0], 0)"], p.stdout + p.stderr
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == (
        "-c: error: Math-Verify timed out on 2 of 3 answers: rewards would be silent zeros"), p.stderr


def test_math_verify_that_cannot_start_stops_with_one_line():
    code = "import eval\neval._WORKER = 'raise SystemExit(3)'\neval.math_rewards(['$\\\\boxed{1}$'], ['1'])\n"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "Math-Verify could not start (its worker exited" in p.stderr.strip().splitlines()[-1]


def test_prepare_data_from_local_files(tiny_model, tmp_path):
    """The paper-scale data command on local files with the hub's columns, then the README's paper-scale command
    (scaled down) on what it wrote."""
    numina = [{"problem": f"Compute {k} + 1.", "solution": f"So $\\boxed{{{k + 1}}}$.", "source": "olympiads",
               "messages": []} for k in range(12)]
    numina += [{"problem": "Compute 1 + 1.", "solution": "$\\boxed{2}$", "source": "orca_math", "messages": []},
               {"problem": "Prove that 1 < 2.", "solution": "Clear.", "source": "olympiads", "messages": []}]
    chats = [{"conversation": [{"role": "user", "content": f"Tell me about the number {k}."},
                               {"role": "assistant", "content": "..."}], "language": "English", "toxic": False,
              "redacted": False} for k in range(8)]
    chats += [dict(chats[0], language="French"), dict(chats[1], toxic=True), dict(chats[2])]  # dropped, or a duplicate
    (tmp_path / "numina").mkdir()
    (tmp_path / "numina" / "part0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in numina))
    (tmp_path / "wildchat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chats))
    data = tmp_path / "data"
    run_script("data.py", "--out", data, "--numina_source", tmp_path / "numina", "--wildchat_source",
               tmp_path / "wildchat.jsonl", "--held_out", 2)
    read = lambda name: [json.loads(l) for l in open(data / f"{name}.jsonl")]
    assert [len(read(n)) for n in ("numina_train", "numina_val", "numina_test")] == [8, 2, 2]
    assert all(r["answer"] == str(int(r["problem"].split()[1]) + 1) for n in ("numina_train", "numina_val")
               for r in read(n))
    prompts = [r["prompt"] for r in read("wildchat_1k") + read("wildchat_val")]
    assert sorted(prompts) == sorted(f"Tell me about the number {k}." for k in range(8))
    out = tmp_path / "run"
    run_script("dpo_semionline.py", "--model", tiny_model, "--sampler", "hf", "--data", data / "numina_train.jsonl",
               "--val_data", data / "numina_val.jsonl", "--val_size", 0, "--sync", 10, "--ref_sync", "true", "--steps", 1,
               "--prompts_per_step", 4, "--num_responses", 2, "--max_new_tokens", 16, "--lr", 1e-6, "--adam_eps", 1e-4,
               "--grad_clip", 0.1, "--beta", 0.1, "--micro_batch", 2, "--vllm_memory", 0.3, "--val_every", 100,
               "--save_every", 100, "--out", out)
    assert [r["step"] for r in metrics(out)] == [0, 1]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from /proc")
def test_process_group_is_destroyed_at_exit(tiny_model, tmp_path):
    """2 ranks: setup_dist, then what every script does next (load the tokenizer, which imports torch._dynamo),
    then the exit's destroy_process_group: no gloo thread may outlive it (one that did aborted the exit, SIGABRT)."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"import atexit, os, sys\nsys.path.insert(0, {ROOT!r})\n"
                     "from common import all_gather, load_tokenizer, setup_dist\n"
                     "def gloo_threads():  # runs after setup_dist's own exit handler, destroy_process_group\n"
                     "    names = [open(f'/proc/self/task/{t}/comm').read() for t in os.listdir('/proc/self/task')]\n"
                     "    sys.stdout.write(f'gloo threads after destroy: {sum(\"gloo\" in n for n in names)}\\n')\n"
                     f"atexit.register(gloo_threads); setup_dist(); load_tokenizer({tiny_model!r}); all_gather(1)\n")
    p = run_script(probe, nproc=2, timeout=300)  # an absolute path: os.path.join keeps it
    assert p.stdout.count("gloo threads after destroy: 0") == 2, p.stdout
