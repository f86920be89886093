"""MAPPO / IPPO on a tiny cooperative ParallelEnv (not driving): it learns, and the plumbing holds.

The stated target: on ReachEnv (2 agents, targets up to 8 units away, 12 steps) the mean team
return of finished episodes reaches >= 0.9 within 40 iterations of 4 envs x 40 steps (6,400 env
steps). A uniformly random policy scores about -1.3 there and the best possible is about 1.5.
"""

import numpy as np
import pytest
import torch
from gymnasium import spaces
from planning_toy_envs import ReachEnv

from models.planning.mappo import MAPPOConfig, MAPPOTrainer
from models.planning.networks import NetworkConfig
from models.planning.ppo import PPOConfig
from models.planning.vec_env import ParallelVecEnv

TARGET_RETURN = 0.9


def _config(**kw) -> MAPPOConfig:
    base = {
        "num_envs": 4,
        "rollout_steps": 40,
        "seed": 0,
        "network": NetworkConfig(hidden_sizes=(64, 64)),
        "ppo": PPOConfig(actor_lr=3e-3, critic_lr=3e-3, epochs=4, minibatches=2, chunk_length=10),
    }
    base.update(kw)
    return MAPPOConfig(**base)


def _random_return(episodes: int = 200) -> float:
    env = ReachEnv()
    rng = np.random.default_rng(0)
    total = 0.0
    for i in range(episodes):
        env.reset(seed=i)
        while env.agents:
            _, rew, _, _, _ = env.step({a: int(rng.integers(3)) for a in env.agents})
            total += sum(rew.values())
    return total / episodes


def test_mappo_learns_the_cooperative_reach_task():
    torch.set_num_threads(1)
    assert _random_return() < 0.0  # the task is not solved by chance
    trainer = MAPPOTrainer([ReachEnv for _ in range(4)], _config())
    returns = []
    for _ in range(40):
        stats = trainer.train_iteration()
        if stats.mean_return is not None:
            returns.append(stats.mean_return)
    assert np.mean(returns[:3]) < 0.5
    assert np.mean(returns[-5:]) >= TARGET_RETURN, returns[-5:]
    trainer.close()


@pytest.mark.parametrize(
    ("algorithm", "continuous", "recurrent"),
    [("ippo", False, False), ("mappo", True, False), ("mappo", False, True)],
)
def test_variants_run_and_keep_finite_statistics(algorithm, continuous, recurrent):
    torch.set_num_threads(1)
    config = _config(
        algorithm=algorithm, network=NetworkConfig(hidden_sizes=(16,), recurrent=recurrent, rnn_hidden=8)
    )
    trainer = MAPPOTrainer([lambda: ReachEnv(continuous=continuous) for _ in range(4)], config)
    if algorithm == "ippo":
        assert trainer.critic_dim == trainer.envs.obs_dim + 2
    else:
        assert trainer.critic_dim == trainer.envs.state_dim + trainer.envs.obs_dim + 2
    for _ in range(2):
        stats = trainer.train_iteration()
        assert all(np.isfinite(v) for v in vars(stats.ppo).values())
    assert trainer.env_steps == 2 * 4 * 40


def test_linear_learning_rate_decay_follows_the_env_steps_and_survives_a_resume():
    torch.set_num_threads(1)
    ppo = PPOConfig(actor_lr=2e-3, critic_lr=1e-3, epochs=1, minibatches=1, lr_decay=True)
    config = _config(num_envs=2, rollout_steps=10, total_steps=80, ppo=ppo)  # 4 iterations of 20 steps
    trainer = MAPPOTrainer([ReachEnv for _ in range(2)], config)
    seen = []
    while not trainer.done:
        trainer.train_iteration()
        seen.append((trainer.actor_optimizer.param_groups[0]["lr"], trainer.critic_optimizer.param_groups[0]["lr"]))
    np.testing.assert_allclose([a for a, _ in seen], [2e-3, 1.5e-3, 1e-3, 0.5e-3])
    np.testing.assert_allclose([c for _, c in seen], [1e-3, 0.75e-3, 0.5e-3, 0.25e-3])
    # resumed after two iterations, the schedule goes on where it was
    resumed = MAPPOTrainer([ReachEnv for _ in range(2)], config)
    first = MAPPOTrainer([ReachEnv for _ in range(2)], config)
    first.train_iteration()
    first.train_iteration()
    resumed.load_state_dict(first.state_dict())
    resumed.train_iteration()
    assert resumed.actor_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    # without the option the rates stay as configured
    plain = MAPPOTrainer([ReachEnv for _ in range(2)], _config(num_envs=2, rollout_steps=10, ppo=PPOConfig(actor_lr=2e-3)))
    plain.train_iteration()
    plain.train_iteration()
    assert plain.actor_optimizer.param_groups[0]["lr"] == 2e-3
    for t in (trainer, resumed, first, plain):
        t.close()


