"""Merge methods: pure tensor functions, registered by name."""
