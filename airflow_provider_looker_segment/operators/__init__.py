"""Operators of the Looker → Segment provider."""
