"""The flags: each script's own `Args` (its algorithm's knobs) composed with `RunArgs` (what every
training script shares), parsed from dataclass fields whose flag() declares the help and the checks.
A wrong value is one line, before any model loads (no `assert`: python -O drops them). Then the run
folder they name: checked, opened (args.json, metrics.jsonl), its checkpoints written and read;
the end of each step (end_step): the metrics' means logged, a run of skipped updates stopped."""

import argparse
import contextlib
import ctypes
import dataclasses
import glob
import json
import math
import operator
import os
import shutil
import random
import resource
import sys

import torch
import torch.distributed as dist
from tqdm import tqdm

# oneDNN (torch's bf16 matmuls on a CPU) keeps a compiled kernel for every input shape it meets, up
# to 1024 in each of two caches, about 0.7 MB a shape: the bf16 reference's forward at each step's
# new sequence lengths grew the heap 4 MB a step, to 0.7 GB. One forward's few shapes fit in 64.
for _cache in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):  # read at the first use
    os.environ.setdefault(_cache, "64")


def distributed():
    """Two or more torchrun ranks (in one process, vLLM starts a 1-rank group of its own)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def print0(*a, **k):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*a, **k, flush=True)


def barrier():
    if distributed():
        dist.barrier()


def fail(message):
    """Stops with one line, argparse's style, and no traceback."""
    raise SystemExit(f"{os.path.basename(sys.argv[0])}: error: {message}")


def flag(default, help, **checks):
    """A dataclass field as a flag: default, help, and what parse_args checks: min, gt, max,
    choices, whole (an integer, or inf), model (a hub id or a local model folder); aliases."""
    metadata = {"help": help, **checks}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class RunArgs:
    """The flags every training script shares; each script's Args holds its algorithm's."""

    # Task
    model: str = flag("", "hub id or local folder; empty: the embedded Gemma-3-270M", model=True)
    data: str = flag("", "JSONL {problem, answer} or hub dataset; empty: embedded arithmetic")
    val_data: str = flag("", "validation JSONL or hub dataset; empty: embedded arithmetic")
    reward_model: str = flag("", "reward model for the rows without an answer", model=True)
    val_size: int = flag(250, "validation problems used (0: all)", min=0)
    max_prompt_tokens: int = flag(2048, "longer prompts are dropped at load time", min=1)
    # Sampling of the training rollouts (paper: T 1.0, top-p 1.0)
    max_new_tokens: int = flag(40, "response length limit (paper: 2048)", min=1)
    temperature: float = flag(1.0, "sampling temperature of training rollouts", gt=0)
    top_p: float = flag(1.0, "top-p of training rollouts", gt=0, max=1)
    # Optimization (appendix table: lr 1e-6, grad clip 0.1; AdamW as in the authors' code)
    steps: int = flag(30, "optimizer steps", min=1)
    prompts_per_step: int = flag(8, "prompts per step, global (split over ranks)", min=1)
    lr: float = flag(3e-6, "peak learning rate (paper: 1e-6)", gt=0)
    adam_eps: float = flag(1e-4, "AdamW eps (paper: 1e-4 on math, 1e-8 with a reward model)", gt=0)
    adam_beta1: float = flag(0.9, "AdamW beta1", min=0, max=0.999999)
    adam_beta2: float = flag(0.95, "AdamW beta2", min=0, max=0.999999)
    weight_decay: float = flag(0.1, "AdamW weight decay", min=0)
    warmup_steps: int = flag(0, "linear warmup steps", min=0)
    lr_min_ratio: float = flag(0.2, "the cosine schedule ends at this fraction of lr", min=0, max=1)
    grad_clip: float = flag(1.0, "gradient-norm clip (paper: 0.1)", gt=0)
    micro_batch: int = flag(8, "sequences per forward/backward (gradient accumulation)", min=1)
    # Hardware
    sampler: str = flag(
        "auto", "vllm, hf, auto (vllm if installed)", choices=["vllm", "hf", "auto"]
    )
    vllm_memory: float = flag(0.3, "fraction of GPU memory vLLM may take", gt=0, max=1)
    bf16: bool | None = flag(
        None, "bf16 compute on fp32 master weights (default: on CUDA and on a bf16 CPU)"
    )
    generator_bf16: bool | None = flag(None, "the generator's weights in bf16 (default: as --bf16)")
    grad_ckpt: bool = flag(True, "activation checkpointing: each decoder layer recomputed")
    fsdp: bool | None = flag(None, "FSDP2 shards, not DDP replicas (default: CUDA and >1 rank)")
    # Run
    val_every: int = flag(0, "validate every k steps (always before and after)", min=0)
    save_every: int = flag(0, "checkpoint every k steps (always at the end)", min=0)
    resume: str = flag("", "run folder (or step_N folder) to resume from")
    overwrite: bool = flag(False, "replace the run already in --out")
    out: str = flag("", "run folder (default: runs/<script>)")
    seed: int = flag(0, "seed for data order, task and sampling")
    trust_remote_code: bool = flag(False, "allow model code from the hub")


