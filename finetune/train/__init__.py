"""Train stage: every cheap check first (`checks`, `memory`), then data, model and the TRL trainer.

`run` orchestrates one run inside `lifecycle` (lock, resume, interruption, provenance); `trainers`
builds the SFT or preference trainer (`sft`, `preference`); `callbacks`, `progress` and `trackers`
watch it.
"""