def test_checkpoint_state_round_trip_gives_the_same_policy():
    torch.set_num_threads(1)
    a = MAPPOTrainer([ReachEnv for _ in range(2)], _config(num_envs=2, rollout_steps=10))
    a.train_iteration()
    b = MAPPOTrainer([ReachEnv for _ in range(2)], _config(num_envs=2, rollout_steps=10, seed=5))
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, a.actor_dim)
    assert torch.equal(a.actor(x)[0].logits, b.actor(x)[0].logits)
    assert b.iteration == 1 and b.env_steps == 20


def test_vec_env_pads_finished_agents_and_resets_finished_envs():
    vec = ParallelVecEnv([lambda: ReachEnv(max_steps=3)], seed=0)
    obs, state, alive = vec.reset()
    assert obs.shape == (1, 2, vec.obs_dim) and alive.all() and state.shape == (1, 4)
    env = vec.envs[0]
    env.pos[:] = [0.0, 0.0]
    env.target[:] = [1.0, 4.0]
    # step 1: agent 0 reaches its target (terminated); agent 1 stays
    step = vec.step(np.array([[2, 1]]))
    assert step.dones.tolist() == [[True, False]] and not step.truncated.any()
    assert step.alive.tolist() == [[False, True]] and np.all(step.obs[0, 0] == 0.0)
    assert step.rewards[0].tolist() == pytest.approx([1.0, -0.1]) and not step.episodes
    # steps 2, 3: agent 1 idles until the time limit truncates it; the env then resets
    step = vec.step(np.array([[0, 1]]))  # agent 0's action is ignored
    assert step.rewards[0, 0] == 0.0 and step.alive.tolist() == [[False, True]]
    step = vec.step(np.array([[0, 1]]))
    assert step.dones.tolist() == [[False, True]] and step.truncated.tolist() == [[False, True]]
    assert np.any(step.final_obs[0, 1] != 0.0)
    assert len(step.episodes) == 1
    assert step.episodes[0]["returns"] == pytest.approx({"agent_0": 1.0, "agent_1": -0.3})
    assert step.alive.all()  # a new episode started


def test_agents_must_share_spaces():
    class Mixed(ReachEnv):
        def action_space(self, agent):
            return spaces.Discrete(3) if agent == "agent_0" else spaces.Discrete(4)

    with pytest.raises(ValueError, match="same observation and action spaces"):
        ParallelVecEnv([Mixed])


def test_truncated_episodes_are_bootstrapped_only_when_asked():
    """ReachEnv truncates at max_steps: with bootstrapping the last step's reward gains
    gamma x V(final state); without it, the reward stays what the env paid."""
    torch.set_num_threads(1)
    rewards = {}
    for bootstrap in (True, False):
        config = _config(num_envs=1, rollout_steps=3, bootstrap_truncated=bootstrap)
        trainer = MAPPOTrainer([lambda: ReachEnv(max_steps=3, half_width=40)], config)
        with torch.no_grad():  # a critic that says 5 everywhere
            trainer.critic.head.weight.zero_()
            trainer.critic.head.bias.fill_(5.0)
        trainer.value_norm = None
        trainer.envs.envs[0].target[:] = trainer.envs.envs[0].pos + 30.0  # out of reach
        buffer, _ = trainer.collect()
        rewards[bootstrap] = buffer.rewards[:, 0].clone()  # (T, N)
        trainer.close()
    assert torch.allclose(rewards[False], torch.full((3, 2), -0.1))
    assert torch.allclose(rewards[True][:2], rewards[False][:2])
    assert torch.allclose(rewards[True][2], torch.full((2,), -0.1 + 0.99 * 5.0))
