"""On-policy post-training (PPO, GRPO): filled in by later stages."""
