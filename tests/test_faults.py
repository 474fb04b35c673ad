"""Faults: bad input gets one line and loses nothing; reruns refuse to overwrite; a NaN is skipped,
three stop the run; a run killed with SIGKILL (mid-checkpoint, or at a random step) resumes to the
same end; bf16 compute on fp32 master weights moves the weights."""

import hashlib
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, SMALL, metrics, rm_flags, run_script
from flags import checkpoints, load_weights

SMALL = SMALL[: SMALL.index("--lr")]  # the scripts' own learning rate: these runs check plumbing
FILES = {
    "bad3.jsonl": b'{"problem": "1 + 1", "answer": "2"}\n{"problem": "2 + 2", "answer": "4"}\n'
    b'{"problem": \n',
    "latin1.jsonl": b'{"problem": "1 + 1", "answer": "2"}\n{"problem": "caf\xe9", "answer": "1"}\n',
    "empty.jsonl": b"",
    "noanswer.jsonl": b'{"problem": "1 + 1", "answer": "2"}\n{"problem": "Tell a joke."}\n',
    "pairs_bad.jsonl": b'{"prompt": "What is 2 * 3?", "chosen": " 6", "rejected": " 5"}\n'
    b'{"prompt": "What is 2 * 4?"}\n',
}

# (script, flags, what the one line must say); {tmp} is the row's folder
MATRIX = [
    ("dpo_semionline.py", ["--sync", "0"], "--sync 0.0: must be >= 1 (an integer, or inf)"),
    ("dpo_semionline.py", ["--sync", "2.5"], "--sync 2.5: must be >= 1 (an integer, or inf)"),
    ("dpo_semionline.py", ["--n", "1"], "--n 1: must be >= 2"),
    ("dpo_semionline.py", ["--sampler", "foo"], "--sampler: invalid choice 'foo'"),
    (
        "dpo_semionline.py",
        ["--resume", "/nonexistent"],
        "--resume /nonexistent: no checkpoint there",
    ),
    ("dpo_semionline.py", ["--lr", "-1"], "--lr -1.0: must be > 0"),
    ("dpo_semionline.py", ["--max_new_tokens", "0"], "--max_new_tokens 0: must be >= 1"),
    ("dpo_semionline.py", ["--prompts_per_step", "0"], "--prompts_per_step 0: must be >= 1"),
    ("dpo_semionline.py", ["--beta", "0"], "--beta 0.0: must be > 0"),
    ("dpo_semionline.py", ["--steps", "0"], "--steps 0: must be >= 1"),
    ("dpo_semionline.py", ["--temperature", "0"], "--temperature 0.0: must be > 0"),
    ("dpo_semionline.py", ["--top_p", "1.5"], "--top_p 1.5: must be > 0 and <= 1"),
    ("dpo_semionline.py", ["--micro_batch", "1"], "--micro_batch 1: must be >= 2"),
    ("dpo_offline.py", ["--micro_batch", "1"], "--micro_batch 1: must be >= 2"),
    ("dpo_semionline.py", ["--lr", "abc"], "argument --lr: invalid float value: 'abc'"),
    (
        "dpo_semionline.py",
        ["--bf16", "maybe"],
        "argument --bf16: invalid true_or_false value: 'maybe'",
    ),
    (
        "dpo_semionline.py",
        ["--model", "/nonexistent"],
        "--model /nonexistent: no such model folder",
    ),
    ("grpo.py", ["--reward_model", "./no_rm"], "--reward_model ./no_rm: no such model folder"),
    ("dpo_semionline.py", ["--sync_every", "5"], "unrecognized arguments: --sync_every 5"),
    ("dpo_semionline.py", ["--data", "{tmp}/bad3.jsonl"], "{tmp}/bad3.jsonl:3: not valid JSON"),
    ("dpo_semionline.py", ["--data", "{tmp}/latin1.jsonl"], "{tmp}/latin1.jsonl:2: not UTF-8 text"),
    (
        "dpo_semionline.py",
        ["--data", "{tmp}/empty.jsonl"],
        "{tmp}/empty.jsonl: no rows (empty file)",
    ),
    (
        "dpo_semionline.py",
        ["--data", "{tmp}/noanswer.jsonl"],
        "{tmp}/noanswer.jsonl:2: row has no 'answer'",
    ),
    (
        "dpo_semionline.py",
        ["--val_data", "{tmp}/missing.jsonl"],
        "{tmp}/missing.jsonl: no such file",
    ),
    ("grpo.py", ["--clip_eps", "0"], "--clip_eps 0.0: must be > 0"),
    ("grpo.py", ["--kl_beta", "-1"], "--kl_beta -1.0: must be >= 0"),
    ("grpo.py", ["--micro_batch", "0"], "--micro_batch 0: must be >= 1"),
    ("group_dpo.py", ["--grpo_alpha", "-0.1"], "--grpo_alpha -0.1: must be >= 0"),
    ("group_dpo.py", ["--sync", "1.5"], "--sync 1.5: must be >= 1 (an integer, or inf)"),
    (
        "dpo_offline.py",
        ["--pairs", "/nonexistent.jsonl"],
        "--pairs /nonexistent.jsonl: no such file",
    ),
    (
        "dpo_offline.py",
        ["--pairs", "{tmp}/pairs_bad.jsonl"],
        "{tmp}/pairs_bad.jsonl:2: row needs 'prompt', 'chosen' and 'rejected'",
    ),
    ("eval.py", ["--benchmarks", "math500,nope"], "--benchmarks: unknown 'nope'"),
    ("eval.py", ["--samples", "0"], "--samples 0: must be >= 1"),
    ("eval.py", ["--benchmarks", "gsm8k={tmp}/bad3.jsonl"], "{tmp}/bad3.jsonl:3: not valid JSON"),
    (
        "eval.py",
        ["--benchmarks", "numina_test", "--data_dir", "{tmp}"],
        "numina_test: no numina_test.jsonl in --data_dir '{tmp}' "
        "(scripts/prepare_data.py writes it)",
    ),
    ("eval.py", ["--select", "{tmp}"], "--select {tmp}: no run with step_NNNNNN checkpoints there"),
]


