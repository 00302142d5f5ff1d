"""Memory plan: a run's peak memory per process, estimated from the model's config.json alone.

No weights are read and nothing heavy is imported, so `finetune plan` answers in a fraction of a second
and `finetune train` can refuse a run that cannot fit before it loads anything. The model is a sum of
parts (docs/memory.md derives each and records how the estimate compares with measured peaks):

    weights + trainable parameters + gradients + optimizer states + activations + LM head/loss

for a dense decoder-only transformer with Llama-style fields (Llama, Mistral, Qwen2/3, Gemma, Phi-3...).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import UserError
from finetune.recipe.schema import LoraFields, Recipe
from finetune.train.sft_options import resolve_batching, resolve_lm_head

GiB = 2**30
CUDA_RESERVE = 1.0 * GiB  # CUDA context, cuBLAS workspaces, allocator slack: outside max_memory_allocated
CPU_RUNTIME = 1.5 * GiB  # Python with torch, transformers, peft and trl imported (measured RSS, docs/memory.md)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, read from config.json."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    dtype: str | None  # the checkpoint's dtype, if the config says

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer, by module name."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus the LM head (once when tied), plus norms."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params


@dataclass
class Sharding:
    """How training state is split across data-parallel processes."""

    processes: int = 1
    zero_stage: int = 0  # 0: DDP (replicated), 1: optimizer, 2: + gradients, 3 (ZeRO-3/FSDP): + weights
    engine: str = "auto"  # deepspeed, fsdp, ddp or none; auto: deepspeed when zero_stage is set
    offload_optimizer: bool = False  # DeepSpeed keeps optimizer states (and their float32 masters) in CPU memory

    @property
    def deepspeed(self) -> bool:
        return self.engine == "deepspeed" or (self.engine == "auto" and self.zero_stage > 0)

    def describe(self) -> str:
        if self.processes == 1 and not self.deepspeed:
            return "1 process"
        how = "DDP, replicated" if self.zero_stage == 0 else f"ZeRO-{self.zero_stage}/FSDP-style sharding"
        return f"{self.processes} processes, {how}"


@dataclass
class Part:
    name: str
    bytes: float
    how: str


@dataclass
class Estimate:
    parts: list[Part]
    device: str
    micro_batch: int
    max_length: int
    checkpointing: bool
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(p.bytes for p in self.parts)


# --- reading config.json ---------------------------------------------------------------------------------------


def find_config(model_path: str, revision: str | None = None) -> Path:
    """config.json of a local model directory (or a path to the file), or from the Hub cache or the Hub."""
    path = Path(model_path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        if (path / "config.json").is_file():
            return path / "config.json"
        raise UserError(f"model.path: {path} has no config.json; point model.path at a model directory")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", model_path):
        raise UserError(f"model.path: {model_path!r} is neither a local directory nor a Hub id (org/name)")
    return _config_from_hub(model_path, revision)


def _config_from_hub(repo: str, revision: str | None) -> Path:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json", revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    hint = (f"download it once where the Hub is reachable, or pass a local directory with {repo}'s config.json "
            "as model.path (only config.json is needed for a plan)")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"model.path: {repo}'s config.json is not in the local Hub cache and HF_HUB_OFFLINE is "
                        f"set; {hint}")
    if not _hub_reachable():
        raise UserError(f"model.path: cannot reach the Hugging Face Hub to read {repo}'s config.json; {hint}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, "config.json", revision=revision))
    except Exception as exc:  # gated, missing, network: the Hub's own message says which
        raise UserError(f"model.path: cannot read {repo}'s config.json from the Hub: "
                        f"{str(exc).strip().splitlines()[0]}; {hint}") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def read_shape(config_path: Path) -> ModelShape:
    """The fields of config.json that memory depends on; refuses configs this model cannot describe."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{config_path}: cannot read the model config: {exc}") from None
    config = config.get("text_config", config)  # vision-language models keep the decoder's fields here
    if any(config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise UserError(f"{config_path}: a mixture-of-experts config; finetune plan models dense decoders only")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if not isinstance(config.get(k), int)]
    if missing:
        raise UserError(f"{config_path}: the config has no {', '.join(missing)}; finetune plan models decoder "
                        "transformers with Llama-style fields (Llama, Mistral, Qwen, Gemma, Phi-3)")
    heads = config["num_attention_heads"]
    return ModelShape(
        model_type=str(config.get("model_type", "unknown")),
        hidden=config["hidden_size"],
        layers=config["num_hidden_layers"],
        heads=heads,
        kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate=config["intermediate_size"],
        vocab=config["vocab_size"],
        tied=bool(config.get("tie_word_embeddings", False)),
        dtype=config.get("dtype") or config.get("torch_dtype"),
    )


