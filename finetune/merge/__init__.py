"""Merge stage: refuse what cannot merge right (`checks`, `mergeable`), bake the adapter in and verify (`bake`)."""
