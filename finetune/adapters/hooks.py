"""What PEFT and TRL leave to the caller, for the methods that need it.

- full fine-tuning of named modules only: freeze the rest before the optimizer is built;
- LoRA+: PEFT's `create_loraplus_optimizer`, handed to the trainer in place of its default optimizer;
- AdaLoRA: PEFT's `update_and_allocate` after every optimizer step (no trainer calls it), and its
  orthogonality penalty, which PEFT adds only to a loss the model itself returns; TRL's SFT and DPO
  losses are computed outside the model, so without this the penalty would silently vanish;
- PiSSA/OLoRA: they rewrite the base weights, so the initial adapter is kept and the saved adapter is
  converted to plain LoRA on the original base (PEFT's `path_initial_model_for_weight_conversion`);
- LoftQ on a 4-bit base: PEFT's LoftQ code runs on CUDA only, so the same arithmetic is done here.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from transformers import TrainerCallback

from finetune.adapters.targets import select
from finetune.recipe.schema import MUTATING_INITS, AdaLoraAdapter, FullAdapter, LoraFields, Recipe
from finetune.run.layout import RunDir


def freeze_except(model, recipe: Recipe) -> None:
    """Kind full with trainable_modules: only parameters inside the selected modules keep requires_grad."""
    adapter = recipe.adapter
    if not isinstance(adapter, FullAdapter) or adapter.trainable_modules is None:
        return
    chosen = select([n for n, _ in model.named_modules() if n], adapter.trainable_modules)
    for name, param in model.named_parameters():
        param.requires_grad = any(name.startswith(module + ".") for module in chosen)


def prepare_trainer(trainer, recipe: Recipe, run_dir: Path, model_path: str, total_steps: int | None) -> None:
    """Apply the per-method steps that must happen after the trainer wrapped the model and before training."""
    adapter = recipe.adapter
    if isinstance(adapter, LoraFields):
        if adapter.init == "loftq":
            apply_loftq(trainer.model, model_path)
        if adapter.init in MUTATING_INITS:
            trainer.model.save_pretrained(RunDir(run_dir).initial_adapter)
        if adapter.loraplus_lr_ratio is not None:
            # What `optimizers=(optimizer, None)` at construction does (Trainer builds its own in train() only
            # when none is set), done here because the optimizer needs the model the trainer wrapped.
            trainer.optimizer = loraplus_optimizer(trainer, adapter.loraplus_lr_ratio)
    if isinstance(adapter, AdaLoraAdapter):
        trainer.add_callback(AdaLoraRankAllocation(total_steps, adapter.orth_reg_weight))


def save_adapter(model, out: Path, recipe: Recipe, run_dir: Path) -> None:
    """Save the trained adapter; PiSSA/OLoRA ones converted to plain LoRA that applies to the original base."""
    adapter = recipe.adapter
    if isinstance(adapter, LoraFields) and adapter.init in MUTATING_INITS:
        initial = RunDir(run_dir).initial_adapter
        model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial))
        shutil.rmtree(initial, ignore_errors=True)
        return
    with warnings.catch_warnings():
        # AdaLoRA may prune a module to rank 0; PEFT then warns about DeepSpeed/FSDP shards, which is not the case
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        model.save_pretrained(out)


def loraplus_optimizer(trainer, ratio: float):
    """PEFT's LoRA+ optimizer: B matrices at `ratio` x the learning rate, with the run's optimizer class."""
    from peft.optimizers import create_loraplus_optimizer

    args = trainer.args
    optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(args, trainer.model)
    kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
    return create_loraplus_optimizer(
        trainer.model,
        optimizer_cls,
        lr=args.learning_rate,
        loraplus_lr_ratio=ratio,
        loraplus_weight_decay=args.weight_decay,
        # PEFT's default for LoRA on embedding layers is 1e-6, which would leave them almost untrained
        loraplus_lr_embedding=args.learning_rate,
        **kwargs,
    )


class AdaLoraRankAllocation(TrainerCallback):
    """Run AdaLoRA's rank budget after each optimizer step, and add its orthogonality penalty."""

    def __init__(self, total_steps: int | None, orth_reg_weight: float):
        self.total_steps = total_steps
        self.orth_reg_weight = orth_reg_weight

    def on_train_begin(self, args, state, control, **kwargs):
        # The schedule (tinit, tfinal, total_step) was computed from the data before the trainer existed.
        if state.max_steps != self.total_steps:
            raise RuntimeError(
                f"AdaLoRA schedule was computed for {self.total_steps} steps but the trainer runs {state.max_steps}"
            )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Once per optimizer step: the same gradient as PEFT's per-micro-batch loss term (its value does not
        # change within a step), added after gradient clipping.
        if self.orth_reg_weight:
            (self.orth_reg_weight * orthogonality_penalty(model)).backward()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # after optimizer.step() and before zero_grad(): update_and_allocate reads the gradients
        model.base_model.update_and_allocate(state.global_step)


