"""The kernels against hand computation: the DPO loss, token log-probs and entropy, GRPO's
advantages and clipped loss, GroupDPO's loss and sets, and section 2's pairs."""

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from common import Sample, dpo_loss, grpo_advantages, grpo_loss, pad_sequences, token_logps
from group_dpo import group_dpo_loss, group_labels
from conftest import metrics, run_script


def test_dpo_loss_by_hand():
    # pair 0: margin = (-1 - -2) - (-3 - -2.5) = 1.5 -> -log sigmoid(0.15); pair 1: margin = -2 ->
    # -log sigmoid(-0.2)
    policy_chosen = torch.tensor([-1.0, -5.0])
    policy_rejected = torch.tensor([-3.0, -4.0])
    ref_chosen = torch.tensor([-2.0, -5.0])
    ref_rejected = torch.tensor([-2.5, -6.0])
    loss, diag = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1)
    expected = [math.log(1 + math.exp(-0.15)), math.log(1 + math.exp(0.2))]
    assert loss.shape == (2,)
    assert torch.allclose(loss, torch.tensor(expected), atol=1e-6)
    assert torch.allclose(diag["margin"], torch.tensor([0.15, -0.2]))
    assert diag["pair_acc"].tolist() == [1.0, 0.0]
    # at the reference the loss is log 2 whatever beta, and its gradient pushes chosen up, rejected
    # down
    c = torch.tensor([-7.0], requires_grad=True)
    r = torch.tensor([-9.0], requires_grad=True)
    loss, _ = dpo_loss(c, r, torch.tensor([-7.0]), torch.tensor([-9.0]), beta=0.5)
    loss.sum().backward()
    assert abs(loss.item() - math.log(2)) < 1e-6
    assert c.grad.item() == pytest.approx(-0.25)  # -beta/2
    assert r.grad.item() == pytest.approx(0.25)  # +beta/2


def tiny_random_model(vocab=50):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(cfg).float()


