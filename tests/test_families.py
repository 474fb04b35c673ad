"""The log-prob shortcuts on every model family people post-train: tiny random models built from
transformers' own configs. For each, the log-probs, entropies and gradients the training scripts
compute (token_logps with the flags check_logps leaves on) equal the plain definition
(reference_logps: full logits, log-softmax, gather), in fp32, on batches whose prompts share a
prefix and on sequences longer than a sliding window. A family that may share prefixes is shown to
share them; one that may not runs padded, for the reason shareable_length gives."""

import random

import pytest
import torch

from common import (
    check_logps,
    pad_sequences,
    reference_logps,
    share_prefixes,
    shareable_length,
    token_logps,
)

WINDOW = 16  # the windowed families' sliding window: batch "long" reaches past it
# initializer_range 0.1, not 0.02: with near-uniform log-probs, a conv layer reading the packed row
# as one sequence (LFM2 on main at 32b9a5f) was off by 5e-5 only; at 0.1 by 0.35 nats
SMALL = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.1,
)


def config(name):
    """(config, model class) of a tiny member of family `name`, with the feature it is here for."""
    import transformers as tf

    windowed = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
    gemma = SMALL | windowed | dict(head_dim=16, final_logit_softcapping=3.0)
    llama3 = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    small_gpt2 = dict(
        vocab_size=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        initializer_range=0.1,
        bos_token_id=1,
        eos_token_id=2,
    )
    small_falcon = {k: v for k, v in SMALL.items() if "intermediate" not in k and "kv" not in k}
    families = {
        "llama": (tf.LlamaConfig, SMALL | dict(head_dim=16, rope_parameters=llama3)),
        "qwen2": (tf.Qwen2Config, SMALL),
        "qwen3": (tf.Qwen3Config, SMALL | dict(head_dim=16)),
        "mistral": (tf.MistralConfig, SMALL | dict(head_dim=16, sliding_window=WINDOW)),
        "gemma2": (tf.Gemma2Config, gemma | dict(attn_logit_softcapping=5.0)),
        "gemma3_text": (tf.Gemma3TextConfig, gemma),
        "gemma3": (tf.Gemma3Config, dict(text_config=gemma, vision_config=vision)),
        "phi3": (tf.Phi3Config, SMALL | dict(sliding_window=WINDOW)),
        "olmo2": (tf.Olmo2Config, SMALL),
        "gpt2": (tf.GPT2Config, small_gpt2),
        "cohere": (tf.CohereConfig, SMALL | dict(logit_scale=0.25, tie_word_embeddings=True)),
        "granite": (tf.GraniteConfig, SMALL | dict(logits_scaling=4.0, embedding_multiplier=2.0)),
        "lfm2": (tf.Lfm2Config, SMALL | dict(layer_types=["conv", "full_attention"])),
        "qwen3_next": (
            tf.Qwen3NextConfig,
            SMALL
            | dict(
                head_dim=16,
                linear_key_head_dim=16,
                linear_value_head_dim=16,
                linear_num_key_heads=2,
                linear_num_value_heads=2,
                num_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=32,
                shared_expert_intermediate_size=32,
                layer_types=["linear_attention", "full_attention"],
            ),
        ),
        "falcon": (tf.FalconConfig, small_falcon | dict(alibi=True)),
    }
    cls, kwargs = families[name]
    return cls(**kwargs)


# the families prefix sharing is proven on, and those that run padded (shareable_length says why)
SHARED = [
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "phi3",
    "olmo2",
    "gpt2",
    "cohere",
    "granite",
]
PADDED = ["lfm2", "qwen3_next", "falcon"]


def tiny_model(name):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(0)
    cfg = config(name)
    cfg._attn_implementation = "sdpa"
    composite = name == "gemma3"  # what AutoModelForCausalLM loads Gemma-3-4B/12B/27B as
    model = (AutoModelForImageTextToText if composite else AutoModelForCausalLM).from_config(cfg)
    return model.float().eval()


def batches(vocab, rng):
    """(prompts, responses) twice: "short", each sequence inside the window, a few-shot prefix
    shared by three prompts, two responses each; "long", each one past the window."""
    out = {}
    for name, stem, tail in (("short", 6, 5), ("long", 20, 14)):
        fewshot = [rng.randrange(3, vocab) for _ in range(stem)]
        prompts, responses = [], []
        for _ in range(3):
            prompt = fewshot + [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 4))]
            for _ in range(2):
                prompts.append(prompt)
                responses.append([rng.randrange(3, vocab) for _ in range(rng.randrange(1, tail))])
        out[name] = prompts, responses
    return out


def reference(model, prompts, responses):
    """reference_logps one sequence at a time: no padding, no packing, nothing to trust."""
    rows = []
    for p, r in zip(prompts, responses):
        rows.append(reference_logps(model, *pad_sequences([p], [r], 0, torch.device("cpu"))))
    width = max(len(p + r) for p, r in zip(prompts, responses))
    pad = torch.nn.functional.pad
    return [torch.cat([pad(row[k], (0, width - row[k].shape[1])) for row in rows]) for k in (0, 1)]


def gradient(model, logps, entropy, weights):
    """All parameters' gradient of a weighted sum of each sequence's log-probs and entropies."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = (logps.sum(-1) * weights).sum() + (entropy.sum(-1) * weights.flip(0)).sum()
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).flatten() for p, g in zip(params, grads)]
    )


@pytest.mark.parametrize("name", SHARED + PADDED)
def test_logps_entropy_and_gradient_equal_the_plain_definition(name):
    model = tiny_model(name)
    vocab = model.config.get_text_config().vocab_size
    data = batches(vocab, random.Random(0))
    flags = check_logps(model, [data["short"][0][0], data["short"][0][2]], max_new_tokens=12)
    window, why = shareable_length(model.config)
    assert flags == {"share": name in SHARED, "fast_head": True}
    assert (why is None) == (name in SHARED)
    for batch, (prompts, responses) in data.items():
        padded = pad_sequences(prompts, responses, 0, torch.device("cpu"))
        lengths = padded[1].sum(-1)
        if batch == "long" and window < float("inf"):
            assert lengths.max() > window  # the window is in play: padded
        if name in SHARED and batch == "short":  # shared prefixes, proven on this family
            assert share_prefixes(*padded[:2], window) is not None
        weights = torch.arange(1.0, len(prompts) + 1)
        plain = reference(model, prompts, responses)
        plain_grad = gradient(model, *plain, weights)
        assert plain[0].abs().sum() > 0 and plain_grad.norm() > 0
        for kwargs in ({}, flags):  # token_logps' defaults (eval.py's), and the run's flags
            logps, entropy = token_logps(model, *padded, chunk_size=5, **kwargs)
            assert torch.allclose(logps, plain[0], atol=1e-4), (
                batch,
                (logps - plain[0]).abs().max(),
            )
            assert torch.allclose(entropy, plain[1], atol=1e-4), batch
            grad = gradient(model, logps, entropy, weights)
            scale = plain_grad.abs().max()
            assert torch.allclose(grad, plain_grad, rtol=0, atol=1e-4 * scale), (
                batch,
                ((grad - plain_grad).abs().max() / scale).item(),
            )
