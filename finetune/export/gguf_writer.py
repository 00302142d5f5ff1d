"""Export stage: write a merged Llama-family model as one GGUF file with the `gguf` package.

No llama.cpp build: the `gguf` package (llama.cpp's own Python writer) provides the file format,
the metadata keys, the tensor-name maps and Q8_0 quantisation. What it lacks is the part of
llama.cpp's `convert_hf_to_gguf.py` that turns a transformers checkpoint into those calls: the
hyperparameter keys per architecture, the rotary permutation of Llama's q/k weights, the token
list with token types, and the name of the pre-tokenizer. That part is written here, for the
architectures listed in ARCHITECTURES only; anything else is refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import UserError

# transformers model_type -> (llama.cpp architecture name, q/k weights need the rotary permutation)
# Llama (and Mistral, which llama.cpp runs as llama) rotate interleaved pairs in GGUF; Qwen keeps
# transformers' half-split (NeoX) layout, so its weights are written as they are.
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}

QUANTS = ("f32", "f16", "q8_0")

# Split regexes of byte-level BPE tokenizers -> llama.cpp's pre-tokenizer name. llama.cpp picks the
# regex by this name, so a wrong one silently tokenises text differently from training.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass
class GgufResult:
    """What was written."""

    path: Path
    architecture: str
    quant: str
    tensors: int


def write_gguf(model_dir: Path, out: Path, *, quant: str = "f16", log=None,
               metadata: dict[str, str] | None = None) -> GgufResult:
    """Write the transformers checkpoint in `model_dir` (config, safetensors, tokenizer) as GGUF.

    `metadata`: extra string keys for the header (the export's origin, run.records.GGUF_SOURCE_*).
    """
    import gguf

    if quant not in QUANTS:
        raise UserError(f"--quant: expected one of {', '.join(QUANTS)}, found {quant!r}")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type", "?")
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"{model_dir}: GGUF export supports {', '.join(sorted(ARCHITECTURES))} models; this one is "
            f"{model_type!r} ({', '.join(config.get('architectures') or [])}). Use llama.cpp's "
            "convert_hf_to_gguf.py for it, or serve the safetensors directory as it is"
        )
    arch, permute = ARCHITECTURES[model_type]
    pre = _pre_tokenizer(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # use_temp_file: tensors are spooled to disk as they are added, so memory holds one at a time
    writer = gguf.GGUFWriter(out, arch, use_temp_file=True)
    _write_hparams(writer, config, model_dir, quant)
    for key, value in (metadata or {}).items():
        writer.add_string(key, value)
    _write_tokenizer(writer, model_dir, config["vocab_size"], pre)
    count = _write_tensors(writer, model_dir, config, arch, permute, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GgufResult(out, arch, quant, count)


def _pre_tokenizer(model_dir: Path) -> str:
    """llama.cpp's pre-tokenizer name for this tokenizer, or a refusal naming what was found."""
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"{model_dir}: no tokenizer.json; GGUF export needs a fast (tokenizers) tokenizer")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    model = tokenizer.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or (tokenizer.get("decoder") or {}).get(
        "type"
    ) != "ByteLevel":
        raise UserError(
            f"{path}: GGUF export handles byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 style); "
            f"this one is {model.get('type')} with a {(tokenizer.get('decoder') or {}).get('type')} decoder"
        )
    pre = tokenizer.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if len(splits) == 1 and splits[0] in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[splits[0]]
    if [s.get("type") for s in steps] == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    raise UserError(
        f"{path}: unknown pre-tokenizer {json.dumps(pre)[:200]}; GGUF readers would split text differently "
        "from training, so the export stops here. Known: GPT-2, Llama 3, Qwen2/3 and SmolLM splits"
    )


def _write_hparams(writer, config: dict, model_dir: Path, quant: str) -> None:
    import gguf

    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(model_dir.resolve().name)
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
    file_type = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}[quant]
    writer.add_file_type(getattr(gguf.LlamaFileType, file_type))
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


def _write_tokenizer(writer, model_dir: Path, vocab_size: int, pre: str) -> None:
    """Token list and types as llama.cpp's converter writes them; merges, special ids and template via SpecialVocab."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding is larger than the vocabulary (padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


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
    elif quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        packed = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:  # f16, and q8_0 rows whose length is not a multiple of the 32-value block
        writer.add_tensor(name, data.astype(np.float16))
