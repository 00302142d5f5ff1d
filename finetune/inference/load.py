"""Load a model for chat, generate and eval: one base in memory, any number of named adapters on it.

A source is a run directory, a merged or full model directory, an adapter directory, or a model
spec (local path, Hub id, builtin:tiny-llama). Adapters of every kind PEFT runs (LoRA and its
variants, AdaLoRA, IA³, prompt and prefix tuning) go on the base with PEFT's `load_adapter`, are
switched with `set_adapter`, and are bypassed with `disable_adapter()`. PEFT holds several adapters
on one base only when they are of one kind ("Cannot combine adapters with different peft types"),
so a mix is refused before any weight loads.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import UserError

BASE = "base"  # the label of the base model (adapters disabled) in outputs and tables
PROMPT_LEARNING = {"PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING"}


@dataclass
class Source:
    """What a command was pointed at: where the base weights, tokenizer and adapters are."""

    base: str
    tokenizer_dir: str
    adapters: list[tuple[str, Path]] = field(default_factory=list)
    run_dir: Path | None = None
    recipe: object | None = None  # the run's Recipe, when the source is a run directory
    original_base: str | None = None  # for a merged or fully trained model: the model it started from
    revision: str | None = None  # Hub revision of `base`


def resolve_source(spec: str) -> Source:
    """What `spec` names, as the base, tokenizer and named adapters to load (finetune.run.resolve decides).

    A run that continued an earlier run's adapter (start_from: adapter) holds that same adapter, trained
    further: it goes alone on the true base. A run that started from an earlier run's merge has that
    merge as its base.
    """
    from finetune.run.resolve import resolve

    found = resolve(spec)
    recipe = found.recipe
    if found.adapter is None:
        return Source(found.weights, found.tokenizer, [], found.run.root if found.run else None, recipe,
                      original_base=found.origin, revision=found.revision)
    if found.kind == "run":
        name = adapter_name(recipe.name)
    elif found.kind == "checkpoint":
        name = adapter_name(f"{recipe.name}-{found.adapter.name}")
    else:
        name = adapter_name(found.adapter.name)
    return Source(found.weights, found.tokenizer, [(name, found.adapter)], found.run.root if found.run else None,
                  recipe, revision=found.revision)


def adapter_name(text: str) -> str:
    """A PEFT adapter name (a module-dict key: no dots) from a run or directory name."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text) or "adapter"


def parse_adapter_flags(flags: list[str]) -> list[tuple[str, Path]]:
    """`--adapter NAME=PATH` values as (name, path), checked before any model loads."""
    parsed = []
    for flag in flags:
        name, sep, path = flag.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--adapter: expected NAME=PATH, found {flag!r}")
        if adapter_name(name) != name or name == BASE:
            raise UserError(f"--adapter: {name!r} is not a usable name (letters, digits, - and _; not 'base')")
        parsed.append((name, _adapter_dir(flag, path)))
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise UserError(f"--adapter: names must differ, found {', '.join(names)}")
    return parsed


def _adapter_dir(flag: str, path: str) -> Path:
    """The adapter directory an --adapter PATH names: an adapter, or a run (or checkpoint) holding one."""
    from finetune.run.resolve import resolve

    found = resolve(path, key=f"--adapter {flag}")
    if found.adapter is None:
        raise UserError(f"--adapter {flag}: {path} is a complete model ({found.kind}), not an adapter")
    return found.adapter


@dataclass
class Loaded:
    """A model ready to generate, with the names of its adapters (empty for a plain model)."""

    model: object
    tokenizer: object
    adapters: list[str]
    source: Source
    device: str

    def use(self, name: str | None):
        """Context in which `name` is the active adapter; None or BASE runs the base (adapters bypassed)."""
        if not self.adapters:
            return contextlib.nullcontext()
        if name in (None, BASE):
            return self.model.disable_adapter()
        self.model.set_adapter(name)
        return contextlib.nullcontext()


