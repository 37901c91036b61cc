"""Reinforcement learning with verifiable rewards: prompt data, verifiers, rollouts (the grpo stage's parts)."""