def load_shape(recipe: Recipe) -> ModelShape:
    """The shape of the model a recipe trains: model.path resolved (builtin names, earlier runs), its config.json."""
    from finetune.model.start import resolve_start

    start = resolve_start(recipe)
    return read_shape(find_config(start.base, start.revision))


# --- the estimate -----------------------------------------------------------------------------------------------


def sharding_from_recipe(recipe: Recipe, processes: int | None, zero_stage: int | None) -> Sharding:
    """Flags win; else whatever the recipe's distributed section says (its fields are read defensively)."""
    section = recipe.distributed
    found = next((getattr(section, k) for k in ("processes", "num_processes", "nproc_per_node", "world_size")
                  if isinstance(getattr(section, k, None), int)), 1)
    stage = getattr(section, "zero_stage", None)
    strategy = str(getattr(section, "strategy", "none")).lower()
    if not isinstance(stage, int):
        match = re.search(r"zero[_-]?([123])", f"{strategy} {getattr(section, 'config', '')}")
        stage = int(match.group(1)) if match else 3 if "fsdp" in strategy else 0
    engine = strategy if strategy in ("deepspeed", "fsdp", "ddp") else "auto"
    offload = bool(getattr(section, "offload_optimizer", False)) or "offload" in str(getattr(section, "config", ""))
    return Sharding(processes=processes or found, zero_stage=stage if zero_stage is None else zero_stage,
                    engine=engine, offload_optimizer=offload)


def estimate(recipe: Recipe, shape: ModelShape, *, device: str, sharding: Sharding | None = None,
             micro_batch: int | None = None, checkpointing: bool | None = None) -> Estimate:
    """Peak memory of one training process for this recipe and model shape.

    Args:
        device: "cuda" (bf16 by default, as `precision: auto` picks there) or "cpu" (fp32).
        micro_batch, checkpointing: override the recipe's (to search for what fits).
    """
    sharding = sharding or Sharding()
    t = recipe.training
    batch = micro_batch or t.micro_batch_size
    ckpt = t.gradient_checkpointing if checkpointing is None else checkpointing
    compute = _compute_dtype(recipe, device)
    a = DTYPE_BYTES[compute]
    lora = recipe.adapter if isinstance(recipe.adapter, LoraFields) else None
    parts, notes = _state_parts(recipe, shape, sharding, _load_dtype(recipe, compute), compute, notes=[])

    # DPO and ORPO run chosen and rejected together: twice the rows per micro batch
    rows = 2 * batch if recipe.method.kind in ("dpo", "orpo") else batch
    parts.append(Part("activations", _activations(shape, recipe, rows, a, ckpt, lora),
                      f"{rows} × {t.max_length} tokens × {shape.layers} layers, "
                      f"{'with' if ckpt else 'without'} gradient checkpointing, {compute}"))
    head, how = _loss_head(shape, recipe, rows, a, device)
    parts.append(Part("LM head and loss", head, how))
    return Estimate(parts, device, batch, t.max_length, ckpt, notes)


