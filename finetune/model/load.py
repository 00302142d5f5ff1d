"""Model stage: pick device and precision, load tokenizer and base model, build the adapter config."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from finetune.errors import UserError
from finetune.recipe.schema import ModelSection, Recipe

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Precision:
    """Where and in what number format a run computes."""

    device: str  # "cuda" or "cpu"
    load_dtype: torch.dtype  # dtype of the base weights in memory
    bf16: bool  # autocast in bf16
    fp16: bool  # autocast in fp16 (with a grad scaler)


def resolve_precision(recipe: Recipe) -> Precision:
    """Decide device, weight dtype and autocast; refuse combinations this machine cannot run."""
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    precision = recipe.training.precision
    if precision == "auto":
        precision = "bf16" if bf16_ok else "fp32"
    if precision in ("bf16", "fp16") and not cuda:
        raise UserError(
            f"training.precision: '{precision}' needs a CUDA GPU and none is visible; "
            "use precision: auto or fp32 on a CPU"
        )
    if precision == "bf16" and not bf16_ok:
        raise UserError("training.precision: this GPU has no bf16 support; use fp16 or fp32")
    load_dtype = getattr(torch, load_dtype_name(recipe, precision))
    if precision == "fp16" and recipe.adapter.kind == "full" and load_dtype == torch.float16:
        raise UserError(
            "model.dtype: full fine-tuning with float16 weights and fp16 precision cannot keep fp32 master "
            "weights; load in float32 (model.dtype: float32) or use bf16"
        )
    return Precision(
        device="cuda" if cuda else "cpu",
        load_dtype=load_dtype,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
    )


def load_dtype_name(recipe: Recipe, precision: str) -> str:
    """The dtype the base weights load in, for a resolved precision (bf16, fp16 or fp32).

    model.dtype auto: the compute dtype for a frozen base (LoRA, QLoRA: half the memory), but float32 for full
    fine-tuning with fp32_master_weights, so the optimizer updates float32 weights while autocast computes in
    bf16/fp16 (what transformers' Trainer does with bf16=True and float32 weights). Trained adapter weights and
    modules_to_save are kept float32 after the model is wrapped (adapters.hooks.keep_fp32_masters).
    """
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    if recipe.adapter.kind == "full" and recipe.training.fp32_master_weights:
        return "float32"
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def check_quantisation_available(recipe: Recipe) -> None:
    """QLoRA needs bitsandbytes; say which extra installs it before anything heavy starts."""
    if recipe.adapter.kind == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(
            "adapter.kind: 'qlora' needs the bitsandbytes package, which is not installed; "
            "install it with: pip install 'finetune-recipes[qlora]'"
        )


def load_tokenizer(path: str, section: ModelSection, *, revision: str | None = None):
    """Load the tokenizer; give it a pad token if it has none (the eos token, as TRL does).

    `revision` overrides model.revision (the base of an earlier run keeps that run's revision).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=revision or section.revision, trust_remote_code=section.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        from finetune.recipe.inputs import refuse_offline_hub

        refuse_offline_hub(path, "model.path")
        raise UserError(f"model.path: cannot load a tokenizer from {path!r}: {_first_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare_tokenizer(recipe: Recipe, start):
    """The tokenizer training uses, built the one way train and `finetune data` share.

    From where training starts (`start.tokenizer`: the base, or an earlier run's adapter with its
    added tokens and template), with model.add_special_tokens added and the recipe's chat template
    set, in that order: the data cache key hashes the result, so any other order would miss the
    cache `finetune data prepare` filled. Returns (tokenizer, the tokens that were new).
    """
    from finetune.data.prepare import set_chat_template
    from finetune.model.vocab import add_special_tokens

    tokenizer = load_tokenizer(start.tokenizer, recipe.model, revision=start.revision)
    new_tokens = add_special_tokens(tokenizer, recipe.model.add_special_tokens)
    set_chat_template(recipe, tokenizer)
    return tokenizer, new_tokens


def load_model(path: str, recipe: Recipe, precision: Precision, *, revision: str | None = None):
    """Load the base model in its training dtype, 4-bit quantised for QLoRA.

    `revision` overrides model.revision (the base of an earlier run keeps that run's revision).
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": precision.load_dtype,
        "attn_implementation": recipe.model.attn_implementation,
        "revision": revision or recipe.model.revision,
        "trust_remote_code": recipe.model.trust_remote_code,
        # True: safetensors or nothing; None: transformers falls back to pickle files
        "use_safetensors": None if recipe.model.allow_pickle_weights else True,
    }
    if recipe.adapter.kind == "qlora":
        kwargs["quantization_config"] = _bnb_config(recipe, precision)
        placement = quantized_placement(precision.device)
        if placement is not None:
            kwargs["device_map"] = placement
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        if kwargs["use_safetensors"] and "safetensors" in str(exc):
            from finetune.train.checks import pickle_refusal

            raise UserError(pickle_refusal(path, _first_line(exc))) from None
        from finetune.recipe.inputs import refuse_offline_hub

        refuse_offline_hub(path, "model.path")
        raise UserError(f"model.path: cannot load a causal LM from {path!r}: {_first_line(exc)}") from None
    # Training with the KV cache on makes packed rows attend to each other (see ENV.md) and wastes memory.
    model.config.use_cache = False
    keep_4bit_training_kernel(model)
    return model


def keep_4bit_training_kernel(model) -> None:
    """Keep bitsandbytes' 4-bit layers on the kernel whose gradients are right, also after an evaluation.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's Linear4bit repacks its weight for a bf16 inference kernel
    (`torch.ops.bitsandbytes.gemv_4bit`) on the first forward in eval mode without grad (an evaluation pass)
    and keeps that layout when training resumes. That op has no autograd kernel: torch warns "gemv_4bit: an
    autograd kernel was not registered ..." and drops the gradient through every frozen 4-bit weight, so
    every LoRA layer upstream of a 4-bit layer gets wrong gradients. Measured with `scripts/qlora_grads.py` on the
    tiny model (docs/testing.md): after one eval pass 54 of 56 LoRA gradient tensors are off by more than 1%
    of their norm (max abs diff 1.2, the largest gradient 1.2); with this switch off they equal the
    dequantised-fp32 reference exactly. `support_avx512bf16_for_cpu` is the attribute Linear4bit.forward
    reads before repacking; GPUs never repack.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def quantized_placement(device: str) -> dict | None:
    """Where a 4-bit model loads (bitsandbytes quantises while loading, so it needs a device_map).

    One device per process: a launched run's process loads onto its own GPU (LOCAL_RANK), never all onto
    GPU 0. Under DeepSpeed ZeRO-3 none is given: zero.Init places the shards, and transformers refuses a
    device_map there (the launch rules say where QLoRA + ZeRO-3 can run: launch.rules).
    """
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return None
    if device == "cuda":
        import os

        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def _bnb_config(recipe: Recipe, precision: Precision):
    import torch
    from transformers import BitsAndBytesConfig

    adapter = recipe.adapter
    compute = torch.bfloat16 if precision.bf16 else torch.float16 if precision.fp16 else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter.quant_type,
        bnb_4bit_use_double_quant=adapter.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=getattr(torch, adapter.quant_storage),
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
