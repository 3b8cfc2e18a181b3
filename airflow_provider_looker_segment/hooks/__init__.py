"""Hooks of the Looker → Segment provider."""
