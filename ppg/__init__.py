"""Partial Policy Gradients for multi-turn LLM conversational agents."""