def tiny_gemma3():
    """Gemma-3's shape in small: sliding-window layers, soft-capped logits, tied embeddings."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    layers = ["sliding_attention", "full_attention"]
    config = Gemma3TextConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                              head_dim=16, pad_token_id=0, sliding_window=64, layer_types=layers,
                              final_logit_softcapping=30.0, tie_word_embeddings=True)  # fmt: skip
    return Gemma3ForCausalLM(config).float()


def test_token_logps_matches_full_logits():
    model = tiny_random_model()
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[10, 11, 12, 13], [14]]
    input_ids, attn, cmask = pad_sequences(prompts, responses, 0, torch.device("cpu"))
    # chunks smaller than the sequences
    logps, entropy = token_logps(model, input_ids, attn, cmask, chunk_size=2)
    logits = model(input_ids=input_ids, attention_mask=attn).logits.float()
    ref_all = logits[:, :-1].log_softmax(-1)
    naive = torch.zeros_like(logps)
    naive[:, 1:] = ref_all.gather(-1, input_ids[:, 1:, None])[..., 0]
    naive_ent = torch.zeros_like(logps)
    naive_ent[:, 1:] = -(ref_all.exp() * ref_all).sum(-1)
    m = cmask.float()
    assert torch.allclose(logps, naive * m, atol=1e-5)
    assert torch.allclose(entropy, naive_ent * m, atol=1e-5)
    assert (logps[~cmask] == 0).all() and cmask.sum() == 5
    # gradients through the chunked, recomputed head equal the naive ones
    params = list(model.parameters())
    g1 = torch.autograd.grad(logps.sum() + entropy.sum(), params, allow_unused=True)
    naive_total = (naive * m).sum() + (naive_ent * m).sum()
    g2 = torch.autograd.grad(naive_total, params, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("scale, softcap", [(1.0, None), (1.0, 3.0), (0.25, None), (8.0, 3.0)])
def test_head_logps_gradient_is_autograds(scale, softcap):
    """The chunked output layer's hand-written backward (log p(target) and entropy, scaled and
    soft-capped logits, a bias) against autograd through the whole [rows, V] logits."""
    from common import HeadLogps, _head_logps

    torch.manual_seed(0)
    h = torch.randn(7, 5, requires_grad=True)
    weight = torch.randn(11, 5, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    targets = torch.randint(0, 11, (7,))
    g_logp, g_entropy = torch.randn(7), torch.randn(7)
    results = []
    heads = (
        lambda: HeadLogps.apply(h, targets, weight, bias, scale, softcap, 3),
        lambda: _head_logps(h, targets, weight, bias, scale, softcap)[:2],
    )
    for head in heads:
        logp, entropy = head()
        grads = torch.autograd.grad((logp * g_logp + entropy * g_entropy).sum(), (h, weight, bias))
        results.append((logp, entropy, *grads))
    for ours, autograds in zip(*results):  # fp32 rounding apart (observed < 1e-6)
        assert torch.allclose(ours, autograds, atol=1e-5)


@pytest.mark.parametrize("weights", ["bf16", "fp32 under bf16 autocast"])
def test_head_gradient_in_bf16_is_no_worse_than_autograds(weights):
    """bf16 compute in the output layer: FSDP2's mixed precision hands it a bf16 weight; autocast
    (one GPU, DDP, a bf16 CPU) casts an fp32 one. Over 256 chunks (8 x 2,048 response tokens at 64 a
    chunk) W's and b's gradients add up in fp32 and are rounded once, so their error against fp64
    (from the same bf16 values) is at most plain autograd's (its logits' gradient rounded to bf16,
    then its GEMM); rounded once per chunk, a bf16 weight's was five times autograd's."""
    from common import HeadLogps, _head_logps

    torch.manual_seed(0)
    V, D, chunk = 512, 64, 16
    rows = 256 * chunk
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32
    h = torch.randn(rows, D).bfloat16().to(dtype).requires_grad_()
    weight = (torch.randn(V, D) / D**0.5).bfloat16().to(dtype).requires_grad_()
    bias = torch.randn(V).bfloat16().to(dtype).requires_grad_()
    targets = torch.randint(0, V, (rows,))
    g_logp, g_entropy = torch.randn(rows), torch.randn(rows)

    def grads(logp, entropy, inputs):
        total = (logp.double() * g_logp.double() + entropy.double() * g_entropy.double()).sum()
        return torch.autograd.grad(total, inputs)

    # fp64 from the same bf16 values: the error measured is the backward's, not the inputs'
    exact_inputs = [t.detach().double().requires_grad_() for t in (weight, bias)]
    logits = F.linear(h.double(), *exact_inputs)
    logp_all = logits.log_softmax(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    exact = grads(logp_all.gather(-1, targets[:, None])[:, 0], entropy, exact_inputs)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.float32):
        ours = HeadLogps.apply(h, targets, weight, bias, 1.0, None, chunk)
        autograds = _head_logps(h, targets, weight, bias, 1.0, None)[:2]
    ours, autograds = grads(*ours, (weight, bias)), grads(*autograds, (weight, bias))
    for name, e, o, a in zip(("W", "b"), exact, ours, autograds):
        assert o.dtype == dtype
        ours_error = ((o.double() - e).norm() / e.norm()).item()
        autograd_error = ((a.double() - e).norm() / e.norm()).item()
        assert 0 < ours_error <= autograd_error, (name, ours_error, autograd_error)


def test_share_prefixes_is_a_trie_with_tree_attention():
    from common import share_prefixes

    seqs = [[1, 2, 3, 4], [1, 2, 3, 5, 6], [1, 2, 7]]
    input_ids, attn, _ = pad_sequences(seqs, [[]] * 3, 0, torch.device("cpu"))
    ids, position_ids, mask, index = share_prefixes(input_ids, attn)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]  # 7 tokens for the batch's 12
    assert position_ids.tolist() == [[0, 1, 2, 3, 3, 4, 2]]  # each token's depth
    assert index.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 4, 5], [0, 1, 6, 0, 0]]
    ancestors = {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 2, 4],
                 5: [0, 1, 2, 4, 5], 6: [0, 1, 6]}  # fmt: skip
    for a, path in ancestors.items():  # each token sees its own path, not its siblings'
        assert mask[0, 0, a].nonzero()[:, 0].tolist() == path
    assert mask.shape == (1, 1, 7, 7) and mask.sum() == sum(map(len, ancestors.values()))
    # nothing shared (no work saved), or a window shorter than a sequence: the padded batch
    lone, lone_attn, _ = pad_sequences([[1, 2], [3, 4]], [[], []], 0, torch.device("cpu"))
    assert share_prefixes(lone, lone_attn, token_cost=100) is None
    assert share_prefixes(input_ids, attn, window=5) is not None
    assert share_prefixes(input_ids, attn, window=4) is None


def test_share_prefixes_only_where_it_saves_a_third_of_the_work():
    """The packed row's attention is dense, N x N. Counted with the layers' work (token_cost a
    token's, in query-key pairs), it must save a third of the padded batch's: a long prefix shared
    by many short answers (the few-shot prompt) does; two long answers behind a short common prefix,
    at paper scale (Llama-8B's hidden size, 2 x (256 + 2048) tokens), do not."""
    from common import share_prefixes

    cpu = torch.device("cpu")
    fewshot = [list(range(1, 101))] * 16
    answers = [[200 + k] * 28 for k in range(16)]
    ids, attn, _ = pad_sequences(fewshot, answers, 0, cpu)
    packed = share_prefixes(ids, attn, token_cost=6 * 640)  # Gemma-3-270M's hidden size
    assert packed is not None and packed[0].shape[1] == 100 + 16 * 28
    # the attention alone would not: 548^2 is over 2/3 of 16 x 128^2
    assert share_prefixes(ids, attn, token_cost=0) is None
    prompt, responses = list(range(1, 257)), [[300 + k] * 2048 for k in range(2)]
    ids, attn, _ = pad_sequences([prompt, prompt], responses, 0, cpu)
    assert share_prefixes(ids, attn, token_cost=6 * 4096) is None  # saves 256 of 4,608 tokens
    assert share_prefixes(ids, attn) is not None  # no cost given: the trie regardless


@pytest.mark.parametrize("seed", range(5))
def test_share_prefixes_equals_a_trie_built_token_by_token(seed):
    """The vectorised trie against the plain one: a dict of (parent, token) -> node, in order."""
    from common import share_prefixes

    rng = random.Random(seed)
    stem = [rng.randrange(1, 4) for _ in range(6)]
    seqs = [stem[: rng.randrange(7)] + [rng.randrange(1, 4) for _ in range(rng.randrange(1, 9))]]
    for _ in range(rng.randrange(4, 12)):
        seqs.append(rng.choice(seqs)[: rng.randrange(1, 10)] + [rng.randrange(1, 4)])
    input_ids, attn, _ = pad_sequences(seqs, [[]] * len(seqs), 0, torch.device("cpu"))
    trie, index = {}, []
    for seq in seqs:
        node, places = -1, []
        for t in seq:
            node = trie.setdefault((node, t), len(trie))
            places.append(node)
        index.append(places + [0] * (input_ids.shape[1] - len(seq)))
    packed = share_prefixes(input_ids, attn)
    assert packed[0].tolist() == [[t for _, t in trie]] and packed[3].tolist() == index
    parent = {node: p for (p, _), node in trie.items()}
    for node in range(len(trie)):
        path = [node]
        while parent[path[-1]] >= 0:
            path.append(parent[path[-1]])
        assert packed[2][0, 0, node].nonzero()[:, 0].tolist() == sorted(path)
        assert packed[1][0, node] == len(path) - 1


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_token_logps_shared_prefixes_equal_the_padded_batch(arch):
    """Prompts with a common few-shot part, groups of responses per prompt: the log-probs, entropy
    and gradient with each prefix computed once equal the padded batch's, for Llama and for Gemma-3
    (its sliding-window layers, soft-capped logits)."""
    from common import share_prefixes

    rng = random.Random(0)
    fewshot = [rng.randrange(3, 50) for _ in range(30)]
    prompts, responses = [], []
    for _ in range(3):
        problem = fewshot + [rng.randrange(3, 50) for _ in range(rng.randrange(3, 8))]
        for _ in range(2):
            prompts.append(problem)
            responses.append([rng.randrange(3, 50) for _ in range(rng.randrange(1, 9))])
    model = tiny_random_model() if arch == "llama" else tiny_gemma3()
    model.config._attn_implementation = "sdpa"
    padded = pad_sequences(prompts, responses, 0, torch.device("cpu"))
    assert len(share_prefixes(*padded[:2])[0][0]) < padded[0].numel() / 2
    weights = torch.arange(1.0, len(prompts) + 1)  # a different weight per sequence
    results = []
    for share in (False, True):
        logps, entropy = token_logps(model, *padded, chunk_size=5, share=share)
        params = list(model.parameters())
        grads = torch.autograd.grad((logps.sum(-1) * weights).sum() + entropy.sum(), params)
        results.append((logps, entropy, torch.cat([g.flatten() for g in grads])))
    (lp, ent, grad), (lp_shared, ent_shared, grad_shared) = results
    assert lp.abs().sum() > 0 and grad.norm() > 0
    assert torch.allclose(lp_shared, lp, atol=1e-5)
    assert torch.allclose(ent_shared, ent, atol=1e-5)
    # fp32 rounding: another order of sums (observed ~1e-7 of the gradient's scale)
    assert torch.allclose(grad_shared, grad, rtol=0, atol=1e-5 * grad.abs().max())


def test_one_process_tied_embedding_gradient_is_autograds():
    """One process, tied embeddings (Gemma's): wrap_model makes the lookup's gradient sparse and
    the head adds its own straight into weight.grad (no [V, D] summed out of place). Over two
    micro-batches' backward, every .grad equals plain autograd's, dense, and AdamW steps on it; an
    untied model keeps the dense path."""
    from common import wrap_model

    prompts, responses = [[5, 6, 7], [8, 9], [5, 6]], [[10, 11], [12], [13, 14, 15]]
    padded = pad_sequences(prompts, responses, 0, torch.device("cpu"))
    grads = []
    for wrapped in (False, True):
        model = tiny_gemma3()
        model = wrap_model(model, torch.device("cpu")) if wrapped else model
        assert model.get_input_embeddings().sparse == wrapped
        for weight in (1.0, 0.5):  # two micro-batches: the second adds to the first in place
            logps, entropy = token_logps(model, *padded, chunk_size=2)
            (weight * logps.sum() + entropy.sum()).backward()
        assert model.get_input_embeddings().weight.grad.layout == torch.strided
        grads.append([p.grad.clone() for p in model.parameters()])
        before = [p.detach().clone() for p in model.parameters()]
        torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True).step()
        assert all((p - b).abs().max() > 0 for p, b in zip(model.parameters(), before))
    for dense, ours in zip(*grads):
        assert dense.norm() > 0
        assert torch.allclose(ours, dense, rtol=0, atol=1e-6 * dense.abs().max())
    assert not wrap_model(tiny_random_model(), torch.device("cpu")).get_input_embeddings().sparse


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0],
                            [0.3, 0.3, 0.3, 0.3]])  # fmt: skip
    adv = grpo_advantages(rewards)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 2: mean 0.25, unbiased std
    # sqrt(0.75 / 3) = 0.5
    s0 = math.sqrt(1 / 3) + 1e-6
    expected = torch.tensor([[0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], [0.0] * 4,
                             [-0.25 / 0.500001] * 3 + [0.75 / 0.500001], [0.0] * 4])  # fmt: skip
    assert adv.shape == (4, 4) and torch.allclose(adv, expected, atol=1e-6)
    # all-equal groups: exactly 0, even for 0.3 (whose mean is not exact)
    assert (adv[1] == 0).all() and (adv[3] == 0).all()
    centred = grpo_advantages(rewards, std_normalize=False)
    assert torch.allclose(centred[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert (centred[3] == 0).all()
    assert torch.allclose(centred[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))


def hand_grpo(logps, old, ref, adv, mask, kl_beta, eps):
    total = 0.0
    for b in range(len(logps)):
        for t in range(len(logps[b])):
            if mask[b][t]:
                ratio = math.exp(logps[b][t] - old[b][t])
                surrogate = min(ratio * adv[b], min(max(ratio, 1 - eps), 1 + eps) * adv[b])
                d = ref[b][t] - logps[b][t]
                total += -surrogate + kl_beta * (math.exp(d) - d - 1)
    return total


def test_grpo_loss_by_hand():
    logps = [[0.0, -1.0, -0.5, -2.0], [0.0, -0.3, -4.0, 0.0]]
    # ratios exp(0.2) (clipped for A>0), exp(-0.4), 1; 1, exp(-1)
    old = [[0.0, -1.2, -0.1, -2.0], [0.0, -0.3, -3.0, 0.0]]
    ref = [[0.0, -0.8, -0.7, -1.0], [0.0, -0.5, -3.5, 0.0]]
    mask = [[False, True, True, True], [False, True, True, False]]
    adv = [1.5, -0.7]
    tensors = [torch.tensor(x) for x in (logps, old, ref, adv, mask)]
    loss, diag = grpo_loss(*tensors, kl_beta=0.1, clip_eps=0.2)
    assert loss.shape == (2,)  # per sequence
    for b in range(2):
        one = [x[b : b + 1] for x in (logps, old, ref, adv, mask)]
        assert loss[b].item() == pytest.approx(hand_grpo(*one, 0.1, 0.2), abs=1e-6)
    # clipped: sequence 0's token 1 (ratio exp(0.2) > 1.2 with A > 0); sequence 1's token 2 has
    # ratio exp(-1) but A < 0 pushes it down, out of range on the favoured side: clipped too
    assert diag["clipped"].tolist() == [1.0, 1.0]
    # summed per sequence, not length-normalised: a sequence twice as long (same tokens repeated)
    # counts twice as much
    x = torch.tensor([[-1.0]])
    one, _ = grpo_loss(x, x, x, torch.tensor([2.0]), torch.tensor([[True]]), 0.0, 0.2)
    xx = torch.tensor([[-1.0, -1.0]])
    two, _ = grpo_loss(xx, xx, xx, torch.tensor([2.0]), torch.tensor([[True, True]]), 0.0, 0.2)
    assert one.item() == pytest.approx(-2.0) and two.item() == pytest.approx(-4.0)


def test_grpo_loss_gradient_is_reinforce_on_policy():
    """old_logps = logps.detach(): the ratio is 1 and the gradient is REINFORCE's plus the k3 KL's,
    -A * grad log p + kl_beta * (1 - exp(ref - log p)) per response token, averaged over
    sequences."""
    torch.manual_seed(0)
    logps = (-torch.rand(3, 5) * 3).requires_grad_(True)
    ref = -torch.rand(3, 5) * 3
    adv = torch.tensor([1.2, -0.4, 0.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    grpo_loss(logps, logps.detach(), ref, adv, mask, kl_beta=0.05, clip_eps=0.2)[
        0
    ].mean().backward()
    expected = mask * (-adv[:, None] + 0.05 * (1 - torch.exp(ref - logps.detach()))) / 3
    assert torch.allclose(logps.grad, expected, atol=1e-6)
    # the same as autograd through the REINFORCE surrogate
    x = logps.detach().clone().requires_grad_(True)
    d = ref - x
    (((-adv[:, None] * x + 0.05 * (torch.exp(d) - d - 1)) * mask).sum(-1).mean()).backward()
    assert torch.allclose(logps.grad, x.grad, atol=1e-6)


@pytest.mark.parametrize(
    "adv, ratio, clipped",
    [
        *[(1.0, 1.5, True), (-1.0, 0.5, True)],  # out on the favoured side
        *[(1.0, 0.5, False), (-1.0, 1.5, False)],  # out on the other side
        *[(1.0, 1.1, False), (-1.0, 0.9, False), (1.0, 0.85, False)],
    ],
)
def test_grpo_clip_engages_only_where_the_advantage_pushes_out(adv, ratio, clipped):
    logp = torch.tensor([[-1.0]], requires_grad=True)
    old = logp.detach() - math.log(ratio)
    mask = torch.tensor([[True]])
    loss, diag = grpo_loss(logp, old, logp.detach(), torch.tensor([adv]), mask, 0.0, 0.2)
    assert diag["clipped"].item() == float(clipped)
    loss.sum().backward()
    if clipped:
        assert logp.grad.item() == 0.0
    else:
        assert logp.grad.item() == pytest.approx(-adv * ratio, rel=1e-5)  # d(-ratio * A)/d log p
    # with a KL term, a clipped token still gets the KL's gradient
    logp.grad = None
    ref = torch.tensor([[-2.0]])
    grpo_loss(logp, old, ref, torch.tensor([adv]), mask, kl_beta=0.1, clip_eps=0.2)[
        0
    ].sum().backward()
    kl_grad = 0.1 * (1 - math.exp(-1.0))
    assert logp.grad.item() == pytest.approx(kl_grad + (0.0 if clipped else -adv * ratio), rel=1e-5)


def test_group_dpo_loss_by_hand():
    policy = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -3.0, -4.5, -4.0])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])  # group_labels' 1 correct, 0 incorrect
    beta = 0.2
    ratio = [p - r for p, r in zip(policy.tolist(), ref.tolist())]
    pairs = [(c, r) for c in (0, 2) for r in (1, 3, 4)]  # |Y_c| x |Y_r| = 6
    losses, diag = group_dpo_loss(policy, ref, labels, beta)
    expected = [math.log(1 + math.exp(-beta * (ratio[c] - ratio[r]))) for c, r in pairs]
    assert losses.tolist() == pytest.approx(expected)
    assert list(zip(diag["chosen"].tolist(), diag["rejected"].tolist())) == pairs
    assert diag["margin"].tolist() == pytest.approx(
        [beta * (ratio[c] - ratio[r]) for c, r in pairs]
    )
    # one correct, one incorrect: GroupDPO is plain DPO
    two, _ = group_dpo_loss(policy[:2], ref[:2], labels[:2], beta)
    assert torch.allclose(two, dpo_loss(policy[:1], policy[1:2], ref[:1], ref[1:2], beta)[0])
    losses.mean().backward()  # eq. 4
    # correct pushed up, incorrect down
    assert (policy.grad[[0, 2]] < 0).all() and (policy.grad[[1, 3, 4]] > 0).all()
    # a label 0.5 (a reward-model score at the group's mean) is in neither set
    labels = torch.tensor([1.0, 0.5, 1.0, 0.0, 0.5])
    _, diag = group_dpo_loss(policy, ref, labels, beta)
    assert list(zip(diag["chosen"].tolist(), diag["rejected"].tolist())) == [(0, 3), (2, 3)]