@pytest.fixture(scope="module")
def matrix_runs(tiny_model, tmp_path_factory):
    """Every row of MATRIX under `python -O` (no asserts), three at a time: each process mostly
    imports torch. Returns (process, --out left behind?, the row's folder) by row."""
    from concurrent.futures import ThreadPoolExecutor

    def run(case):
        script, flags, _ = case
        tmp = tmp_path_factory.mktemp("bad")
        for name, data in FILES.items():
            (tmp / name).write_bytes(data)
        flags = [f.format(tmp=tmp) for f in flags]
        no_model = "--model" in flags or script == "eval.py" and "--select" in flags
        model = [] if no_model else ["--model", tiny_model]
        out = [] if script == "eval.py" else ["--out", str(tmp / "run")]
        cmd = [sys.executable, "-O", os.path.join(ROOT, script), *model, *out, *flags]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        p = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=600, env=env)
        return p, os.path.exists(tmp / "run"), tmp

    with ThreadPoolExecutor(3) as pool:
        return dict(zip(range(len(MATRIX)), pool.map(run, MATRIX)))


@pytest.mark.parametrize(
    "case", range(len(MATRIX)), ids=[f"{s}:{' '.join(f)}" for s, f, _ in MATRIX]
)
def test_bad_input_is_one_line(matrix_runs, case):
    """Exit 1 or 2, one line on stderr naming the problem, no traceback, no model loaded, no --out
    left behind."""
    script, _, message = MATRIX[case]
    p, out_left, tmp = matrix_runs[case]
    lines = p.stderr.strip().splitlines()
    assert p.returncode in (1, 2) and len(lines) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[0].startswith(f"{script}: error: ")
    assert message.format(tmp=tmp) in lines[0], lines[0]
    assert "Loading weights" not in p.stdout and not out_left


def tree(folder):
    """Every file under folder with a hash of its bytes."""
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
    return {
        os.path.relpath(f, folder): hashlib.md5(open(f, "rb").read()).hexdigest() for f in files
    }


