"""Outcome rewards to advantages (spec sections 3.2 and 3.7). Host-side numpy."""

from __future__ import annotations

import numpy as np


def group_zscore(scores: np.ndarray) -> np.ndarray:
    """[groups, k] -> z-scores within each group (population std); 0 where a group is constant."""
    scores = np.asarray(scores, np.float64)
    mean = scores.mean(axis=1, keepdims=True)
    std = scores.std(axis=1, keepdims=True)
    safe = np.where(std > 0, std, 1.0)
    return np.where(std > 0, (scores - mean) / safe, 0.0)


def difficulty_filter(correct: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """[groups, k] -> [groups] bool: keep groups whose accuracy p has lower <= p <= upper."""
    accuracy = np.asarray(correct, np.float64).mean(axis=1)
    return (accuracy >= lower) & (accuracy <= upper)


def trace_gae(
    token_rewards: np.ndarray,
    values: np.ndarray,
    steps: np.ndarray,
    trainable: np.ndarray,
    gamma: float,
    lam: float,
) -> tuple[np.ndarray, np.ndarray]:
    """GAE over the global denoising steps of one response (spec 3.7).

    Tokens unmasked at the same step form one "time step" k (sorted distinct steps t_1 < ... < t_S
    of the trainable tokens). With step means r*_k, V*_k:
      R*_k = r*_k + γ R*_{k+1};  A*_k = (r*_k − V*_k + γ V*_{k+1}) + γλ A*_{k+1};
    and per token of step k: R_j = r_j + γ R*_{k+1},  A_j = (r_j − V_j) + γ V*_{k+1} + γλ A*_{k+1}.
    Returns (returns, advantages), 0 on non-trainable positions.
    """
    token_rewards = np.asarray(token_rewards, np.float64)
    values = np.asarray(values, np.float64)
    steps = np.asarray(steps)
    trainable = np.asarray(trainable, bool)
    returns = np.zeros_like(values)
    advantages = np.zeros_like(values)
    distinct = np.unique(steps[trainable])
    next_return = next_value = next_advantage = 0.0
    for step in distinct[::-1]:
        at = trainable & (steps == step)
        r_step, v_step = token_rewards[at].mean(), values[at].mean()
        returns[at] = token_rewards[at] + gamma * next_return
        advantages[at] = token_rewards[at] - values[at] + gamma * next_value + gamma * lam * next_advantage
        step_advantage = r_step - v_step + gamma * next_value + gamma * lam * next_advantage
        next_return = r_step + gamma * next_return
        next_value, next_advantage = v_step, step_advantage
    return returns, advantages


def outcome_token_rewards(reward: float, steps: np.ndarray, trainable: np.ndarray) -> np.ndarray:
    """The outcome reward sits on the tokens of the last step among the trainable ones."""
    rewards = np.zeros(len(steps), np.float64)
    if trainable.any():
        rewards[trainable & (steps == steps[trainable].max())] = reward
    return rewards