@pytest.mark.parametrize("labels", [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]])
def test_group_dpo_loss_without_a_mix_has_no_pairs(labels):
    policy = torch.tensor([-1.0, -2.0, -3.0])
    losses, diag = group_dpo_loss(policy, torch.tensor([-1.0] * 3), torch.tensor(labels), 0.1)
    assert losses.shape == (0,) and diag["chosen"].shape == (0,)


def test_group_labels_split_at_the_mean():
    rewards = [[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.3, 0.9, 0.6, 0.6], [0.0] * 4]
    labels, mixed = group_labels(rewards)
    assert labels[0] == [1.0, 0.0, 1.0, 0.0]
    assert labels[1] == [0.5] * 4  # all equal: in neither set
    # reward-model scores: above the mean 1, below 0, at it 0.5
    assert labels[2] == [0.0, 1.0, 0.5, 0.5]
    assert mixed == [0, 2]


def test_make_pairs_chosen_highest_rejected_lowest():
    """Section 2's pairs, the same function in both DPO scripts: a random highest-reward response
    against a random lowest-reward one; a prompt whose rewards are all equal is skipped."""
    import dpo_offline
    import dpo_semionline

    assert dpo_offline.make_pairs is dpo_semionline.make_pairs  # offline pairs as online does
    groups = [[Sample([k], f"p{i}r{k}", [0.0]) for k in range(4)] for i in range(4)]
    rewards = [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.2, 0.9, -0.5, 0.9],
               [1.0, 1.0, 1.0, 1.0]]  # fmt: skip
    pairs = dpo_semionline.make_pairs(groups, rewards, random.Random(3))
    assert [i for i, _, _ in pairs] == [0, 2]
    for i, chosen, rejected in pairs:
        r = dict(zip([s.text for s in groups[i]], rewards[i]))
        assert r[chosen.text] == max(rewards[i]) and r[rejected.text] == min(rewards[i])
    assert pairs[1][2].text == "p2r2"  # the one lowest score
    seen = set()
    for seed in range(40):
        for _, c, r in dpo_semionline.make_pairs(groups[:1], rewards[:1], random.Random(seed)):
            seen.add((c.text, r.text))
    # random among the ties
    assert seen == {(c, r) for c in ("p0r0", "p0r2") for r in ("p0r1", "p0r3")}


