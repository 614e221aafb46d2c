"""Rollout: generation engines, rollout workers (Ray actors) and the resizable pool."""
