"""Flax (linen) transformer: layers, attention, stacks and heads. Imports only jax/flax."""