def test_group_dpo_two_passes_give_the_one_pass_gradient():
    """Two groups of 3 responses, in micro-batches of 2 that cut across the groups: eq. 4's
    coefficients (pass a) times each micro-batch's log-probs (pass b) give the gradient of the
    groups' summed eq. 4 loss taken in one autograd pass over all responses."""
    from common import Sample, pad_sequences, token_logps
    from group_dpo import group_dpo_coefficients, group_dpo_loss

    model = tiny_random_model()
    prompts = [[5, 6, 7]] * 3 + [[8, 9]] * 3
    responses = [[10, 11], [12, 13, 14], [15], [16, 17], [18], [19, 20, 21]]
    labels = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    samples = [Sample(r, "", [0.0] * len(r)) for r in responses]
    kept = [(i // 3, s, x, 0.0) for i, (s, x) in enumerate(zip(samples, labels))]
    ref = torch.tensor([-3.0, -5.0, -1.5, -2.0, -1.0, -4.0])  # any reference log-probs
    padded = pad_sequences(prompts, responses, 0, torch.device("cpu"))

    logps = token_logps(model, *padded)[0].sum(-1)
    one_pass = 0.0
    for g in (slice(0, 3), slice(3, 6)):
        one_pass = (
            one_pass + group_dpo_loss(logps[g], ref[g], torch.tensor(labels[g]), 0.1)[0].mean()
        )
    expected = torch.autograd.grad(one_pass, list(model.parameters()))

    with torch.no_grad():
        values = token_logps(model, *padded)[0].sum(-1)
    sums = {}
    loss, coef = group_dpo_coefficients([values], [ref], kept, 3, 0.1, sums)
    assert loss.item() == pytest.approx(one_pass.item(), rel=1e-6)
    assert sums["pairs"] == 2 * 1 + 1 * 2  # 2 correct x 1 incorrect, then 1 x 2
    model.zero_grad()
    for start in range(0, 6, 2):  # pass (b), micro-batch by micro-batch
        mb = slice(start, start + 2)
        part = pad_sequences(prompts[mb], responses[mb], 0, torch.device("cpu"))
        (coef[mb] * token_logps(model, *part)[0].sum(-1)).sum().backward()
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.grad, e, atol=1e-6), (p.grad - e).abs().max()
    assert max(e.abs().max() for e in expected) > 1e-4  # not a vacuous zero gradient


@pytest.mark.parametrize("nll_coef, entropy_coef", [(0.0, 0.0), (1.0, 0.0), (0.0, 0.5)])
def test_dpo_ablation_terms_add_their_gradient(tiny_model, tmp_path, nll_coef, entropy_coef):
    """dpo_offline.py --pairs, one pair, one step: the logged gradient norm (before clipping) is
    that of the DPO loss plus nll_coef x the chosen response's mean token NLL minus entropy_coef x
    its mean next-token entropy, computed here by hand from the same prompt and tokens."""
    from common import load_model, pad_sequences, token_logps
    from data import build_prompt, load_tokenizer
    from dpo_offline import row_to_pair

    answer = " 3 * 4 = {0}. The final answer is $\\boxed{{{0}}}$.\n\n"
    row = {"prompt": "What is 3 * 4?", "chosen": answer.format(12), "rejected": answer.format(13)}
    path = tmp_path / "pair.jsonl"
    path.write_text(json.dumps(row) + "\n")
    out = tmp_path / "run"
    flags = ["--pairs", path, "--steps", 1, "--prompts_per_step", 1, "--val_size", 2]
    flags += ["--bf16", "false"]
    flags += ["--nll_coef", nll_coef, "--entropy_coef", entropy_coef, "--grad_clip", 1e9]
    run_script("dpo_offline.py", "--model", tiny_model, "--sampler", "hf", *flags, "--out", out)
    logged = [r for r in metrics(out) if "loss" in r][0]

    tokenizer = load_tokenizer(tiny_model)
    model = load_model(tiny_model, torch.device("cpu"))
    chosen, rejected = row_to_pair(row | {"problem": row["prompt"]}, tokenizer)
    prompt = build_prompt(tokenizer, {"problem": row["prompt"]})
    responses = [chosen.token_ids, rejected.token_ids]
    padded = pad_sequences([prompt] * 2, responses, tokenizer.pad_token_id, torch.device("cpu"))
    logps, entropy = token_logps(model, *padded)
    chosen_logp, rejected_logp = logps.sum(-1)
    ref = logps.sum(-1).detach()  # the reference is the seed, as the policy is at step 0
    margin = 0.1 * ((chosen_logp - ref[0]) - (rejected_logp - ref[1]))
    tokens = len(chosen.token_ids)
    loss = -torch.nn.functional.logsigmoid(margin) + nll_coef * (-chosen_logp / tokens)
    loss = loss - entropy_coef * entropy[0].sum() / tokens
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    norm = math.sqrt(sum(g.square().sum().item() for g in grads if g is not None))
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-4), (logged, norm)
    assert logged["loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_stochastic_round_is_unbiased_and_lands_on_a_neighbour():
    """fp32 -> bf16 at a sync, from a bf16 checkpoint moved by less than half an ulp (a small
    learning rate's update): rounded to the nearest, not one weight moves; stochastically, each
    value lands on one of the two bf16 values around it, the far one with probability equal to the
    remainder, so over many casts the whole update is handed over. bf16 values stay themselves."""
    from common import stochastic_round

    torch.manual_seed(0)
    seed = torch.randn(4096).bfloat16().float()
    update = torch.rand(4096) * seed.abs() * 2**-9 * torch.randn(4096).sign()  # < half an ulp
    weights = seed + update
    assert (weights.bfloat16().float() == seed).all()  # to the nearest: the update is lost
    draws = [stochastic_round(weights, torch.Generator().manual_seed(k)) for k in range(400)]
    casts = torch.stack(draws).float()
    assert draws[0].dtype == torch.bfloat16
    step = casts - seed  # 0, or one bf16 ulp (at most 2^-7 of the value) towards the weight
    assert (
        (step == 0) | ((step.sign() == update.sign()) & (step.abs() <= seed.abs() * 2**-7))
    ).all()
    moved = (casts.mean(0) - seed) * update.sign()
    handed_over = moved.sum() / update.abs().sum()  # 1: the whole update, on average
    assert abs(handed_over.item() - 1) < 0.05, handed_over
    exact = torch.randn(1000).bfloat16().float()
    assert (stochastic_round(exact, torch.Generator().manual_seed(0)).float() == exact).all()
