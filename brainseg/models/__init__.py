"""Architectures by name and losses by name."""