def test_rerun_into_same_out_is_refused(tiny_model, tmp_path):
    out = str(tmp_path / "run")
    args = ["--model", tiny_model, "--sampler", "hf", "--steps", 1, "--out", out, *SMALL]
    run_script("dpo_semionline.py", *args)
    before = tree(out)
    p = run_script("dpo_semionline.py", *args, check=False)
    message = (
        f"dpo_semionline.py: error: --out {out} already holds a run: --resume {out} continues it, "
        "--overwrite replaces it"
    )
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [message]
    assert tree(out) == before  # nothing of the first run changed
    (tmp_path / "run" / "stale.txt").write_text("from before")
    run_script("dpo_semionline.py", *args, "--overwrite", "--steps", 2)
    assert not os.path.exists(tmp_path / "run" / "stale.txt")
    assert [r["step"] for r in metrics(out) if "loss" in r] == [0, 1]


def run_patched(tmp_path, patch, script, *args):
    """Runs a script as `python script.py` with `patch` (Python source) applied to the modules
    first: faults are injected from the test, the scripts hold no hook for them."""
    wrapper = tmp_path / "patched.py"
    wrapper.write_text(
        f"import runpy, sys, time\nsys.path.insert(0, {ROOT!r})\nimport common, data, eval, torch\n"
        f"{patch}\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    cmd = [sys.executable, str(wrapper), os.path.join(ROOT, script), *map(str, args)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    return subprocess.Popen(cmd, cwd=ROOT, text=True, **pipes)


# the loss of every micro-batch of the listed steps becomes NaN (step read where the loop asks for
# its batch: with --sync 1, at its own step)
NAN_PATCH = """
nan_steps = {steps}
current = [0]
step_batch = data.step_batch
dpo_loss = common.dpo_loss
data.step_batch = lambda n, step, *a: current.__setitem__(0, step) or step_batch(n, step, *a)
def nan_dpo_loss(*a):
    losses, diagnostics = dpo_loss(*a)
    return losses * (float("nan") if current[0] in nan_steps else 1.0), diagnostics
common.dpo_loss = nan_dpo_loss
"""


def test_nan_step_is_skipped(tiny_model, tmp_path):
    out = str(tmp_path / "run")
    p = run_patched(tmp_path, NAN_PATCH.format(steps="{1}"), "dpo_semionline.py", "--model",
                    tiny_model, "--sampler", "hf", "--steps", 3, "--sync", 1, "--lr", 1e-3,
                    "--out", out, *SMALL)  # fmt: skip
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    train = [r for r in metrics(out) if "loss" in r]
    assert [r["skipped_steps"] for r in train] == [0, 1, 1]
    assert math.isnan(train[1]["grad_norm"]) and not math.isnan(train[2]["grad_norm"])


def test_three_nans_in_a_row_stop_the_run(tiny_model, rm_task, tmp_path):
    out = str(tmp_path / "run")
    # reward-model prompts: every step has pairs, so its loss goes through the patched dpo_loss
    p = run_patched(tmp_path, NAN_PATCH.format(steps="range(1, 99)"), "dpo_semionline.py",
                    "--model", tiny_model, "--sampler", "hf", "--steps", 6, "--save_every", 1,
                    "--sync", 1, "--lr", 1e-3, "--out", out, *SMALL,
                    *rm_flags(rm_task))  # fmt: skip
    stdout, stderr = p.communicate(timeout=600)
    message = (
        "dpo_semionline.py: error: non-finite loss or gradient norm 3 steps in a row (steps 1-3), "
        f"updates skipped: stopping; the last checkpoint in {out} is intact"
    )
    assert p.returncode == 1 and stderr.strip().splitlines()[-1] == message, stderr[-3000:]
    steps = ["step_000001", "step_000002", "step_000003"]
    assert [os.path.basename(c) for c in checkpoints(out)] == steps
    good = load_weights(os.path.join(out, "step_000001"))
    for c in checkpoints(out):  # every update after step 0 was skipped: the same finite weights
        w = load_weights(c)
        assert w and all(torch.isfinite(v).all() and torch.equal(v, good[k]) for k, v in w.items())
    assert [r["skipped_steps"] for r in metrics(out) if "loss" in r] == [0, 1, 2, 3]


# the second checkpoint's trainer_state.pt is where the run is killed: model weights written, state
# not yet
SLOW_SAVE = """
save = torch.save
calls = [0]
def slow_save(obj, path, *a, **k):
    calls[0] += 1
    if calls[0] == 2:
        open(path + ".killme", "w").close()
        time.sleep(600)
    return save(obj, path, *a, **k)
torch.save = slow_save
"""


def fingerprints(p):
    return [line for line in p.stdout.splitlines() if "fingerprint" in line]


def test_sigkill_mid_checkpoint_and_at_a_random_step_then_resume(tiny_model, tmp_path):
    """An uninterrupted run, and the same run killed with SIGKILL while writing step_000004 and
    again at a random moment after that, each time resumed: every checkpoint is whole, the metrics
    have each step once, and the final weights are the uninterrupted run's (same data order, same
    samples: the HF sampler is seeded per call)."""
    args = ["--model", tiny_model, "--sampler", "hf", "--steps", 6, "--save_every", 2, "--sync", 2]
    args += ["--lr", 1e-3, *SMALL]
    ref = run_script("dpo_semionline.py", *args, "--out", tmp_path / "ref")
    out = tmp_path / "run"
    p = run_patched(tmp_path, SLOW_SAVE, "dpo_semionline.py", *args, "--out", out)
    deadline = time.time() + 300
    killme = out / "step_000004.tmp" / "trainer_state.pt.killme"
    while not os.path.exists(killme) and time.time() < deadline:
        assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert os.path.exists(out / "step_000004.tmp" / "model.safetensors")  # killed mid-save
    assert [os.path.basename(c) for c in checkpoints(out)] == ["step_000002"]
    # resume, and kill again at a random moment once it is under way (steps take about a second)
    cmd = [sys.executable, os.path.join(ROOT, "dpo_semionline.py"), *map(str, args), "--out", out]
    cmd += ["--resume", out]
    p = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    assert "resumed from" in p.stdout.readline() + p.stdout.readline()
    delay = random.uniform(0, 3)
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = run_script("dpo_semionline.py", *args, "--out", out, "--resume", out)
    steps = ["step_000002", "step_000004", "step_000006"]
    assert [os.path.basename(c) for c in checkpoints(out)] == steps, delay
    assert not any(f.endswith((".tmp", ".old")) for f in os.listdir(out))
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(6)), delay
    assert fingerprints(done) == fingerprints(ref), (delay, fingerprints(done), fingerprints(ref))
    ref_rows = [r for r in metrics(tmp_path / "ref") if "loss" in r]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-6)