def load(source: Source, extra_adapters: list[tuple[str, Path]] = (), *, log=None) -> Loaded:
    """Load the base once, put every adapter on it, and the tokenizer with its chat template."""
    from finetune.logs import quiet_libraries

    quiet_libraries()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from finetune.merge.checks import check_adapter_matches_base, read_adapter_config

    adapters = list(source.adapters) + list(extra_adapters)
    taken = [n for n, _ in source.adapters]
    for name, _ in extra_adapters:
        if name in taken:
            raise UserError(f"--adapter: the name {name!r} is already used by {source.run_dir or source.base}")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    try:
        config = AutoConfig.from_pretrained(source.base, revision=source.revision)
        tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir)
    except (OSError, ValueError) as exc:
        from finetune.recipe.inputs import refuse_offline_hub

        refuse_offline_hub(source.base, "the base model")
        raise UserError(f"{source.base}: cannot load the model: {str(exc).splitlines()[0]}") from None
    kinds = {name: str(read_adapter_config(path).get("peft_type", "LORA")).upper() for name, path in adapters}
    if len(set(kinds.values())) > 1:
        found = ", ".join(f"{name} is {kind}" for name, kind in kinds.items())
        raise UserError(
            f"--adapter: PEFT keeps several adapters on one base only when they are of one kind ({found}); "
            "load adapters of other kinds in a separate `finetune chat`/`generate`/`eval`"
        )
    for name, path in adapters:
        if kinds[name] in PROMPT_LEARNING:  # virtual tokens, no base module weights
            width = read_adapter_config(path).get("token_dim")  # prefix tuning's is the key/value width instead
            if kinds[name] == "PROMPT_TUNING" and width and width != config.hidden_size:
                raise UserError(f"adapter {name} ({path}): its virtual tokens are {width} wide, the base "
                                f"{source.base} is {config.hidden_size}; it was trained on another model")
        else:
            check_adapter_matches_base(path, config, source.base)
    if log:
        log(f"loading {source.base}" + (f" with adapters {', '.join(n for n, _ in adapters)}" if adapters else ""))
    model = AutoModelForCausalLM.from_pretrained(source.base, dtype=dtype, revision=source.revision)
    if adapters:
        from peft import PeftModel

        from finetune.model.vocab import fit_embeddings

        fit_embeddings(model, tokenizer)  # tokens added in training: the adapter holds rows the base lacks
        (first, first_path), rest = adapters[0], adapters[1:]
        model = PeftModel.from_pretrained(model, first_path, adapter_name=first)
        for name, path in rest:
            model.load_adapter(path, adapter_name=name)
        model.set_adapter(first)
    device = "cuda" if cuda else "cpu"
    model = model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation continues from the right edge of every row
    return Loaded(model, tokenizer, [n for n, _ in adapters], source, device)


def prompt_text(tokenizer, prompt, system: str | None = None) -> str:
    """A prompt (a string or a list of messages) as text ending where the assistant's reply begins."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    if not tokenizer.chat_template:
        if not isinstance(prompt, str):
            raise UserError("this tokenizer has no chat template, so prompts must be plain strings")
        return prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Sampling:
    """Decoding settings; temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0

    def kwargs(self, tokenizer) -> dict:
        """Arguments for `model.generate`."""
        args = {"max_new_tokens": self.max_new_tokens, "pad_token_id": tokenizer.pad_token_id}
        if self.temperature > 0:
            return {**args, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        return {**args, "do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def stop_ids(loaded: Loaded) -> set[int]:
    """Tokens that end a reply (eos, the template's end of turn in generation_config) or pad it."""
    tokenizer, config = loaded.tokenizer, getattr(loaded.model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, *(eos if isinstance(eos, list) else [eos])}
    return {i for i in ids if i is not None}


def decode_reply(loaded: Loaded, ids: list[int]) -> str:
    """The reply up to its first stop token, special tokens kept: a trained `<tool_call>` must reach the output."""
    stops = stop_ids(loaded)
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    return loaded.tokenizer.decode(ids[:end], skip_special_tokens=False).strip()


def generate_texts(loaded: Loaded, texts: list[str], sampling: Sampling, streamer=None) -> list[str]:
    """Continue each text (a left-padded batch) and return only the new text of each."""
    import torch

    tokenizer = loaded.tokenizer
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(loaded.device)
    with torch.no_grad():
        out = loaded.model.generate(**inputs, **sampling.kwargs(tokenizer), streamer=streamer)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [decode_reply(loaded, row.tolist()) for row in new]
