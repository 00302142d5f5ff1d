"""Regenerate the shipped launch presets (finetune/resources/launch/) from the builders.

Run: python scripts/gen_launch_configs.py.

The files are what `finetune train` would generate for the same settings (tests/test_launch.py checks it),
so naming `distributed.config: zero3` and writing `zero_stage: 3` run the same thing.
"""

import json

import yaml

from finetune.launch.configs import configs_dir, deepspeed_config, fsdp_config

ROOT = configs_dir()

DEEPSPEED = {
    "zero1": deepspeed_config(1),
    "zero2": deepspeed_config(2),
    "zero3": deepspeed_config(3),
    "zero3-offload": deepspeed_config(3, offload_optimizer=True, offload_params=True),
}
ACCELERATE = {
    "fsdp2-full-shard": ("FSDP2: parameters re-sharded after each forward (least memory).", "full_shard"),
    "fsdp2-shard-grad-op": ("FSDP2: parameters stay gathered from forward to backward (faster, more memory).",
                            "shard_grad_op"),
}
HEADER = (
    "# {what}\n# Name it in a recipe: distributed: {{strategy: fsdp, config: {name}}}. finetune fills in the "
    "process, machine\n# and precision keys from the recipe; the run directory keeps the complete file that ran.\n"
)

for name, config in DEEPSPEED.items():
    path = ROOT / "deepspeed" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path}")
for name, (what, sharding) in ACCELERATE.items():
    path = ROOT / "accelerate" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"distributed_type": "FSDP", "fsdp_config": fsdp_config(sharding)}
    path.write_text(HEADER.format(what=what, name=name) + yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    print(f"wrote {path}")
