"""A tiny real model, built and fine-tuned on the fly (no hub), for the smoke tests.

A randomly initialised tiny model never writes \\boxed{...}: every reward would be 0, no pair would form
and the tests would pass vacuously. So it is trained for a few hundred steps on prompts in the scripts'
own template, answered with the right number 60% of the time: sampled at T=1 it is then right on roughly
a third of its samples, and rollouts have mixed rewards. head_dim 64, as vLLM's CPU kernels need.
"""
import os, random, subprocess, sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")


def build_tiny_model(path, steps=300, seed=0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from eval import FEWSHOT_TEMPLATE, arithmetic_task
    rng = random.Random(seed)
    train, _ = arithmetic_task(seed)
    def example(row):
        q = row["problem"][len("What is "):-1]
        ans = int(row["answer"]) if rng.random() < 0.6 else int(row["answer"]) + rng.choice([-2, -1, 1, 2, 10])
        return (FEWSHOT_TEMPLATE.format(problem=row["problem"]) +
                f" {q} = {ans}. The final answer is $\\boxed{{{ans}}}$. I hope it is correct.\n\n")
    texts = [example(r) for r in train]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False)
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
    cache = os.environ.get("TINY_MODEL_CACHE")  # set to reuse the model across pytest runs while developing
    if cache and os.path.exists(os.path.join(cache, "config.json")):
        return cache
    return build_tiny_model(cache or str(tmp_path_factory.mktemp("tiny_model")))


def run_script(script, *args, env=None, timeout=900, nproc=1, check=True):
    """Runs a training script as a user would (or under torchrun); returns the completed process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 \
        else [sys.executable]
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if nproc > 1 and torch.cuda.device_count() < nproc:  # fewer GPUs than processes: all of them on the CPU (gloo)
        e["CUDA_VISIBLE_DEVICES"] = ""
    p = subprocess.run(cmd + [os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=e, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0 or not check, f"{script} failed:\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    return p