def orthogonality_penalty(model):
    """AdaLoRA's regulariser (PEFT AdaLoraModel.forward): mean of ||P P^T - I||_F over its A and B matrices."""
    import torch

    terms = []
    for name, param in model.named_parameters():
        if param.requires_grad and (".lora_A." in name or ".lora_B." in name):
            gram = param @ param.T if ".lora_A." in name else param.T @ param
            eye = torch.eye(*gram.shape, device=gram.device, dtype=gram.dtype)
            terms.append(torch.linalg.matrix_norm(gram - eye))
    return torch.stack(terms).mean() if terms else torch.zeros(())


def apply_loftq(model, model_path: str) -> None:
    """LoftQ for QLoRA: start each adapter at the best rank-r fit of the 4-bit quantisation error.

    For every 4-bit LoRA layer, B·A·scale is set to the top-r SVD of W - dequant(Q(W)), W read from the
    base's safetensors, so the adapted 4-bit model starts as close to the full-precision model as rank r
    allows (PEFT's `replace_lora_weights_loftq` does the same on CUDA only, and ignores the LoRA scale).
    """
    import bitsandbytes as bnb
    import torch
    from peft.tuners.lora.bnb import Linear4bit

    weights = _safetensors_reader(model_path)
    prefix = "base_model.model."
    for name, module in model.named_modules():
        if not isinstance(module, Linear4bit):
            continue
        base = module.get_base_layer().weight
        if getattr(base.quant_state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights for its CPU bf16 kernel on the first eval-mode forward, and
            # its inverse (0.50) does not give back the same dequantised weights; training never gets here
            raise RuntimeError(f"{name}: LoftQ must run before the 4-bit model's first eval-mode forward on a CPU")
        original = weights(name.removeprefix(prefix) + ".weight").to(base.device, torch.float32)
        dequantised = bnb.functional.dequantize_4bit(base.data, base.quant_state).to(torch.float32)
        u, s, vh = torch.linalg.svd(original - dequantised, full_matrices=False)
        for adapter_name in module.lora_A:
            r, scale = module.r[adapter_name], module.scaling[adapter_name]
            root = s[:r].sqrt()
            lora_a, lora_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
            with torch.no_grad():
                lora_a.copy_((root[:, None] * vh[:r]).to(lora_a.dtype))
                lora_b.copy_((u[:, :r] * root / scale).to(lora_b.dtype))


def _safetensors_reader(model_path: str):
    """name -> tensor from the base's (possibly sharded) safetensors, local or in the Hub cache."""
    import json

    from safetensors import safe_open

    root = Path(model_path)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(model_path, allow_patterns=["*.safetensors", "*.json"]))
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = {k: root / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    else:
        single = root / "model.safetensors"
        with safe_open(single, framework="pt") as handle:
            files = dict.fromkeys(handle.keys(), single)

    def read(name: str):
        with safe_open(files[name], framework="pt") as handle:
            return handle.get_tensor(name)

    return read

