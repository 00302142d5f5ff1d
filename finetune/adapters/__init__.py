"""Adapter methods (LoRA family, AdaLoRA, IA³, prompt and prefix tuning, full and partial training).

`targets` checks a recipe's module selection against the model before training, `configs` turns
the adapter section into a PEFT config, `hooks` adds what PEFT and TRL leave to the caller
(LoRA+ optimizer, AdaLoRA rank allocation, PiSSA/OLoRA conversion, LoftQ on a CPU),
`summary` prints what is trained.
"""