def _state_parts(recipe: Recipe, shape: ModelShape, sharding: Sharding, load: str, compute: str, notes: list[str]):
    """Weights, trainable parameters, gradients and optimizer states, as the run holds them (docs/memory.md).

    Without DeepSpeed, bf16/fp16 runs compute under autocast on float32 trained weights (fp32_master_weights):
    4 bytes of weights, 4 of gradients and 8 of AdamW states per trained parameter. DeepSpeed keeps 16-bit
    weights and gradients for the forward and backward, and float32 gradients, masters and AdamW states in its
    optimizer: 2 + 2 + 4 + 4 + 8 bytes, sharded by stage as estimate_zero2/3_model_states_mem_needs count them
    (ZeRO-2 shards all but the 16-bit weights; ZeRO-3 shards all of it and holds no 16-bit gradients;
    ZeRO-1 shards the optimizer's float32 part).
    """
    n = sharding.processes
    shard = {k: (n if sharding.zero_stage >= s else 1) for k, s in (("optim", 1), ("grads", 2), ("weights", 3))}
    adapter = recipe.adapter
    lora = adapter if isinstance(adapter, LoraFields) else None
    half = compute != "float32"
    if adapter.kind == "qlora":
        # 4-bit linears: 0.5 byte plus block constants (fp32 per 64, or 8-bit per 64 + fp32 per 16,384).
        per_param = 0.5 + (1 / 64 + 4 / (64 * 256) if adapter.double_quant else 4 / 64)
        frozen = shape.linear_params * per_param + shape.embedding_params * DTYPE_BYTES[load]
        how = (f"{_count(shape.linear_params)} linear in 4-bit {adapter.quant_type} + "
               f"{_count(shape.embedding_params)} embedding/head/norm in {load}")
    else:
        frozen = shape.params * DTYPE_BYTES[load]
        how = f"{_count(shape.params)} parameters in {load}"

    if lora is None and adapter.kind == "full":
        trainable = shape.params
    elif lora is None:
        trainable = 0  # IA3, prompt and prefix tuning: too few to show
    else:
        trainable, unknown = _lora_params(shape, lora)
        if unknown:
            notes.append(f"adapter.target_modules {unknown} are not Llama-style linear names; not counted")
    pure = half and not recipe.training.fp32_master_weights
    master = 2 if pure else 4  # bytes per trained weight as the optimizer updates it
    deepspeed = sharding.deepspeed and half and trainable
    parts = []
    if adapter.kind == "full":
        # The model is what trains: its weights are the trained weights.
        per_weight = 2 if deepspeed or pure else 4  # float32 masters are the weights themselves without DeepSpeed
        what = "16-bit (DeepSpeed; float32 masters in the optimizer)" if deepspeed else _bytes_name(per_weight)
        parts.append(Part("weights", trainable * per_weight / shard["weights"],
                          f"{_count(trainable)} parameters in {what}" + _sharded(shard["weights"])))
    else:
        parts.append(Part("weights", frozen / shard["weights"], how + _sharded(shard["weights"])))
        if trainable:
            per_weight = 2 if deepspeed or pure else 4
            what = "16-bit (DeepSpeed)" if deepspeed else _bytes_name(per_weight)
            parts.append(Part("adapter", trainable * per_weight / shard["weights"],
                              f"{_count(trainable)} trained in {what}" + (f" (r={lora.r})" if lora else "")
                              + _sharded(shard["weights"])))
    if not trainable and adapter.kind != "full":
        return parts, notes
    # DeepSpeed: float32 gradients for the optimizer, and below ZeRO-3 the 16-bit ones the backward writes
    grad_bytes = (4 + (2 if sharding.zero_stage < 3 else 0)) if deepspeed else master
    grad_shard = shard["grads"] if not (deepspeed and sharding.zero_stage == 1) else 1
    parts.append(Part("gradients", trainable * grad_bytes / grad_shard,
                      ("16-bit + float32 copies (DeepSpeed)" if deepspeed else f"one per trained parameter, "
                       f"{_bytes_name(master)}") + _sharded(grad_shard)))
    if n > 1 and sharding.zero_stage == 0:
        parts.append(Part("DDP buckets", trainable * master, "DDP's gradient buckets, a second copy of the gradients"))
    states, state_bytes = {"adamw_torch": (2, master), "adamw_torch_fused": (2, master), "adamw_8bit": (2, 1),
                           "sgd": (0, 0)}[recipe.training.optimizer]
    optimizer = trainable * (states * state_bytes + (4 if deepspeed else 0))  # DeepSpeed's float32 masters
    where = "in CPU memory (offload_optimizer), not on the device" if sharding.offload_optimizer else ""
    parts.append(Part("optimizer", 0 if sharding.offload_optimizer else optimizer / shard["optim"],
                      f"{recipe.training.optimizer}: {states} state(s) of {state_bytes} byte(s) per trained parameter"
                      + (" + float32 masters (DeepSpeed)" if deepspeed else "") + (f"; {where}" if where else "")
                      + _sharded(shard["optim"])))
    if sharding.zero_stage == 3:
        largest = max(shape.vocab * shape.hidden, *(i * o for i, o in shape.linears().values()))
        parts.append(Part("gathered layers", 4 * largest, f"ZeRO-3/FSDP: the largest layer ({_count(largest)} "
                          "parameters) gathered whole, 4 bytes each, as DeepSpeed's estimator counts it"))
    if recipe.method.kind == "dpo" and lora is None:
        parts.append(Part("reference model", frozen / shard["weights"], "DPO without an adapter keeps a frozen copy"))
    return parts, notes


