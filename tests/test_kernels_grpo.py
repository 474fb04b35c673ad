"""Numeric checks of the GRPO and GroupDPO kernels against hand computation."""
import math

import pytest
import torch

from common import dpo_loss, grpo_advantages, grpo_loss
from group_dpo import group_dpo_loss


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.3, 0.3, 0.3, 0.3]])
    adv = grpo_advantages(rewards)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 2: mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5
    s0 = math.sqrt(1 / 3)
    expected = torch.tensor([[0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), -0.5 / (s0 + 1e-6), 0.5 / (s0 + 1e-6)],
                             [0.0] * 4, [-0.25 / 0.500001] * 3 + [0.75 / 0.500001], [0.0] * 4])
    assert adv.shape == (4, 4) and torch.allclose(adv, expected, atol=1e-6)
    assert (adv[1] == 0).all() and (adv[3] == 0).all()  # all-equal groups: exactly 0, even for 0.3 (mean not exact)
    centred = grpo_advantages(rewards, std_normalize=False)
    assert torch.allclose(centred[0], torch.tensor([0.5, -0.5, -0.5, 0.5])) and (centred[3] == 0).all()
    assert torch.allclose(centred[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]))


def _hand_grpo(logps, old, ref, adv, mask, kl_beta, eps):
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
    old = [[0.0, -1.2, -0.1, -2.0], [0.0, -0.3, -3.0, 0.0]]   # ratios exp(0.2) (clipped for A>0), exp(-0.4), 1; 1, exp(-1)
    ref = [[0.0, -0.8, -0.7, -1.0], [0.0, -0.5, -3.5, 0.0]]
    mask = [[False, True, True, True], [False, True, True, False]]
    adv = [1.5, -0.7]
    loss, diag = grpo_loss(torch.tensor(logps), torch.tensor(old), torch.tensor(ref), torch.tensor(adv),
                           torch.tensor(mask), kl_beta=0.1, clip_eps=0.2)
    assert loss.shape == (2,)  # per sequence
    for b in range(2):
        assert loss[b].item() == pytest.approx(_hand_grpo(logps[b:b + 1], old[b:b + 1], ref[b:b + 1], adv[b:b + 1],
                                                          mask[b:b + 1], 0.1, 0.2), abs=1e-6)
    # clipped: sequence 0's token 1 (ratio exp(0.2) > 1.2 with A > 0); sequence 1's token 2 has ratio exp(-1) but A < 0
    # pushes it down, out of range on the favoured side: clipped too
    assert diag["clipped"].tolist() == [1.0, 1.0]
    # summed per sequence, not length-normalised: a sequence twice as long (same tokens repeated) counts twice as much
    one, _ = grpo_loss(torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.tensor([[-1.0]]), torch.tensor([2.0]),
                       torch.tensor([[True]]), 0.0, 0.2)
    two, _ = grpo_loss(torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.0, -1.0]]), torch.tensor([[-1.0, -1.0]]),
                    torch.tensor([2.0]), torch.tensor([[True, True]]), 0.0, 0.2)
    assert one.item() == pytest.approx(-2.0) and two.item() == pytest.approx(-4.0)


def test_grpo_loss_gradient_is_reinforce_on_policy():
    """old_logps = logps.detach(): the ratio is 1 and the gradient is REINFORCE's plus the k3 KL's,
    -A * grad log p + kl_beta * (1 - exp(ref - log p)) per response token, averaged over sequences."""
    torch.manual_seed(0)
    logps = (-torch.rand(3, 5) * 3).requires_grad_(True)
    ref = -torch.rand(3, 5) * 3
    adv = torch.tensor([1.2, -0.4, 0.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    grpo_loss(logps, logps.detach(), ref, adv, mask, kl_beta=0.05, clip_eps=0.2)[0].mean().backward()
    expected = mask * (-adv[:, None] + 0.05 * (1 - torch.exp(ref - logps.detach()))) / 3
    assert torch.allclose(logps.grad, expected, atol=1e-6)
    # the same as autograd through the REINFORCE surrogate
    x = logps.detach().clone().requires_grad_(True)
    d = ref - x
    (((-adv[:, None] * x + 0.05 * (torch.exp(d) - d - 1)) * mask).sum(-1).mean()).backward()
    assert torch.allclose(logps.grad, x.grad, atol=1e-6)


@pytest.mark.parametrize("adv, ratio, clipped", [(1.0, 1.5, True), (-1.0, 0.5, True),        # out on the favoured side
                                                 (1.0, 0.5, False), (-1.0, 1.5, False),      # out on the other side
                                                 (1.0, 1.1, False), (-1.0, 0.9, False), (1.0, 0.85, False)])
def test_grpo_clip_engages_only_where_the_advantage_pushes_out(adv, ratio, clipped):
    logp = torch.tensor([[-1.0]], requires_grad=True)
    old = logp.detach() - math.log(ratio)
    loss, diag = grpo_loss(logp, old, logp.detach(), torch.tensor([adv]), torch.tensor([[True]]), kl_beta=0.0,
                           clip_eps=0.2)
    assert diag["clipped"].item() == float(clipped)
    loss.sum().backward()
    if clipped:
        assert logp.grad.item() == 0.0
    else:
        assert logp.grad.item() == pytest.approx(-adv * ratio, rel=1e-5)  # d(-ratio * A)/d log p
    # with a KL term, a clipped token still gets the KL's gradient
    logp.grad = None
    ref = torch.tensor([[-2.0]])
    grpo_loss(logp, old, ref, torch.tensor([adv]), torch.tensor([[True]]), kl_beta=0.1, clip_eps=0.2)[0].sum().backward()
    kl_grad = 0.1 * (1 - math.exp(-1.0))
    assert logp.grad.item() == pytest.approx(kl_grad + (0.0 if clipped else -adv * ratio), rel=1e-5)


def test_group_dpo_loss_by_hand():
    policy = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0], requires_grad=True)
    ref = torch.tensor([-1.5, -1.0, -3.0, -4.5, -4.0])
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    beta = 0.2
    ratio = [p - r for p, r in zip(policy.tolist(), ref.tolist())]
    pairs = [(c, r) for c in (0, 2) for r in (1, 3, 4)]  # |Y_c| x |Y_r| = 6
    losses, diag = group_dpo_loss(policy, ref, rewards, beta)
    assert losses.tolist() == pytest.approx([math.log(1 + math.exp(-beta * (ratio[c] - ratio[r]))) for c, r in pairs])
    assert list(zip(diag["chosen"].tolist(), diag["rejected"].tolist())) == pairs
    assert diag["margin"].tolist() == pytest.approx([beta * (ratio[c] - ratio[r]) for c, r in pairs])
    # one correct, one incorrect: GroupDPO is plain DPO
    two, _ = group_dpo_loss(policy[:2], ref[:2], rewards[:2], beta)
    assert torch.allclose(two, dpo_loss(policy[:1], policy[1:2], ref[:1], ref[1:2], beta)[0])
    losses.mean().backward()  # eq. 4
    assert (policy.grad[[0, 2]] < 0).all() and (policy.grad[[1, 3, 4]] > 0).all()  # correct pushed up, incorrect down


