"""Networks (recurrent resets, heads) and rollout minibatches (coverage, chunk alignment)."""

import pytest
import torch
from gymnasium import spaces

from models.planning.buffer import RolloutBuffer
from models.planning.networks import Actor, Critic, NetworkConfig


@pytest.mark.parametrize("space", [spaces.Discrete(4), spaces.Box(-1, 1, (3,))])
def test_actor_shapes_for_both_action_spaces(space):
    actor = Actor(6, space, NetworkConfig(hidden_sizes=(16,)))
    dist, hidden = actor(torch.randn(2, 5, 6))
    sample = dist.sample()
    assert sample.shape == ((2, 5) if isinstance(space, spaces.Discrete) else (2, 5, 3))
    assert dist.log_prob(sample).shape == (2, 5) and dist.entropy().shape == (2, 5)
    assert hidden is None
    assert Actor.mode(dist).shape == sample.shape


def test_recurrent_sequence_equals_step_by_step_with_resets():
    torch.manual_seed(0)
    critic = Critic(4, NetworkConfig(hidden_sizes=(8,), recurrent=True, rnn_hidden=6))
    x = torch.randn(5, 3, 4)
    starts = torch.zeros(5, 3)
    starts[2, 1] = 1.0  # agent 1 starts a new episode at step 2
    h0 = torch.randn(3, 6)
    seq, h_seq = critic(x, h0, starts)
    h = h0
    outs = []
    for t in range(5):
        v, h = critic(x[t : t + 1], h, starts[t : t + 1])
        outs.append(v)
    assert torch.allclose(seq, torch.cat(outs), atol=1e-6) and torch.allclose(h_seq, h, atol=1e-6)
    # the reset makes agent 1's values from step 2 on independent of the initial state
    seq2, _ = critic(x, torch.randn(3, 6), starts)
    assert torch.allclose(seq[2:, 1], seq2[2:, 1], atol=1e-6)
    assert not torch.allclose(seq[:2, 1], seq2[:2, 1])


def _buffer(recurrent: bool) -> RolloutBuffer:
    buf = RolloutBuffer(6, 2, 3, 1, 1, (), True, actor_hidden=4 if recurrent else 0)
    for t in range(6):
        ident = (t * 100 + torch.arange(2)[:, None] * 10 + torch.arange(3)[None, :]).float()  # (E, N)
        alive = torch.ones(2, 3)
        alive[1, 2] = float(t < 3)  # env 1, agent 2 finished after step 2
        buf.insert(
            t,
            obs=ident[..., None],
            critic_obs=ident[..., None],
            actions=torch.zeros(2, 3, dtype=torch.long),
            logp=torch.zeros(2, 3),
            values=torch.zeros(2, 3),
            rewards=torch.ones(2, 3),
            dones=torch.zeros(2, 3),
            alive=alive,
            starts=torch.zeros(2, 3),
            actor_hidden=ident[..., None].repeat(1, 1, 4),
        )
    buf.compute_returns(torch.zeros(2, 3), 0.9, 0.9)
    return buf


def test_feed_forward_minibatches_cover_alive_samples_once():
    buf = _buffer(recurrent=False)
    seen = []
    for batch in buf.minibatches(4, torch.Generator().manual_seed(0)):
        assert batch.obs.shape[0] == 1 and bool((batch.mask == 1).all())
        seen += batch.obs.reshape(-1).tolist()
    expected = [
        t * 100 + e * 10 + n
        for t in range(6)
        for e in range(2)
        for n in range(3)
        if not (e == 1 and n == 2 and t >= 3)
    ]
    assert sorted(seen) == sorted(expected)


def test_recurrent_chunks_are_consecutive_steps_of_one_agent_with_their_first_hidden():
    buf = _buffer(recurrent=True)
    count = 0
    for batch in buf.minibatches(3, torch.Generator().manual_seed(0), chunk_length=3):
        obs = batch.obs[..., 0]  # (L, B)
        assert obs.shape[0] == 3
        assert torch.all(obs[1:] - obs[:-1] == 100)  # same (env, agent), next step
        assert torch.equal(batch.actor_hidden[:, 0], obs[0])  # hidden stored at the chunk's first step
        count += obs.shape[1]
    assert count == 2 * 2 * 3  # T / L chunks x E x N
    with pytest.raises(ValueError, match="must divide"):
        next(buf.minibatches(1, torch.Generator(), chunk_length=4))
