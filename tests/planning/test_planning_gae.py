"""GAE against a hand-computed case, episode ends, and bad input."""

import pytest
import torch

from models.planning.gae import compute_gae


def test_hand_computed_three_steps_with_an_episode_end():
    # one agent, T = 3; the episode ends with step 1, a new one starts at step 2
    rewards = torch.tensor([1.0, 2.0, 3.0])
    values = torch.tensor([0.5, 1.0, 2.0])
    dones = torch.tensor([0.0, 1.0, 0.0])
    next_value = torch.tensor(4.0)
    gamma, lam = 0.9, 0.8
    adv, ret = compute_gae(rewards, values, dones, next_value, gamma, lam)
    # step 2: delta = 3 + 0.9 * 4 - 2 = 4.6; A = 4.6
    # step 1: delta = 2 + 0 - 1 = 1.0 (done: no bootstrap); A = 1.0 (nothing after a done)
    # step 0: delta = 1 + 0.9 * 1.0 - 0.5 = 1.4; A = 1.4 + 0.9 * 0.8 * 1.0 = 2.12
    assert adv.tolist() == pytest.approx([2.12, 1.0, 4.6])
    assert ret.tolist() == pytest.approx([2.62, 2.0, 6.6])


def test_lambda_one_gives_discounted_returns_and_lambda_zero_td_errors():
    torch.manual_seed(0)
    rewards, values = torch.rand(6, 2, 3), torch.rand(6, 2, 3)
    dones = torch.zeros(6, 2, 3)
    next_value = torch.rand(2, 3)
    gamma = 0.95
    _, ret = compute_gae(rewards, values, dones, next_value, gamma, 1.0)
    expected = next_value.clone()
    for t in reversed(range(6)):
        expected = rewards[t] + gamma * expected
        assert torch.allclose(ret[t], expected, atol=1e-5)
    adv0, _ = compute_gae(rewards, values, dones, next_value, gamma, 0.0)
    following = torch.cat([values[1:], next_value[None]])
    assert torch.allclose(adv0, rewards + gamma * following - values, atol=1e-6)


def test_shape_and_range_errors():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="must agree"):
        compute_gae(x, torch.zeros(4, 3), x, torch.zeros(2), 0.9, 0.9)
    with pytest.raises(ValueError, match="next_value"):
        compute_gae(x, x, x, torch.zeros(3), 0.9, 0.9)
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(x, x, x, torch.zeros(2), 1.5, 0.9)
