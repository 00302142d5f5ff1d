"""Export stage: write a merged Llama-family model as one GGUF file with the `gguf` package.

No llama.cpp build: the `gguf` package (llama.cpp's own Python writer) provides the file format,
the metadata keys, the tensor-name maps and the BF16/Q8_0 encodings. What it lacks is the part of
llama.cpp's `convert_hf_to_gguf.py` that turns a transformers checkpoint into those calls: the
hyperparameter keys per architecture and the rotary permutation of Llama's q/k weights (here),
and the token list and pre-tokenizer name (gguf_vocab.py). Written for the architectures in
ARCHITECTURES only; anything else is refused by name. Whether llama.cpp reads the result as
transformers does is checked in llama.cpp itself (export/llama_cpp.py, tests/test_gguf.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError
from finetune.export.gguf_vocab import Vocab

# transformers model_type -> (llama.cpp architecture name, q/k weights need the rotary permutation)
# Llama (and Mistral, which llama.cpp runs as llama) rotate interleaved pairs in GGUF; Qwen keeps
# transformers' half-split (NeoX) layout, so its weights are written as they are.
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}

QUANTS = ("f32", "f16", "bf16", "q8_0")
# GGUF general.file_type of each output type (what llama.cpp reports as the model's type)
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


@dataclass
class GgufResult:
    """What was written."""

    path: Path
    architecture: str
    quant: str
    tensors: int
    vocab: Vocab


def check_exportable(config: dict, tokenizer, where: str | Path) -> Vocab:
    """Every refusal of an export that needs no weights: architecture, rope scaling, tokenizer.

    Called before an adapter is merged, so a model that cannot be exported costs no merge.
    """
    from finetune.export.gguf_vocab import identify

    check_architecture(config, where)
    return identify(tokenizer, where)


def check_architecture(config: dict, where: str | Path) -> None:
    """The model type and rope scaling must be ones this writer handles."""
    model_type = config.get("model_type", "?")
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"{where}: GGUF export supports {', '.join(sorted(ARCHITECTURES))} models; this one is "
            f"{model_type!r} ({', '.join(config.get('architectures') or [])}). Use llama.cpp's "
            "convert_hf_to_gguf.py for it, or serve the safetensors directory as it is. Nothing was merged or written"
        )
    _rope(config)


def write_gguf(model_dir: Path, out: Path, *, quant: str = "f16", name: str | None = None,
               metadata: dict[str, str] | None = None) -> GgufResult:
    """Write the transformers checkpoint in `model_dir` (config, safetensors, tokenizer) as GGUF.

    The file is written next to `out` under a temporary name and renamed when complete, so a
    failure never leaves a truncated GGUF behind. `name` is the GGUF general.name (default: the
    directory's name). `metadata`: extra string keys for the header (the export's origin,
    run.records.GGUF_SOURCE_*).
    """
    import gguf

    from finetune.export.gguf_vocab import load_tokenizer, write_vocab

    if quant not in QUANTS:
        raise UserError(f"--quant: expected one of {', '.join(QUANTS)}, found {quant!r}")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    check_architecture(config, model_dir)
    tokenizer = load_tokenizer(model_dir)
    vocab = check_exportable(config, tokenizer, model_dir)
    arch, permute = ARCHITECTURES[config["model_type"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    try:
        # use_temp_file: tensors are spooled to disk as they are added, so memory holds one at a time
        writer = gguf.GGUFWriter(partial, arch, use_temp_file=True)
        _write_hparams(writer, config, name or model_dir.resolve().name, quant)
        for key, value in (metadata or {}).items():
            writer.add_string(key, value)
        write_vocab(writer, tokenizer, model_dir, vocab, config["vocab_size"])
        count = _write_tensors(writer, model_dir, config, arch, permute, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return GgufResult(out, arch, quant, count, vocab)


def _write_hparams(writer, config: dict, name: str, quant: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(_rope(config).get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[quant]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope(config: dict) -> dict:
    """Rotary settings: `rope_parameters` in transformers 5, `rope_theta`/`rope_scaling` before."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind not in ("default", "llama3"):
        raise UserError(
            f"config.json: rope scaling {kind!r} is not handled by the GGUF export (default and llama3 are)"
        )
    rope["rope_type"] = kind
    return rope


def llama3_rope_factors(config: dict):
    """Per-frequency divisors of Llama 3.1+ rope scaling, stored as the `rope_freqs` tensor.

    llama.cpp divides its base frequencies by these; transformers bakes the same division into
    `inv_freq` (`_compute_llama3_parameters`), which the tests compare against.
    """
    import math

    import numpy as np

    rope = _rope(config)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _write_tensors(writer, model_dir: Path, config: dict, arch: str, permute: bool, quant: str) -> int:
    import gguf
    from safetensors import safe_open

    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    tied = config.get("tie_word_embeddings", False)
    count = 0
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
                    continue
                stem, _, suffix = hf_name.rpartition(".")
                gguf_name = names.get_name(stem)
                if gguf_name is None:
                    raise UserError(f"{shard.name}: tensor {hf_name} has no GGUF name for {arch}; cannot export")
                data = f.get_tensor(hf_name).float().numpy()
                if permute and stem.endswith(("q_proj", "k_proj")) and suffix == "weight":
                    data = _permute(data, heads if stem.endswith("q_proj") else kv_heads)
                _add_tensor(writer, f"{gguf_name}.{suffix}", data, quant)
                count += 1
    if _rope(config)["rope_type"] == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
        count += 1
    return count


def _permute(weights, n_head: int):
    """transformers' half-split rotary layout -> the interleaved one llama.cpp's llama graph expects."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _add_tensor(writer, name: str, data, quant: str) -> None:
    """Norms and biases stay float32 (as llama.cpp's converter keeps them); matrices take the quant type."""
    import gguf
    import numpy as np

    if data.ndim < 2 or quant == "f32":
        writer.add_tensor(name, data.astype(np.float32))
    elif quant == "bf16":
        packed = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.BF16)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    elif quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        packed = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:  # f16, and q8_0 rows whose length is not a multiple of the 32-value block
        writer.add_tensor(name, data.astype(np.float16))
