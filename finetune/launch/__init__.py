"""Launch stage: one process, or several through `accelerate launch` (DDP, DeepSpeed ZeRO, FSDP).

Light imports only: `finetune launch-plan` and the rules run before torch is needed for training.
"""