HEAP_PROBE = """
import ctypes, torch, torch.nn.functional as F
import flags  # sets the oneDNN cache sizes
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks"
                " uordblks fordblks keepcost".split()]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
w = torch.randn(256, 128, dtype=torch.bfloat16)
F.linear(torch.randn(1, 128, dtype=torch.bfloat16), w)
held = [libc.mallinfo2().uordblks]
for m in range(2, 402):  # 400 new shapes, as 400 steps of new sequence lengths would bring
    F.linear(torch.randn(m, 128, dtype=torch.bfloat16), w)
    if m in (201, 401):
        held.append(libc.mallinfo2().uordblks)
print((held[1] - held[0]) / 1e6, (held[2] - held[1]) / 1e6)
"""


def test_bf16_matmuls_at_new_shapes_do_not_grow_the_heap():
    """oneDNN caches a kernel per shape (0.6 MB each on an AMX Xeon, 1024 by default: 0.7 GB in a
    long run); flags caps both of its caches at 64 entries, so the heap stops growing."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}  # fmt: skip
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, "-c", HEAP_PROBE], env=env, capture_output=True, text=True)
    if "mallinfo2" in p.stderr:
        pytest.skip("not glibc >= 2.33")
    assert p.returncode == 0, p.stderr[-2000:]
    first, second = map(float, p.stdout.split()[-2:])  # MB the heap grew over 200 shapes each
    # capped, the second 200 evict as many kernels as they add, whatever a kernel's size on this
    # CPU (uncapped: 113 and 114 MB on an AMX Xeon; capped: 36 and 0; no oneDNN: 0 and 0)
    assert second < 5 + 0.25 * first


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bf16_compute_moves_fp32_master_weights(tiny_model, rm_task, tmp_path, device):
    """One step at the paper's lr 1e-6 with bf16 compute moves nearly every weight; the checkpoint
    is fp32. With bf16 parameters (AdamW updating them in bf16) about 0.5% of them moved, measured
    on this model. No weight decay: decay alone moves every fp32 weight, gradients or none."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    out = str(tmp_path / "run")
    env = {"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}
    # reward-model prompts: every prompt's responses get distinct scores, so the step has pairs by
    # construction
    flags = ["--steps", 1, "--bf16", "true", "--lr", 1e-6, "--weight_decay", 0]
    flags += ["--prompts_per_step", 8, "--n", 4, "--max_new_tokens", 48, "--val_size", 4]
    flags += ["--data", rm_task[0], "--val_data", rm_task[0], "--reward_model", rm_task[1]]
    run_script(
        "dpo_semionline.py", "--model", tiny_model, "--sampler", "hf", *flags, "--out", out, env=env
    )
    assert metrics(out)[0]["pairs"] > 0
    seed = load_weights(tiny_model)
    trained = load_weights(os.path.join(out, "step_000001"))
    assert trained and all(v.dtype == torch.float32 for v in trained.values())
    names = [k for k in seed if "embed_tokens" not in k]
    moved = sum((seed[k] != trained[k]).sum().item() for k in names)
    moved /= sum(seed[k].numel() for k in names)
    assert moved >= 0.95, moved


# ---- Resuming a `--sync inf` run: the generator and the reference stay the seed model, so the
# resumed run is the uninterrupted one, step for step (the HF sampler is seeded per call) ----
def resume_matches_uninterrupted(tiny_model, rm_task, tmp_path, *flags):
    """The run uninterrupted, and again from its step-2 checkpoint; returns both runs' rows."""
    data = ["--data", rm_task[0], "--val_data", rm_task[0], "--reward_model", rm_task[1]]
    common = [
        "--model",
        tiny_model,
        "--sampler",
        "hf",
        "--sync",
        "inf",
        "--steps",
        4,
        "--save_every",
        2,
    ]
    common += [*flags, *SMALL, *data]
    whole = run_script("dpo_semionline.py", *common, "--out", tmp_path / "whole")
    run_script("dpo_semionline.py", *common, "--out", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "step_000004")  # as if killed after step_000002
    resumed = run_script(
        "dpo_semionline.py", *common, "--out", tmp_path / "cut", "--resume", tmp_path / "cut"
    )
    assert "at step 2" in resumed.stdout
    fingerprint = r"weights fingerprint (\S+)"
    assert re.findall(fingerprint, resumed.stdout) == re.findall(fingerprint, whole.stdout)
    rows = [metrics(tmp_path / name) for name in ("whole", "cut")]
    for a, b in zip(*rows):
        assert a.keys() == b.keys()
        for k in a:
            if not k.startswith("time_"):
                assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k, a[k], b[k])
    return rows