def _bytes_name(per_param: float) -> str:
    return {4: "float32", 2: "bfloat16", 1: "8-bit"}.get(round(per_param), f"{per_param:g} bytes each")


def _lora_params(shape: ModelShape, lora: LoraFields) -> tuple[int, list[str]]:
    """Trainable parameters of the adapter (and modules_to_save), and target names this model does not know."""
    targets, unknown = _lora_targets(shape, lora)
    count = sum(lora.r * (i + o) + (o if lora.use_dora else 0) for i, o in targets) * shape.layers
    count += sum(shape.vocab * shape.hidden for m in lora.modules_to_save if m in ("lm_head", "embed_tokens"))
    return count, unknown


def _compute_dtype(recipe: Recipe, device: str) -> str:
    precision = recipe.training.precision
    if device == "cpu" or precision == "fp32":
        return "float32"
    return "float16" if precision == "fp16" else "bfloat16"


def _load_dtype(recipe: Recipe, compute: str) -> str:
    """As model.load.load_dtype_name: full fine-tuning with float32 masters loads in float32."""
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    if recipe.adapter.kind == "full" and recipe.training.fp32_master_weights:
        return "float32"
    return compute


def _lora_targets(shape: ModelShape, lora: LoraFields) -> tuple[list[tuple[int, int]], list[str]]:
    linears = shape.linears()
    if lora.target_modules == "all-linear":
        return list(linears.values()), []
    names = [m for m in lora.target_modules if m in linears]
    return [linears[m] for m in names], [m for m in lora.target_modules if m not in linears]


def _activations(shape: ModelShape, recipe: Recipe, batch: int, a: int, ckpt: bool, lora: LoraFields | None) -> float:
    """Bytes saved for the backward pass (docs/memory.md, "Activations")."""
    h, i, layers = shape.hidden, shape.intermediate, shape.layers
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    tokens = batch * recipe.training.max_length
    # Per token and layer: two RMSNorms (input, output), q/k/v, attention output, and the gated MLP's gate, up,
    # activation and product; the norms also keep an fp32 copy when computing in 16 bits.
    per_layer = a * (4 * h + 2 * q + 2 * kv + 4 * i) + (8 * h if a == 2 else 0)
    if lora is not None:
        targets, _ = _lora_targets(shape, lora)
        per_layer += a * lora.r * len(targets)  # each lora_A output
        if lora.dropout > 0:  # dropout gives every adapted layer its own copy of the input, and a mask
            per_layer += (a + 1) * sum(i_ for i_, _ in targets)
    saved = layers * tokens * (a * h if ckpt else per_layer)
    if ckpt:
        saved += tokens * per_layer  # the layer being recomputed
    attention = recipe.model.attn_implementation
    length = recipe.training.max_length
    if attention == "eager":
        saved += (1 if ckpt else layers) * batch * shape.heads * length * length * (4 + a)
    if resolve_batching(recipe) in ("padding_free", "packed") and attention != "flash_attention_2":
        saved += tokens * tokens  # one boolean mask over the whole concatenated batch
    elif attention != "flash_attention_2":
        saved += batch * length * length  # the padding mask
    return saved + tokens * a * 3 * h  # embeddings, final norm