def true_or_false(text):
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise ValueError(text)  # argparse reports it as an invalid value
    return text.lower() in ("true", "1", "yes")


BOUNDS = [("gt", ">", operator.gt), ("min", ">=", operator.ge), ("max", "<=", operator.le)]


def _check(name, value, m):
    """One flag's value against the bounds its flag() declares."""
    if "choices" in m and value not in m["choices"]:
        fail(f"{name}: invalid choice {value!r} (choose from {', '.join(m['choices'])})")
    path = os.path.expanduser(value) if m.get("model") and value else ""
    local = path and (os.path.exists(path) or path.startswith(("/", ".")) or value.count("/") > 1)
    if local and not os.path.isfile(os.path.join(path, "config.json")):  # else a hub id
        fail(f"{name} {value}: no such model folder (a local path needs a folder with config.json)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    bounds = [(k, op, test) for k, op, test in BOUNDS if k in m]
    whole = not m.get("whole") or math.isinf(value) or value == int(value)
    if math.isnan(value) or not all(test(value, m[k]) for k, _, test in bounds) or not whole:
        must = " and ".join(f"{op} {m[k]}" for k, op, _ in bounds) or "a number"
        fail(f"{name} {value}: must be {must}{' (an integer, or inf)' * bool(m.get('whole'))}")


def parse_args(*classes):
    """The dataclasses' fields as flags, each checked as its flag() declares; one instance holding
    them all. The first class's fields come first in --help and replace a later class's of the same
    name."""
    merged = dataclasses.make_dataclass(classes[0].__name__, [], bases=classes)
    doc = sys.modules["__main__"].__doc__
    raw = argparse.RawDescriptionHelpFormatter  # the script's docstring as it is
    parser = argparse.ArgumentParser(description=doc, formatter_class=raw)
    parser.error = fail  # argparse would print the whole usage first
    own = {f.name for f in dataclasses.fields(classes[0])}
    groups = {True: parser.add_argument_group("algorithm"), False: parser.add_argument_group("run")}
    for f in sorted(dataclasses.fields(merged), key=lambda f: f.name not in own):
        kind = {"type": f.type, "default": f.default}
        if f.type in (bool, bool | None):  # `--fsdp`, `--fsdp true`, `--fsdp false`
            kind |= {"type": true_or_false, "nargs": "?", "const": True}
        if f.type == list[str]:
            kind = {"type": str, "nargs": "*", "default": []}
        aliases = f.metadata.get("aliases", [])
        groups[f.name in own].add_argument(f"--{f.name}", *aliases, help=f.metadata["help"], **kind)
    args = merged(**vars(parser.parse_args()))
    for f in dataclasses.fields(args):
        _check(f"--{f.name}", getattr(args, f.name), f.metadata)
    return args


# ---- The run folder they name: --out, --resume; metrics.jsonl; checkpoints ----
def check_run_folder(out, resume, overwrite):
    """A run never overwrites another by accident. Returns the checkpoint to resume from, or ""."""
    found = checkpoints(resume) if resume else []
    if resume and not found and os.path.exists(f"{resume}/trainer_state.pt"):
        found = [resume]
    if resume and not found:
        fail(f"--resume {resume}: no checkpoint there")
    ckpt = found[-1] if found else ""
    same_run = ckpt and os.path.abspath(os.path.dirname(ckpt)) == os.path.abspath(out)
    if os.path.isdir(out) and os.listdir(out) and not overwrite and not same_run:
        fail(f"--out {out} already holds a run: --resume {out} continues it, "
             "--overwrite replaces it")  # fmt: skip
    return ckpt


def checkpoints(out):
    """A run's finished step_N folders, oldest first (a killed save leaves step_N.tmp, or
    step_N.old: renamed back)."""
    for old in glob.glob(os.path.join(out, "step_*.old")):
        if not os.path.exists(old[:-4]) and int(os.environ.get("RANK", 0)) == 0:
            os.replace(old, old[:-4])
    found = glob.glob(os.path.join(out, "step_*"))
    done = [p for p in found if os.path.exists(f"{p}/trainer_state.pt")]
    return sorted(p for p in done if not p.endswith((".tmp", ".old")))


def load_weights(path):
    """A save_pretrained folder's tensors, as saved (all safetensors shards)."""
    from safetensors.torch import load_file

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    return {k: v for f in files for k, v in load_file(f).items()}


def open_run(out, config, start, overwrite):
    """--overwrite clears `out`; args.json; metrics.jsonl keeps the rows before `start`."""
    path = os.path.join(out, "metrics.jsonl")
    kept = []
    if int(os.environ.get("RANK", 0)) == 0:
        if overwrite and not start and os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        json.dump(config, open(os.path.join(out, "args.json"), "w"), indent=1)
        for line in open(path) if start and os.path.exists(path) else []:
            with contextlib.suppress(ValueError):  # a line cut off by a kill
                kept += [row for row in [json.loads(line)] if row["step"] < start]
        with open(path, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
    return kept  # rank 0's: the others' are []


def log_metrics(run, metrics):
    """A row into run.history; rank 0 adds it to <out>/metrics.jsonl and prints it."""
    run.history.append(metrics)
    if run.rank == 0:
        with open(os.path.join(run.out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(metrics) + "\n")
        shown = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()]
        tqdm.write(" ".join(shown))


def save_checkpoint(run, step):
    """<out>/step_NNNNNN: fp32 weights (FSDP gathers to rank 0's CPU), their config's dtype the one
    the run computed in, and trainer_state.pt, written under a temporary name and renamed: a run
    killed mid-save keeps every earlier one whole."""
    from torch.distributed.checkpoint import state_dict as dcp

    opts = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # all to rank 0 only
    weights = dcp.get_model_state_dict(run.model, options=opts)
    optimizer = dcp.get_optimizer_state_dict(run.model, run.optimizer, options=opts)
    if run.rank == 0:
        path = os.path.join(run.out, f"step_{step:06d}")
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
        getattr(run.model, "module", run.model).save_pretrained(tmp, state_dict=weights)
        if run.bf16:  # what was trained is the bf16 cast: loaders that follow the config (vLLM,
            # transformers, eval.py) load that; the fp32 tensors stay the master weights
            with open(os.path.join(tmp, "config.json")) as f:
                config = json.load(f) | {"dtype": "bfloat16"}
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
        run.tokenizer.save_pretrained(tmp)
        rng = {"torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}
        state = {"step": step, "optimizer": optimizer, "scheduler": run.scheduler.state_dict()}
        torch.save(state | rng, os.path.join(tmp, "trainer_state.pt"))
        if os.path.exists(path):
            os.replace(path, path + ".old")  # checkpoints() renames it back if killed here
        os.replace(tmp, path)
        shutil.rmtree(path + ".old", ignore_errors=True)
    if distributed():
        dist.barrier()


def load_checkpoint(path, model, optimizer, scheduler):
    """Restores weights, optimizer, scheduler, RNG; returns the step. Rank 0 reads, broadcasts."""
    from torch.distributed.checkpoint import state_dict as dcp

    rank0 = int(os.environ.get("RANK", 0)) == 0
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=True, mmap=True)
    # strict=False: tied weights are saved once
    opts = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=distributed(),
                                strict=False)  # fmt: skip
    dcp.set_model_state_dict(model, load_weights(path) if rank0 else {}, options=opts)
    optim_state = state["optimizer"] if rank0 else {}
    dcp.set_optimizer_state_dict(model, optimizer, optim_state, options=opts)
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    if rank0:
        print(f"resumed from {path} at step {state['step']}", flush=True)
    return state["step"]


def mean_metrics(totals, means):
    """Each metric in `means`: its sum divided by the count it is listed under (a count of 0: left
    out), or under None the sum itself, a whole number. A sum no micro-batch added to is 0."""
    metrics = {name: int(totals.get(name, 0)) for name in means.get(None, [])}
    for count, names in means.items():
        if count and totals.get(count):
            metrics |= {name: totals.get(name, 0.0) / totals[count] for name in names}
    return metrics


def trim_heap():
    """Hands the heap's free pages back to the OS: glibc keeps what a phase freed (vLLM-CPU's
    buffers after a generate call: 0.3 GB) mapped, and the next phase's peak would sit on it."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def end_step(run, metrics, totals, means):
    """Logs `metrics` and the means of the all-reduced sums; three skipped updates in a row stop."""
    idle = {"time_gen": 0.0, "time_reward": 0.0}  # a step that did not sample (rollout_steps)
    if run.device.type == "cuda":
        metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:  # the process's peak RSS
        metrics["peak_mem_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    trim_heap()
    log_metrics(run, {"step": metrics["step"]} | mean_metrics(totals, means) | idle | metrics)
    step = metrics["step"]
    if run.skipped_in_row == 3:
        fail(f"non-finite loss or gradient norm 3 steps in a row (steps {step - 2}-{step}), "
             f"updates skipped: stopping; the last checkpoint in {run.out} is intact")  # fmt: skip
