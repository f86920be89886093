"""PPO losses and update: clipping, and an update lowers the surrogate loss on a fixed batch."""

import torch
from gymnasium import spaces

from models.planning.buffer import RolloutBuffer
from models.planning.networks import Actor, Critic, NetworkConfig
from models.planning.ppo import PPOConfig, policy_loss, ppo_update, value_loss
from models.planning.value_norm import ValueNorm


def test_policy_loss_clips_the_ratio():
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[2.0, 2.0, 0.5, 0.5]]))  # ratios 2, 2, 0.5, 0.5
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, clip_fraction, _ = policy_loss(new, old, adv, mask, clip=0.2)
    # min(r A, clip(r) A): 1.2, -2.0, 0.5, -0.8 -> mean 0.275 * -1
    assert abs(float(loss) - (-(1.2 - 2.0 + 0.5 - 0.8) / 4)) < 1e-6
    assert float(clip_fraction) == 1.0
    # masked samples do not count
    loss_masked, _, _ = policy_loss(new, old, adv, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), clip=0.2)
    assert abs(float(loss_masked) + 1.2) < 1e-6


def test_value_loss_takes_the_worse_of_clipped_and_unclipped():
    old = torch.zeros(1, 2)
    ret = torch.tensor([[1.0, 1.0]])
    new = torch.tensor([[1.0, -1.0]])
    loss = value_loss(new, old, ret, torch.ones(1, 2), clip=0.2, huber_delta=0.0)
    # sample 0: unclipped error 0, clipped prediction 0.2 -> 0.5 * 0.8^2 = 0.32
    # sample 1: unclipped error 2 -> 2.0; clipped -0.2 -> 0.72; max = 2.0
    assert abs(float(loss) - (0.32 + 2.0) / 2) < 1e-6


def _fixed_buffer(discrete: bool) -> tuple[RolloutBuffer, Actor, Critic]:
    torch.manual_seed(0)
    space = spaces.Discrete(3) if discrete else spaces.Box(-1, 1, (2,))
    config = NetworkConfig(hidden_sizes=(32,))
    actor, critic = Actor(5, space, config), Critic(7, config)
    buf = RolloutBuffer(8, 2, 2, 5, 7, () if discrete else (2,), discrete)
    for t in range(8):
        obs = torch.randn(2, 2, 5)
        with torch.no_grad():
            dist, _ = actor(obs.reshape(1, 4, 5))
            act = dist.sample()
            logp = dist.log_prob(act).reshape(2, 2)
        buf.insert(
            t,
            obs=obs,
            critic_obs=torch.randn(2, 2, 7),
            actions=act.reshape(2, 2, *(() if discrete else (2,))),
            logp=logp,
            values=torch.randn(2, 2),
            rewards=torch.randn(2, 2),
            dones=torch.zeros(2, 2),
            alive=torch.ones(2, 2),
            starts=torch.zeros(2, 2),
        )
    buf.compute_returns(torch.zeros(2, 2), 0.99, 0.95)
    return buf, actor, critic


def _surrogate(actor: Actor, buf: RolloutBuffer) -> float:
    batch = next(buf.minibatches(1, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        dist, _ = actor(batch.obs)
        loss, _, _ = policy_loss(
            dist.log_prob(batch.actions), batch.old_logp, batch.advantages, batch.mask, 0.2
        )
    return float(loss)


def test_an_update_lowers_the_surrogate_loss_on_a_fixed_batch():
    for discrete in (True, False):
        buf, actor, critic = _fixed_buffer(discrete)
        before = _surrogate(actor, buf)
        assert abs(before) < 1e-5  # ratio 1: the surrogate is minus the mean (normalised) advantage = 0
        config = PPOConfig(epochs=4, minibatches=2, entropy_coef=0.0, actor_lr=1e-2)
        stats = ppo_update(
            actor,
            critic,
            torch.optim.Adam(actor.parameters(), lr=1e-2),
            torch.optim.Adam(critic.parameters(), lr=1e-2),
            buf,
            config,
            ValueNorm(),
            torch.Generator().manual_seed(1),
        )
        after = _surrogate(actor, buf)
        assert after < before - 1e-3, (discrete, before, after)
        assert stats.approx_kl >= 0.0 and 0.0 <= stats.clip_fraction <= 1.0
