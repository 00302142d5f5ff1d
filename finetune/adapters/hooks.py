"""What PEFT and TRL leave to the caller, for the methods that need it.

- full fine-tuning of named modules only: freeze the rest before the optimizer is built;
- LoRA+: PEFT's `create_loraplus_optimizer`, handed to the trainer in place of its default optimizer;
- AdaLoRA: PEFT's `update_and_allocate` after every optimizer step (no trainer calls it), and its
  orthogonality penalty, once per optimizer step whatever computes the loss: PEFT adds it only to a loss
  the model itself returns (so TRL's chunked LM head and DPO lost it, while the model's own loss counted it
  twice with ours); PEFT's own addition is switched off. Checkpoints also keep the unpruned adapter, the
  rank pattern and the rank allocator's importance scores, so a resumed run continues exactly;
- PiSSA/OLoRA: they rewrite the base weights, so the initial adapter is kept and the saved adapter is
  converted to plain LoRA on the original base (PEFT's `path_initial_model_for_weight_conversion`);
- LoftQ on a 4-bit base: PEFT's `replace_lora_weights_loftq` with its greedy callback (keep a layer's
  replacement only if the model moves closer to full precision), done here because PEFT's runs on CUDA only.
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
    keep_fp32_masters(trainer.model, recipe, half=trainer.args.bf16 or trainer.args.fp16)
    adapter = recipe.adapter
    if isinstance(adapter, LoraFields):
        if adapter.init == "loftq":
            apply_loftq(trainer.model, model_path, _calibration_rows(trainer.train_dataset))
        if adapter.init in MUTATING_INITS:
            trainer.model.save_pretrained(RunDir(run_dir).initial_adapter)
        if adapter.loraplus_lr_ratio is not None:
            # What `optimizers=(optimizer, None)` at construction does (Trainer builds its own in train() only
            # when none is set), done here because the optimizer needs the model the trainer wrapped.
            trainer.optimizer = loraplus_optimizer(trainer, adapter.loraplus_lr_ratio)
    if isinstance(adapter, AdaLoraAdapter):
        allocation = AdaLoraRankAllocation(total_steps, adapter.orth_reg_weight)
        trainer.add_callback(allocation)
        allocation.attach(trainer)


def _calibration_rows(dataset) -> list[list[int]]:
    """The first rows of the training data as token ids (SFT, or TRL's tokenised preference rows)."""
    column = next((c for c in ("input_ids", "chosen_input_ids", "prompt_input_ids") if c in dataset.column_names), None)
    if column is None:
        return []
    return [list(row)[:256] for row in dataset.select(range(min(LOFTQ_CALIBRATION_ROWS, len(dataset))))[column]]


def keep_fp32_masters(model, recipe: Recipe, *, half: bool) -> None:
    """Under bf16/fp16 autocast, train float32 weights (the optimizer then keeps float32 states too).

    A frozen base may sit in bf16, but anything trained in half precision loses updates below its
    precision: modules_to_save copies of a bf16 base, QLoRA adapters TRL casts to bf16. Unless the recipe
    opts into pure bf16 (training.fp32_master_weights: false), they are cast back to float32 here, before the
    optimizer is built. Full fine-tuning loads in float32 already (model.load.load_dtype_name).
    """
    import torch

    if not half or not recipe.training.fp32_master_weights:
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def save_adapter(model, out: Path, recipe: Recipe, run_dir: Path) -> None:
    """Save the trained adapter; PiSSA/OLoRA ones converted to plain LoRA that applies to the original base."""
    adapter = recipe.adapter
    if isinstance(adapter, LoraFields) and adapter.init in MUTATING_INITS:
        initial = RunDir(run_dir).initial_adapter
        model.save_pretrained(out, path_initial_model_for_weight_conversion=str(initial))
        shutil.rmtree(initial, ignore_errors=True)
        return
    with warnings.catch_warnings():
        ignore_pruned_ranks()
        model.save_pretrained(out)


def ignore_pruned_ranks() -> None:
    """AdaLoRA may prune a module to rank 0, and PEFT's save then warns that "LoRA tensor(s) have invalid shape"
    and tells the user to gather DeepSpeed ZeRO-3 / FSDP shards. AdaLoRA runs are refused under both (launch
    rules), so for an AdaLoRA adapter that warning is always about the pruning: nothing to act on."""
    warnings.filterwarnings("ignore", message=r"Adapter .*: \d+ LoRA tensor\(s\) have invalid shape")


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
    """Run AdaLoRA's rank budget after each optimizer step, add its orthogonality penalty, checkpoint its state."""

    def __init__(self, total_steps: int | None, orth_reg_weight: float):
        self.total_steps = total_steps
        self.orth_reg_weight = orth_reg_weight

    def attach(self, trainer) -> None:
        """Switch PEFT's in-forward penalty off and make resuming load the state `on_save` writes."""
        adalora = trainer.model.base_model
        # AdaLoraModel.forward is the wrapped model's forward plus the penalty whenever the model computes a
        # loss (the full-logits path): this callback adds it for every path, so PEFT must not add it again.
        adalora.forward = adalora.model.forward
        load = trainer._load_from_checkpoint

        def load_adalora(resume_from_checkpoint, model=None):
            if not load_adalora_state(trainer.model, Path(resume_from_checkpoint)):
                load(resume_from_checkpoint, model)

        # transformers loads the adapter of a checkpoint with PEFT, which reads AdaLoRA's pruned ranks into the
        # full-rank modules training keeps (a size mismatch); the unpruned state is loaded instead.
        trainer._load_from_checkpoint = load_adalora
        # The trainer saves checkpoints (through PEFT's save_pretrained) inside trainer.train(): the filter
        # stays for the rest of the process, which runs only this AdaLoRA training.
        ignore_pruned_ranks()

    def on_train_begin(self, args, state, control, **kwargs):
        # The schedule (tinit, tfinal, total_step) was computed from the data before the trainer existed.
        if state.max_steps != self.total_steps:
            raise RuntimeError(
                f"AdaLoRA schedule was computed for {self.total_steps} steps but the trainer runs {state.max_steps}"
            )

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        # Once per optimizer step, after gradient clipping, on every loss path (see attach).
        if self.orth_reg_weight:
            (self.orth_reg_weight * orthogonality_penalty(model)).backward()

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        # after optimizer.step() and before zero_grad(): update_and_allocate reads the gradients
        model.base_model.update_and_allocate(state.global_step)

    def on_save(self, args, state, control, model=None, **kwargs):
        # Before the checkpoint is committed (CheckpointCommitter comes later in the callback list).
        if state.is_world_process_zero:
            save_adalora_state(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")


def save_adalora_state(model, checkpoint: Path) -> None:
    """What resuming AdaLoRA needs besides the saved adapter (which PEFT stores pruned to its final ranks).

    The unpruned lora_E/A/B tensors (training masks ranks, it does not cut them), the rank pattern, and the
    rank allocator's exponential averages of importance and uncertainty, which decide the next masks.
    """
    import torch

    from finetune.run.layout import CHECKPOINT_ADALORA_STATE

    adalora, name = model.base_model, model.active_adapter
    allocator = adalora.rankallocator
    state = {
        "format_version": 1,
        "weights": {k: v.detach().cpu() for k, v in model.named_parameters() if _is_adalora(k, name)},
        "rank_pattern": adalora.peft_config[name].rank_pattern,
        "allocator": {key: {k: v.cpu() for k, v in getattr(allocator, key).items()}
                      for key in ("ipt", "exp_avg_ipt", "exp_avg_unc")},
    }
    torch.save(state, checkpoint / CHECKPOINT_ADALORA_STATE)


def load_adalora_state(model, checkpoint: Path) -> bool:
    """Restore what `save_adalora_state` wrote; False when the checkpoint has none (then PEFT loads it)."""
    import torch

    from finetune.run.layout import CHECKPOINT_ADALORA_STATE

    path = checkpoint / CHECKPOINT_ADALORA_STATE
    if not path.is_file():
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    adalora, name = model.base_model, model.active_adapter
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in state["weights"].items():
            params[key].copy_(value.to(params[key].device))
    adalora.peft_config[name].rank_pattern = state["rank_pattern"]
    device = next(iter(params.values())).device
    for key, values in state["allocator"].items():  # keyed by the wrapped model's parameter names
        setattr(adalora.rankallocator, key, {k: v.to(device) for k, v in values.items()})
    return True


def _is_adalora(key: str, adapter_name: str) -> bool:
    return any(f".{part}.{adapter_name}" in key for part in ("lora_E", "lora_A", "lora_B"))


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


LOFTQ_ROUNDS = 2  # passes over the layers; a layer refused in one may help once others changed (PEFT's docs)
LOFTQ_CALIBRATION_ROWS = 4


def apply_loftq(model, model_path: str, calibration: list[list[int]], rounds: int = LOFTQ_ROUNDS) -> None:
    """LoftQ for QLoRA, as PEFT's `replace_lora_weights_loftq` with its greedy callback does it.

    For each 4-bit LoRA layer, B·A·scale is set to the rank-r decomposition of W - dequant(Q(W)) (PEFT's
    `_low_rank_decomposition`), W read from the base's safetensors; the replacement is kept only if the
    model's logits on the calibration rows move closer to the full-precision model's, and the pass over the
    layers is repeated (`rounds`), so the adapted 4-bit model starts closer to full precision than plain QLoRA.
    A per-layer optimum alone does not guarantee that: on the tiny model it made the logits worse (0.042 ->
    0.051 mean absolute error), as errors of different layers no longer cancel.

    Done here rather than by calling PEFT: its LoftQ code moves every weight to "cuda" (or "xpu"), and its
    replacement ignores the LoRA scale. The 4-bit base is the model's own (quantised from W as any QLoRA
    run), so the adapter applies to the base a later load gives.
    """
    import torch
    from peft.tuners.lora.bnb import Linear4bit
    from peft.utils.loftq_utils import _low_rank_decomposition

    layers = [(name, module) for name, module in model.named_modules() if isinstance(module, Linear4bit)]
    weights = _safetensors_reader(model_path)
    distance = _distance_to_full_precision(model, model_path, calibration)
    best = distance()
    accepted: set[str] = set()
    for _ in range(rounds):
        for name, module in layers:
            if name in accepted:
                continue
            base = module.get_base_layer().weight
            if getattr(base.quant_state, "packing_format_for_cpu", False):
                # bitsandbytes repacks 4-bit weights for its CPU bf16 kernel on the first eval-mode forward, and
                # its inverse (0.50) does not give back the same dequantised weights; training never gets here
                raise RuntimeError(f"{name}: LoftQ must run before the 4-bit model's first eval-mode forward on a CPU")
            import bitsandbytes as bnb

            original = weights(name.removeprefix("base_model.model.") + ".weight").to(base.device, torch.float32)
            residual = original - bnb.functional.dequantize_4bit(base.data, base.quant_state).to(torch.float32)
            before = {a: (module.lora_A[a].weight.detach().clone(), module.lora_B[a].weight.detach().clone())
                      for a in module.lora_A}
            for adapter_name in module.lora_A:
                parts = _low_rank_decomposition(residual, reduced_rank=module.r[adapter_name])
                lora_a, lora_b = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
                with torch.no_grad():
                    lora_a.copy_(parts["R"].to(lora_a.dtype))
                    lora_b.copy_((parts["L"] / module.scaling[adapter_name]).to(lora_b.dtype))
            now = distance()
            if now < best:
                best = now
                accepted.add(name)
                continue
            with torch.no_grad():  # PEFT's callback returning False: roll the layer back
                for adapter_name, (lora_a, lora_b) in before.items():
                    module.lora_A[adapter_name].weight.copy_(lora_a)
                    module.lora_B[adapter_name].weight.copy_(lora_b)


def _distance_to_full_precision(model, model_path: str, calibration: list[list[int]]):
    """A function giving the mean absolute logit difference to the full-precision model on the calibration rows."""
    import torch
    from transformers import AutoModelForCausalLM

    device = next(model.parameters()).device
    reference = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    rows = [row for row in calibration if row and max(row) < reference.config.vocab_size]  # not added tokens
    width = max(map(len, rows), default=0)
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows], device=device)
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
    with torch.no_grad():
        target = reference(input_ids=ids, attention_mask=mask).logits if rows else None
    del reference
    vocab = target.shape[-1] if rows else 0

    def distance() -> float:
        if not rows:
            return 0.0  # nothing to compare on: every layer is refused (the adapter starts as plain QLoRA)
        # train mode without dropout: eval mode would make bitsandbytes repack the 4-bit weights (see above)
        was_training = model.training
        model.train()
        dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
        for module in dropouts:
            module.eval()
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits[..., :vocab]
        finally:
            model.train(was_training)
        return (logits - target).abs()[mask.bool()].mean().item()

    return distance


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