def test_resume_keeps_the_reference_the_seed_under_sync_inf(tiny_model, rm_task, tmp_path):
    """--ref_sync under --sync inf: the reference is the generator, the seed model, before and after
    the resume (it used to become the resumed weights: kl and logp_gap then parted)."""
    whole, cut = resume_matches_uninterrupted(tiny_model, rm_task, tmp_path, "--ref_sync", "true")
    train = [r for r in cut if "loss" in r]
    assert [r["step"] for r in train] == [0, 1, 2, 3] and all(r["pairs"] > 0 for r in train)
    assert all(abs(r["kl"] - r["logp_gap"]) < 1e-5 for r in train), train


def test_resume_validates_between_syncs_under_sync_inf(tiny_model, rm_task, tmp_path):
    """--val_every 3 under --sync inf: the resumed run validates the current policy at step 3 and
    gives the generator the seed's weights back (it used to have none to give back, and crashed)."""
    whole, cut = resume_matches_uninterrupted(tiny_model, rm_task, tmp_path, "--val_every", 3)
    assert [r["step"] for r in cut if "val_reward" in r] == [0, 3, 4]
    train = [r for r in cut if "loss" in r]
    assert all(abs(r["kl"] - r["logp_gap"]) < 1e-5 for r in train), train  # still the seed
