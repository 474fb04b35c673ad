"""bench/gpu_check.sh proven on this CPU: --dry-run runs every row that needs neither vLLM nor a
second GPU, at tiny sizes through the same code, and passes; the rows a GPU runs fit the budget of
one 10-minute command; without a GPU, or without Math-Verify, it says so and stops at once."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import gpu_check  # noqa: E402

# the table's rows; the last two need vLLM (and 2 GPUs): skipped in a dry run
ROWS = [
    "setup: tiny model, reward model, prompts",
    "Math-Verify on known answers",
    "token_logps, bf16 autocast",
    "token_logps, FSDP2 bf16",
    "tied sparse embedding gradient",
    "dpo_semionline.py, --sync 2",
    "dpo_offline.py",
    "grpo.py",
    "group_dpo.py",
    "pytest -k cuda",
    "1B Llama update: layers vs head, TF32",
    "1B Llama update, grad_ckpt off/on",
    "8B-shaped memory, 2 and 4 layers -> 32",
]
VLLM_ROWS = ["torchrun 2 ranks + vLLM", "vLLM decoding and weight sync"]


def gpu_check_sh(*args, env=None):
    env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    cmd = ["bash", os.path.join(ROOT, "bench", "gpu_check.sh"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


def test_dry_run_passes_every_row(tmp_path):
    """Each row in a process of its own, its log and the table written as it goes: 165 s on 2
    cores with other work beside it (TINY_MODEL_CACHE reused; the training scripts are 2/3)."""
    p = gpu_check_sh("--dry-run", "--out", str(tmp_path))
    assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-3000:]
    table = [line.split(" | ") for line in p.stdout.splitlines() if line.startswith("| ")][2:]
    results = {cells[0][2:]: cells[1] for cells in table}
    assert list(results) == ROWS + VLLM_ROWS, list(results)
    assert all(results[name] == "ok" for name in ROWS), p.stdout[-6000:]
    assert all(results[name] == "skip" for name in VLLM_ROWS)
    written = (tmp_path / "table.md").read_text().splitlines()
    assert written == [line for line in p.stdout.splitlines() if line.startswith("| ")]
    for key, *_, needs in gpu_check.ROWS:
        assert (tmp_path / f"{key}.log").exists() != bool(needs), key


def test_the_rows_a_gpu_runs_fit_one_command():
    """One GPU without vLLM runs every row without needs: their timeouts add up to the budget,
    which leaves the installs and the start inside the 10-minute limit of one command."""
    assert sum(timeout for *_, timeout, needs in gpu_check.ROWS if not needs) <= 480
    assert gpu_check.BUDGET <= 480


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so(tmp_path):
    p = gpu_check_sh("--out", str(tmp_path))
    assert p.returncode == 0 and "no GPU" in p.stdout, p.stdout + p.stderr
    assert not (tmp_path / "table.md").exists()


@pytest.mark.skipif(os.path.isdir(os.path.join(ROOT, ".whl")), reason=".whl/ would install it")
def test_without_math_verify_it_stops_saying_what_to_download(tmp_path):
    hidden = tmp_path / "hide" / "math_verify"  # shadows the installed package
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {"PYTHONPATH": str(tmp_path / "hide")}
    p = gpu_check_sh("--dry-run", "--out", str(tmp_path / "out"), env=env)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "pip download --no-deps" in p.stderr and "math-verify==0.9.0" in p.stderr
    assert not (tmp_path / "out" / "table.md").exists()
