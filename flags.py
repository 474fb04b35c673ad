"""The flags: each script's own `Args` (its algorithm's knobs) composed with `RunArgs` (what every
training script shares), parsed from dataclass fields whose flag() declares the help and the checks.
A wrong value is one line, before any model loads (no `assert`: python -O drops them)."""

import argparse
import dataclasses
import glob
import math
import operator
import os
import sys


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
    bf16: bool | None = flag(None, "bf16 compute on fp32 master weights (default: on CUDA)")
    grad_ckpt: bool | None = flag(None, "activation checkpointing (default: on CUDA)")
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


# ---- The run folder they name: --out, --resume ----
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