def _loss_head(shape: ModelShape, recipe: Recipe, batch: int, a: int, device: str) -> tuple[float, str]:
    tokens = batch * recipe.training.max_length
    if recipe.method.kind == "sft" and resolve_lm_head(recipe, device) == "chunked":
        rows, cols = min(tokens, 4096), min(shape.vocab, 32768)
        tiles = a if device == "cuda" else 4 * 4  # Triton folds one tile; the CPU path keeps ~4 fp32 copies
        return rows * cols * tiles + tokens * shape.hidden * 4, "TRL's chunked head: vocabulary tiles, no logits"
    per_logit = a + 12 if a == 2 else 12  # logits, fp32 copy, log-softmax, its gradient
    return tokens * shape.vocab * per_logit, f"{_count(tokens * shape.vocab)} logits ({tokens} tokens × {shape.vocab})"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def _sharded(by: int) -> str:
    return f", ÷{by} sharded" if by > 1 else ""


# --- fitting ----------------------------------------------------------------------------------------------------


def budget_bytes(device: str, memory: float) -> float:
    """What a run may use of a device with `memory` bytes: the CUDA context and the CPU runtime are reserved."""
    return memory - (CUDA_RESERVE if device == "cuda" else CPU_RUNTIME)


def largest_micro_batch(recipe: Recipe, shape: ModelShape, device: str, budget: float, sharding: Sharding,
                        checkpointing: bool) -> int:
    """The largest micro batch whose estimate fits the budget (0 if not even 1 fits)."""
    def fits(b: int) -> bool:
        return estimate(recipe, shape, device=device, sharding=sharding, micro_batch=b,
                        checkpointing=checkpointing).total <= budget

    if not fits(1):
        return 0
    hi = 1
    while hi < 4096 and fits(hi * 2):
        hi *= 2
    lo, hi = hi, min(hi * 2, 4096)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def parse_size(text: str) -> float:
    """'24GiB', '80GB', '24G', '512MiB' -> bytes. GB and GiB both mean 2**30 (GPU sizes are binary in practice)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B?)\s*", text, flags=re.I)
    if not match:
        raise UserError(f"--gpu-memory: expected a size like 24GiB or 80GB, found {text!r}")
    scale = 2 ** (10 * "KMGT".index(match.group(2)[0].upper()) + 10)
    return float(match.group(1)) * scale


def gib(n: float) -> str:
    """A byte count in GiB, or MiB below one GiB."""
    return f"{n / GiB:,.2f} GiB" if n >= GiB else f"{n / 2**20:,.1f} MiB"


def render(recipe_name: str, shape: ModelShape, est: Estimate, *, budget: float | None, memory_label: str,
           sharding: Sharding, fits_batch: int, fits_batch_ckpt: int, alt: Estimate) -> str:
    """The plan as a markdown table with a verdict."""
    lines = [
        f"memory plan for {recipe_name}: {shape.model_type}, {_count(shape.params)} parameters, "
        f"{shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}",
        f"per process on {'a GPU' if est.device == 'cuda' else 'the CPU'}: micro batch {est.micro_batch} × "
        f"max_length {est.max_length}; {sharding.describe()}",
        "",
        "| part | memory | how |",
        "|---|---:|---|",
    ]
    lines += [f"| {p.name} | {gib(p.bytes)} | {p.how} |" for p in est.parts]
    lines.append(f"| **total** | **{gib(est.total)}** | peak estimate |")
    other = "with" if alt.checkpointing else "without"
    activations = gib(next(p.bytes for p in alt.parts if p.name == "activations"))
    lines.append(f"| (total {other} gradient checkpointing) | {gib(alt.total)} | activations {activations} |")
    lines.append("")
    lines += [f"note: {n}" for n in est.notes]
    if budget is None:
        return "\n".join(lines)
    reserve = "the CUDA context and workspace" if est.device == "cuda" else "Python and the libraries"
    verdict = "FITS" if est.total <= budget else "DOES NOT FIT"
    lines.append(f"{verdict}: {gib(est.total)} of {gib(budget)} usable ({memory_label}, less "
                 f"{gib(CUDA_RESERVE if est.device == 'cuda' else CPU_RUNTIME)} for {reserve})")
    ckpt = est.checkpointing
    lines.append(f"largest micro batch that fits: {fits_batch or 'none'}"
                 f" ({'with' if ckpt else 'without'} gradient checkpointing); "
                 f"{'without' if ckpt else 'with'} it: {fits_batch_ckpt or 'none'}")
    return "\n".join(lines)


# --- commands ---------------------------------------------------------------------------------------------------


def plan_report(recipe: Recipe, source: str, *, gpu_memory: str | None = None, processes: int | None = None,
                zero_stage: int | None = None) -> tuple[str, bool | None]:
    """`finetune plan`: the table and verdict, and whether it fits (None when no budget is known)."""
    shape = load_shape(recipe)
    sharding = sharding_from_recipe(recipe, processes, zero_stage)
    if gpu_memory is not None:
        device, memory, label = "cuda", parse_size(gpu_memory), f"--gpu-memory {gpu_memory}"
    else:
        device, memory, label = local_memory()
    return _report(recipe, source, shape, sharding, device, memory, label)


def _report(recipe, source, shape, sharding, device, memory, label) -> tuple[str, bool | None]:
    est = estimate(recipe, shape, device=device, sharding=sharding)
    alt = estimate(recipe, shape, device=device, sharding=sharding, checkpointing=not est.checkpointing)
    budget = budget_bytes(device, memory) if memory else None
    batches = [largest_micro_batch(recipe, shape, device, budget, sharding, c) if budget else 0
               for c in (est.checkpointing, not est.checkpointing)]
    text = render(source, shape, est, budget=budget, memory_label=label, sharding=sharding,
                  fits_batch=batches[0], fits_batch_ckpt=batches[1], alt=alt)
    return text, (est.total <= budget if budget else None)


def local_memory() -> tuple[str, float | None, str]:
    """(device, bytes, label) of this machine: the first GPU's memory, else the RAM available now."""
    import importlib.util

    # Importing torch takes seconds; without an NVIDIA driver there is no GPU to ask it about.
    driver = Path("/proc/driver/nvidia").exists() or os.name != "posix"
    if driver and importlib.util.find_spec("torch") is not None and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return "cuda", float(props.total_memory), f"{props.name}, {gib(props.total_memory)}"
    available = _available_ram()
    return "cpu", available, f"RAM available now, {gib(available)}" if available else "RAM unknown"


