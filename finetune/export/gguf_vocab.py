"""The tokenizer half of a GGUF file: which llama.cpp tokenizer reads it, and its token list.

llama.cpp has two tokenizers for the architectures we export: "gpt2" (byte-level BPE with a
pre-tokenizer regex picked by name: Llama 3, Qwen, SmolLM, GPT-2 ...) and "llama" (SentencePiece
style: Llama 2, Mistral 7B, anything with byte-fallback BPE). The pre-tokenizer name is found the
way llama.cpp's own converter finds it: tokenise a fixed check text, hash the token ids, look the
hash up in llama.cpp's table (copied as data into resources/gguf/pre_tokenizers.json). A
tokenizer the table does not know would be split differently by llama.cpp than in training, so it
is refused before anything is merged or written.

The `gguf` package gives the file format and SpecialVocab (special ids, merges, chat template);
what it lacks is `convert_hf_to_gguf.py`'s token-list logic, written here after it.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from finetune.errors import UserError

TABLE = Path(__file__).resolve().parent.parent / "resources" / "gguf" / "pre_tokenizers.json"


@dataclass(frozen=True)
class Vocab:
    """How llama.cpp should read this tokenizer: `tokenizer.ggml.model` and `tokenizer.ggml.pre`."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece style)
    pre: str  # llama.cpp's pre-tokenizer name ("default" for "llama")
    add_space_prefix: bool = False  # "llama" only: a leading "▁" is added to the text, as sentencepiece does


@functools.cache
def _table() -> tuple[str, dict[str, tuple[str, str]]]:
    data = json.loads(TABLE.read_text(encoding="utf-8"))
    known: dict[str, tuple[str, str]] = {}
    for entry in data["llama_cpp"] + data["finetune"]:  # a later entry wins, as in llama.cpp's chain of ifs
        known[entry["sha256"]] = (entry["pre"], entry["ref"])
    return data["check_text"], known


def check_text_hash(tokenizer) -> str:
    """sha256 of the token ids of llama.cpp's check text, computed exactly as convert_hf_to_gguf.py does."""
    check_text, _ = _table()
    return sha256(str(tokenizer.encode(check_text)).encode()).hexdigest()


def load_tokenizer(tokenizer_dir: str | Path):
    """The fast tokenizer in `tokenizer_dir` (a SentencePiece tokenizer.model is converted by transformers)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"{tokenizer_dir}: cannot load the tokenizer: {str(exc).splitlines()[0]}") from None
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise UserError(f"{tokenizer_dir}: GGUF export needs a fast (tokenizers) tokenizer; this one is "
                        f"{type(tokenizer).__name__}")
    return tokenizer


def identify(tokenizer, where: str | Path) -> Vocab:
    """Which llama.cpp tokenizer reads this one, or a UserError saying why none does."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    kind = model.get("type")
    if kind == "BPE" and model.get("byte_fallback"):
        return Vocab("llama", "default", _adds_space_prefix(spec))
    if kind == "BPE":
        digest = check_text_hash(tokenizer)
        known = _table()[1].get(digest)
        if known is None:
            raise UserError(
                f"{where}: llama.cpp does not know this tokenizer's pre-tokenizer (sha256 of its tokens for "
                f"llama.cpp's check text: {digest}), so llama.cpp would split text differently from training. "
                "Nothing was merged or written. llama.cpp's own convert_hf_to_gguf.py refuses it the same way; "
                f"known tokenizers (Llama 3, Qwen 1.5-3, SmolLM, GPT-2, Mistral Nemo, DeepSeek ...) are in {TABLE}. "
                "Serve the safetensors model instead, or add the tokenizer to llama.cpp's "
                "convert_hf_to_gguf_update.py and convert with llama.cpp"
            )
        return Vocab("gpt2", known[0])
    raise UserError(
        f"{where}: GGUF export handles byte-level BPE (Llama 3, Qwen, GPT-2 style) and SentencePiece-style BPE "
        f"with byte fallback (Llama 2, Mistral); this tokenizer is {kind}. Nothing was merged or written"
    )


def _adds_space_prefix(spec: dict) -> bool:
    """llama.cpp's add_space_prefix for a SentencePiece-style tokenizer.

    llama.cpp puts "▁" before every piece of text that starts the prompt or follows a special token.
    That is exactly the legacy Llama 2 tokenizer (a Prepend("▁") normaliser runs on every piece) and
    Metaspace "always". Metaspace "first" (transformers 5's conversion of a tokenizer.model) adds it
    only at the very start of the text, which llama.cpp cannot express: without the prefix llama.cpp
    matches it on every text that starts with a special token (BOS or a chat template's markers),
    which is how a chat model is prompted; a bare text's first word then splits differently.
    """
    def steps(part):
        part = part or {}
        return part.get("normalizers") or part.get("pretokenizers") or [part]

    for step in steps(spec.get("normalizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            return True
    return any(step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") == "always"
               for step in steps(spec.get("pre_tokenizer")))


def write_vocab(writer, tokenizer, tokenizer_dir: Path, vocab: Vocab, vocab_size: int) -> None:
    """Token list, types (and scores for "llama"); special ids, merges and chat template via SpecialVocab."""
    import gguf

    if vocab.model == "gpt2":
        tokens, types = _bpe_tokens(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(vocab.pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=vocab_size)
    else:
        tokens, scores, types = _sentencepiece_tokens(tokenizer, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(vocab.add_space_prefix)
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=False, n_vocab=vocab_size)
    # What the tokenizer does, not what its config says: transformers 5 often leaves add_bos_token unset
    probe = tokenizer("a").input_ids
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id]
    special.add_to_gguf(writer, quiet=True)
    if special.chat_template is None and tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's does_token_look_special: added tokens some models forget to mark special."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>")) \
        or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">"))


def _bpe_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """convert_hf_to_gguf.py's get_vocab_base: byte-level strings, added tokens as CONTROL or USER_DEFINED."""
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding is larger than the vocabulary (padded to a multiple)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            token = added[i].content
            if not added[i].normalized:  # llama.cpp assumes added tokens are pre-normalised
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            special = added[i].special or _looks_special(token)
            tokens.append(token if special else token.replace("▁", " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


_BYTE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _sentencepiece_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[float], list[int]]:
    """Pieces, scores and types as llama.cpp's SentencePiece tokenizer reads them.

    llama.cpp merges adjacent pieces by score, highest first. A sentencepiece BPE model stores each
    piece's score as minus its merge order, which is also its id order (piece 259 scores -0, 260
    -1, ...), and tokenizer.json keeps that order but not the scores: -id restores the order, which
    is all llama.cpp compares. Bytes (<0x0A>), control and unknown pieces take no part in merging.
    """
    import gguf

    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    specials = set(tokenizer.all_special_ids)
    unk = tokenizer.unk_token_id
    tokens, scores, types = [], [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-10000.0)
            types.append(gguf.TokenType.UNUSED)
        elif i == unk:
            tokens.append(token)
            scores.append(0.0)
            types.append(gguf.TokenType.UNKNOWN)
        elif i in specials or (i in added and (added[i].special or _looks_special(added[i].content))):
            tokens.append(added[i].content if i in added else token)
            scores.append(0.0 if i < tokenizer.vocab_size else -1000.0)
            types.append(gguf.TokenType.CONTROL)
        elif i in added:
            tokens.append(added[i].content.replace("▁", " "))
            scores.append(-1000.0)
            types.append(gguf.TokenType.USER_DEFINED)
        elif _BYTE.fullmatch(token):
            tokens.append(token)
            scores.append(0.0)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            scores.append(-float(i))
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types