@pytest.mark.parametrize("rewards", [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
def test_group_dpo_loss_without_a_mix_has_no_pairs(rewards):
    losses, diag = group_dpo_loss(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-1.0] * 3), torch.tensor(rewards), 0.1)
    assert losses.shape == (0,) and diag["chosen"].shape == (0,)


def test_make_pairs_chosen_highest_rejected_lowest():
    """Section 2's pairs, in both DPO scripts (copies by design; they must agree): a random highest-reward response
    against a random lowest-reward one; a prompt whose rewards are all equal is skipped."""
    import random
    import dpo_offline, dpo_semionline
    from common import Sample
    groups = [[Sample([k], f"p{i}r{k}", [0.0]) for k in range(4)] for i in range(4)]
    rewards = [[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.2, 0.9, -0.5, 0.9], [1.0, 1.0, 1.0, 1.0]]
    pairs = dpo_semionline.make_pairs(groups, rewards, random.Random(3))
    assert [i for i, _, _ in pairs] == [0, 2]
    for i, chosen, rejected in pairs:
        r = dict(zip([s.text for s in groups[i]], rewards[i]))
        assert r[chosen.text] == max(rewards[i]) and r[rejected.text] == min(rewards[i])
    assert pairs[1][2].text == "p2r2"  # the one lowest score
    seen = {(c.text, r.text) for seed in range(40) for _, c, r in dpo_semionline.make_pairs(groups[:1], rewards[:1],
                                                                                            random.Random(seed))}
    assert seen == {(c, r) for c in ("p0r0", "p0r2") for r in ("p0r1", "p0r3")}  # random among the ties
    other = dpo_offline.make_pairs(groups, rewards, random.Random(3))
    assert [(i, c.text, r.text) for i, c, r in other] == [(i, c.text, r.text) for i, c, r in pairs]


def test_group_labels_split_at_the_mean():
    from group_dpo import group_labels
    labels, mixed = group_labels([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.3, 0.9, 0.6, 0.6], [0.0] * 4])
    assert labels[0] == [1.0, 0.0, 1.0, 0.0] and labels[1] == [0.5] * 4  # all equal: in neither set
    assert labels[2] == [0.0, 1.0, 0.5, 0.5]  # reward-model scores: above the mean 1, below 0, at it 0.5
    assert mixed == [0, 2]


def test_read_pairs_names_file_and_line(tmp_path):
    from dpo_offline import read_pairs
    p = tmp_path / "pairs.jsonl"
    p.write_text('{"prompt": "What is 2 * 3?", "chosen": " 6", "rejected": " 5"}\n\n{"problem": "Hi", "chosen": "a", '
                 '"rejected": "b"}\n')
    rows = read_pairs(str(p))
    assert [r["problem"] for r in rows] == ["What is 2 * 3?", "Hi"] and rows[0]["chosen"] == " 6"
    p.write_text('{"prompt": "What is 2 * 3?", "chosen": " 6", "rejected": " 5"}\n\n{"prompt": "x", "chosen": "a"}\n')
    with pytest.raises(SystemExit, match=r"pairs\.jsonl:3: row needs 'prompt', 'chosen' and 'rejected' text"):
        read_pairs(str(p))
    p.write_text("\n")
    with pytest.raises(SystemExit, match=r"pairs\.jsonl: no pairs"):
        read_pairs(str(p))
