"""Inference: load a base with its adapters (`load`), then chat, generate or evaluate with it."""