def _available_ram() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(recipe: Recipe, model_path: str, device: str, *, force: bool, log) -> None:
    """`finetune train`'s check before anything loads: refuse a plan that cannot fit, unless forced."""
    if device == "cuda":
        import torch

        memory = float(torch.cuda.get_device_properties(0).total_memory)
        label = f"{torch.cuda.get_device_name(0)}, {gib(memory)}"
    else:
        memory = _available_ram()
        label = f"RAM available now, {gib(memory or 0)}"
        if memory is not None:
            memory += _own_rss()  # this process is already counted as used; its runtime is reserved below
    if not memory:
        return
    try:
        shape = read_shape(find_config(model_path, recipe.model.revision))
    except UserError as exc:
        log(f"memory plan skipped: {exc}")
        return
    est = estimate(recipe, shape, device=device, sharding=sharding_from_recipe(recipe, None, None))
    budget = budget_bytes(device, memory)
    if est.total <= budget:
        log(f"memory plan: {gib(est.total)} estimated peak of {gib(budget)} usable ({label})")
        return
    message = (f"the memory plan does not fit: {gib(est.total)} estimated peak, {gib(budget)} usable ({label}). "
               f"See the breakdown with `finetune plan`; lower training.micro_batch_size or max_length, turn on "
               f"training.gradient_checkpointing, or use adapter.kind: qlora")
    if not force:
        raise UserError(message + "; or pass --ignore-memory-plan to train anyway")
    log(f"warning: {message} (--ignore-memory-plan: training anyway)")


def _own_rss() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 0.0


def peak_memory() -> dict:
    """What this process has used at most so far, for summary.json (to hold against the plan)."""
    import resource
    import sys

    torch = sys.modules.get("torch")
    peaks = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch is not None and torch.cuda.is_available():
        peaks["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    return peaks
