"""finetune's speed choices change how fast a batch trains, never its loss: each is compared with TRL's own path."""

from __future__ import annotations

import json

import pytest

from finetune.errors import UserError
from finetune.recipe.load import recipe_from_dict

BASE = {
    "model": {"path": "builtin:tiny-llama"},
    "data": {"train": [{"path": "builtin:sample_chat.jsonl", "max_rows": 48}]},
    "method": {"kind": "sft"},
    "adapter": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
    "training": {"micro_batch_size": 8, "max_length": 128, "max_steps": 4, "logging_steps": 1},
}


def recipe(**sections):
    data = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return recipe_from_dict(data)


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"method": {"packing": True}, "training": {"batching": "grouped"}}, "training.batching"),
        ({"training": {"token_metrics": True, "lm_head": "full_logits"}}, "training.token_metrics"),
        ({"method": {"kind": "dpo"}, "training": {"lm_head": "chunked"}}, "training.lm_head"),
    ],
)
def test_speed_options_that_cannot_apply_are_refused(sections, key):
    with pytest.raises(UserError) as info:
        recipe(**sections)
    assert any(key in p for p in info.value.problems), info.value.problems


def test_auto_choices_follow_the_device_and_attention():
    from finetune.train.sft_options import resolve_batching, resolve_lm_head, sft_config_kwargs

    default = recipe()
    assert resolve_batching(default) == "padding_free" and resolve_lm_head(default, "cpu") == "full_logits"
    assert resolve_lm_head(default, "cuda") == "chunked"
    assert resolve_batching(recipe(model={"attn_implementation": "flash_attention_2"})) == "padding_free"
    assert resolve_batching(recipe(model={"attn_implementation": "eager"})) == "grouped"
    assert resolve_lm_head(recipe(training={"token_metrics": True}), "cpu") == "chunked"
    assert sft_config_kwargs(recipe(training={"batching": "padding_free"}))["max_length"] is None
    assert sft_config_kwargs(recipe(method={"packing": True}))["packing"] is True


def build_trainer(r, run_dir, torch):
    """finetune's SFT trainer for recipe `r` on the tiny model, with random values in every trained matrix."""
    from transformers import AutoTokenizer

    from finetune.adapters.configs import build_peft_config
    from finetune.model.builtin import resolve_model_path
    from finetune.model.load import load_model, resolve_precision
    from finetune.train.run import _build_data
    from finetune.train.trainers import build_sft_trainer

    precision = resolve_precision(r)
    path = resolve_model_path(r.model.path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    from finetune.run.layout import RunDir

    train_ds, _ = _build_data(r, tokenizer, RunDir(run_dir), lambda _: None)
    torch.manual_seed(0)
    peft_config = build_peft_config(r, model_path=path, hidden_size=None, total_steps=None)
    model = load_model(path, r, precision)
    trainer = build_sft_trainer(r, model, tokenizer, train_ds, None, peft_config, precision, run_dir)
    with torch.no_grad():  # LoRA B starts at zero; give both matrices values so every gradient is non-trivial
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.05)
    trainer.model.train()
    return trainer


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, torch_one_thread):
    """finetune's SFT trainer with TRL's chunked head and all its token metrics."""
    r = recipe(training={"lm_head": "chunked", "token_metrics": True, "batching": "grouped"})
    return build_trainer(r, tmp_path_factory.mktemp("speed"), torch_one_thread)


def loss_and_grads(trainer, inputs, num_items_in_batch=None):
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.item(), grads


def scaled_count(inputs) -> int:
    """A num_items_in_batch as gradient accumulation over three such batches gives it."""
    return 3 * int((inputs["labels"][:, 1:] != -100).sum())


def assert_same(a, b, tol=1e-5):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert loss_a == pytest.approx(loss_b, rel=1e-6, abs=1e-6)
    assert grads_a.keys() == grads_b.keys()
    worst = max((grads_a[k] - grads_b[k]).abs().max().item() / (grads_b[k].abs().max().item() + 1e-12)
                for k in grads_a)
    assert worst < tol, worst


@pytest.mark.slow
def test_lean_loss_heads_give_trl_loss_and_gradients(trainer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    rows = [trainer.train_dataset[i] for i in range(8)]
    padded = trainer._prepare_inputs(trainer.data_collator(rows))
    assert (padded["attention_mask"] == 0).any()  # the batch does carry padding
    trl_path = loss_and_grads(trainer, padded)  # token_metrics on: TRL's own compute_loss
    scaled = loss_and_grads(trainer, padded, num_items_in_batch=scaled_count(padded))

    trainer.token_metrics = False
    trainer.lm_head = "full_logits"
    assert_same(loss_and_grads(trainer, padded), trl_path)
    assert_same(loss_and_grads(trainer, padded, num_items_in_batch=scaled_count(padded)), scaled)

    # The chunked head patched to log-probabilities only, as FastSFTTrainer does when token_metrics is off.
    add_fused_lm_head(trainer.model.get_base_model(), outputs=("log_probs",))
    trainer.lm_head = "chunked"
    assert_same(loss_and_grads(trainer, padded), trl_path)

    # padding_free: the same rows concatenated without padding give the same loss and gradients.
    collator = DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id, padding_free=True)
    flat = trainer._prepare_inputs(collator(rows))
    assert "attention_mask" not in flat and flat["input_ids"].shape[0] == 1
    assert_same(loss_and_grads(trainer, flat), trl_path)
    trainer.lm_head = "full_logits"
    assert_same(loss_and_grads(trainer, flat), trl_path)


@pytest.mark.slow
def test_grouped_batches_cover_every_row_once_with_less_padding(trainer):
    import random

    import datasets

    rng = random.Random(0)
    lengths = [int(min(max(rng.lognormvariate(0, 0.75) * 150, 8), 512)) for _ in range(400)]
    rows = [[1] * n for n in lengths]
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "labels": rows})
    order = list(iter(trainer._get_train_sampler(dataset)))
    assert sorted(order) == list(range(len(lengths)))

    def padding(indices):
        batches = [indices[i:i + 8] for i in range(0, len(indices), 8)]
        return sum(max(lengths[j] for j in b) * len(b) - sum(lengths[j] for j in b) for b in batches)

    shuffled = list(range(len(lengths)))
    rng.shuffle(shuffled)
    assert padding(order) < 0.25 * padding(shuffled)


@pytest.mark.slow
def test_training_logs_token_counts_and_peak_memory(tmp_path, torch_one_thread):
    import yaml

    from finetune.recipe import load_recipe
    from finetune.train.run import run_training

    data = json.loads(json.dumps(BASE))
    data["training"] |= {"batching": "padding_free", "lm_head": "chunked", "learning_rate": 1e-2}
    data["output"] = {"dir": str(tmp_path / "run")}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    run_dir = run_training(load_recipe(path), log=lambda _: None)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 4
    assert all(0 < r["num_trained_tokens"] < r["num_tokens"] == r["num_input_tokens"] for r in steps)  # no padding
    assert "mean_token_accuracy" not in steps[-1]  # token metrics off by default
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["peak_rss_bytes"] > 100 * 2**20


@pytest.fixture(scope="module")
def fast_trainer(tmp_path_factory, torch_one_thread):
    """finetune's SFT trainer with the defaults on a CPU: padding-free rows, sdpa per sequence, fused LM head."""
    return build_trainer(recipe(), tmp_path_factory.mktemp("fast"), torch_one_thread)


def plain_loss_and_grads(trainer, inputs, num_items_in_batch=None):
    """transformers' own path: the model computes its cross-entropy over every position of a padded batch."""
    from transformers import Trainer

    trainer.model.zero_grad(set_to_none=True)
    loss = Trainer.compute_loss(trainer, trainer.model, dict(inputs), num_items_in_batch=num_items_in_batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.slow
def test_padding_free_and_packed_batches_give_the_padded_loss_and_gradients(fast_trainer):
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from finetune.train.attention import SEGMENT_ATTENTION

    trainer = fast_trainer
    assert trainer.model.config._attn_implementation == SEGMENT_ATTENTION
    assert trainer._fused_head is not None and trainer._keeps_positions
    rows = [trainer.train_dataset[i] for i in range(8)]
    padded = trainer._prepare_inputs(
        DataCollatorForLanguageModeling(pad_token_id=trainer.processing_class.pad_token_id)(rows))
    assert (padded["attention_mask"] == 0).any()
    reference = plain_loss_and_grads(trainer, padded)
    scaled = plain_loss_and_grads(trainer, padded, num_items_in_batch=scaled_count(padded))

    flat = trainer._prepare_inputs(trainer.data_collator(rows))  # the default collator: one row, no padding
    assert flat["input_ids"].shape[0] == 1 and len(flat["cu_seq_lens_q"]) == len(rows) + 1
    assert_same(loss_and_grads(trainer, flat), reference)  # segment attention, trained positions, fused head
    assert_same(loss_and_grads(trainer, flat, num_items_in_batch=scaled_count(padded)), scaled)
    head, trainer._fused_head = trainer._fused_head, None  # the model's LM head on the trained positions
    try:
        assert_same(loss_and_grads(trainer, flat), reference)
    finally:
        trainer._fused_head = head

    # Packed: the same rows in bins of max_length (TRL's bfd, several rows per bin), two bins per batch.
    packed = pack_dataset(trainer.train_dataset.select(range(8)), 128, "bfd")
    assert len(packed) < len(rows)
    bins = trainer._prepare_inputs(trainer.data_collator([packed[i] for i in range(len(packed))]))
    assert len(bins["cu_seq_lens_q"]) == len(rows) + 1  # every row is its own sequence inside the bins
    assert_same(loss_and_grads(trainer, bins), reference)


@pytest.mark.slow
def test_segment_attention_matches_sdpa_with_the_block_mask(fast_trainer, torch_one_thread):
    """The same padding-free row through transformers' sdpa (N x N block-diagonal mask) and per sequence."""
    torch = torch_one_thread
    from finetune.train.attention import SEGMENT_ATTENTION

    model = fast_trainer.model
    rows = [fast_trainer.train_dataset[i] for i in range(6)]
    flat = fast_trainer._prepare_inputs(fast_trainer.data_collator(rows))
    inputs = {"input_ids": flat["input_ids"], "position_ids": flat["position_ids"], "use_cache": False}
    with torch.no_grad():
        ours = model(**inputs, cu_seq_lens_q=flat["cu_seq_lens_q"]).logits
        by_positions = model(**inputs).logits  # boundaries read off the position ids instead
        model.base_model.model.set_attn_implementation("sdpa")
        try:
            masked = model(**inputs).logits
        finally:
            model.base_model.model.set_attn_implementation(SEGMENT_ATTENTION)
    torch.testing.assert_close(ours, masked, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(by_positions, masked, atol=2e-5, rtol=1e-4)


def test_fused_cross_entropy_matches_torch_over_several_tiles(torch_one_thread, monkeypatch):
    torch = torch_one_thread
    from finetune.train import cpu_ops

    monkeypatch.setattr(cpu_ops, "TILE_FLOATS", 16 * 97)  # 16-row tiles: 50 rows make 4 tiles, the last short
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 24, generator=generator, requires_grad=True)
    weight = torch.randn(97, 24, generator=generator)
    targets = torch.randint(0, 97, (50,), generator=generator)
    loss = cpu_ops.fused_cross_entropy(hidden, weight, targets) / 7
    (grad,) = torch.autograd.grad(loss, hidden)
    want = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum") / 7
    (want_grad,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, want_grad)


def test_fast_dropout_is_bernoulli_scaled_and_replays_from_torch_seed(torch_one_thread):
    torch = torch_one_thread
    from finetune.train.cpu_ops import FastDropout

    dropout = FastDropout(0.1).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(3)
    out = dropout(x)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.9) < 5 * (0.9 * 0.1 / 1e6) ** 0.5  # within 5 sigma
    torch.testing.assert_close(out[kept].detach(), torch.full((int(kept.sum()),), 1 / 0.9))
    out.sum().backward()
    torch.testing.assert_close(x.grad, out.detach())  # the gradient takes the same mask and scale
    torch.manual_seed(3)
    torch.testing.assert_close(dropout(x), out)  # same torch RNG state, same mask: resume replays it
    assert not torch.equal(dropout(x), out)  # and the next call draws a new one
    assert torch.equal(dropout.eval()(x), x)


@pytest.mark.parametrize("p", [0.001, 0.05, 0.5])
def test_dropout_keep_mask_has_the_full_32_bit_probability(p):
    # p = 0.001 is below 1/256: every dropped element comes from the lazily drawn lower 24 bits of a tie
    import numpy as np

    from finetune.train.cpu_ops import _keep_mask

    n, threshold = 4_000_000, round(p * 2**32)
    kept = _keep_mask(np.random.SFC64(7), n, threshold)
    expected = 1 - threshold / 2**32
    assert abs(kept.mean() - expected) < 5 * (expected * (1 - expected) / n) ** 0.5  # within 5 sigma
    assert np.array_equal(kept, _keep_mask(np.random.SFC64(7), n, threshold))  # a function of the seed


def test_lora_dropout_layers_are_swapped_with_the_same_p(torch_one_thread):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.model.builtin import resolve_model_path
    from finetune.train.cpu_ops import FastDropout, speed_up_lora_dropout

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.05, target_modules="all-linear"))
    assert speed_up_lora_dropout(model) > 0
    dropouts = [d for m in model.modules() if hasattr(m, "lora_dropout") for d in m.lora_dropout.values()]
    assert dropouts and all(type(d) is FastDropout and d.p == 0.05 for d in dropouts)


def test_fused_lora_forward_gives_pefts_output_and_gradients(torch_one_thread):
    torch = torch_one_thread
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from finetune.model.builtin import resolve_model_path
    from finetune.train.cpu_ops import speed_up_lora_linears

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero: make the update count
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    want, want_grads = loss_and_grads()
    assert speed_up_lora_linears(model) == 7 * model.config.num_hidden_layers  # q k v o gate up down per layer
    got, got_grads = loss_and_grads()
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    with model.disable_adapter():  # PEFT's own path: the base model alone
        base = model(input_ids=ids, labels=ids, use_cache=False).loss
    assert abs(base.item() - want.item()) > 1e-4


def test_grouped_order_is_a_function_of_seed_and_epoch():
    from finetune.train.sampling import EpochLengthGroupedSampler

    lengths = [(i * 37) % 500 + 1 for i in range(300)]
    sampler = EpochLengthGroupedSampler(lengths, 8, seed=5)
    first = list(sampler)
    assert sorted(first) == list(range(300)) and list(sampler) == first  # a second pass over epoch 0: the same
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first
    again = EpochLengthGroupedSampler(lengths, 8, seed=5)  # a resumed run's fresh sampler
    again.set_epoch(1)
    assert list(again) == second
    assert list(EpochLengthGroupedSampler(lengths, 8, seed=6)) != first


@pytest.mark.parametrize(
    "sections, key, words",
    [
        ({"training": {"kernels": "liger"}}, "training.kernels", "CUDA GPU"),
        ({"model": {"attn_implementation": "flash_attention_2"}}, "model.attn_implementation", "CUDA GPU"),
    ],
)
def test_gpu_kernels_are_refused_on_a_cpu_before_the_run_starts(sections, key, words, tmp_path):
    import yaml

    from tests.conftest import run_cli

    data = json.loads(json.dumps(BASE))
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    data["output"] = {"dir": str(tmp_path / "run")}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
    result = run_cli("train", str(tmp_path / "r.yaml"))
    assert result.returncode == 2, result.stderr
    assert key in result.stderr and words in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory was claimed


def test_liger_is_sft_only_and_the_memory_plan_counts_what_it_saves():
    from finetune.train.memory import estimate, read_shape
    from finetune.train.sft_options import sft_config_kwargs
    from tests.conftest import REPO

    with pytest.raises(UserError) as info:
        recipe(method={"kind": "dpo"}, training={"kernels": "liger"})
    assert any("training.kernels" in p for p in info.value.problems)
    liger = recipe(training={"kernels": "liger"})
    assert sft_config_kwargs(liger)["use_liger_kernel"] is True
    assert sft_config_kwargs(recipe())["use_liger_kernel"] is False
    shape = read_shape(REPO / "configs/models/llama-7b/config.json")

    def activations(r):
        return next(p.bytes for p in estimate(r, shape, device="cuda").parts if p.name == "activations")

    assert activations(liger) < 0.8 * activations(recipe())


STARTUP_PROBE = """
import sys
from finetune.recipe.load import recipe_from_dict
from finetune.train.startup import OPTIONAL_PACKAGES, skip_unused_packages
recipe = recipe_from_dict({recipe!r})
hidden = skip_unused_packages(recipe)
import peft, trl, accelerate  # what a training process imports; each would import the optional packages itself
from transformers import AutoModelForCausalLM, Trainer
print(",".join(sorted(hidden)))
print(",".join(sorted(n for n in OPTIONAL_PACKAGES if sys.modules.get(n) is not None)))
"""


@pytest.mark.parametrize("adapter, kept", [("lora", set()), ("qlora", {"bitsandbytes", "scipy"})])
def test_a_training_process_imports_only_the_optional_packages_its_recipe_uses(adapter, kept):
    # A fresh interpreter, as `finetune train` is: hidden packages must stay out even though accelerate, PEFT,
    # TRL and transformers import them when installed; the ones the recipe needs must stay importable.
    import os
    import subprocess
    import sys

    data = json.loads(json.dumps(BASE))
    data["adapter"]["kind"] = adapter
    out = subprocess.run([sys.executable, "-c", STARTUP_PROBE.format(recipe=data)], capture_output=True, text=True,
                         env={**os.environ, "FINETUNE_IMPORT_ALL": ""}, check=True)
    hidden, imported = (set(filter(None, line.split(","))) for line in out.stdout.splitlines()[-2:])
    assert hidden == {"deepspeed", "bitsandbytes", "wandb", "mlflow", "scipy"} - kept
    assert imported.isdisjoint(hidden)
    if kept:
        import importlib.util

        assert all(importlib.util.find_spec(name) is not None for name in kept)  # installed in this venv


def test_finetune_train_shapes_only_a_process_of_its_own(tmp_path):
    # As a command (console entry point) it hides the unused packages; the same Typer app called inside a longer
    # process (tests' invoke_cli) leaves that process as it was. The run directory already holds a run, so both
    # stop at the first check after that point, with exit 2.
    import subprocess
    import sys

    import yaml

    from tests.conftest import invoke_cli

    data = json.loads(json.dumps(BASE)) | {"output": {"dir": str(tmp_path / "runs" / "r")}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "recipe.yaml").write_text("name: earlier\n")
    code = ("import sys\nfrom finetune.cli import main\nfrom finetune.train.startup import OPTIONAL_PACKAGES\n"
            f"sys.argv = ['finetune', 'train', {str(path)!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    print(exc.code)\n"
            "print(','.join(n for n in OPTIONAL_PACKAGES if n in sys.modules and sys.modules[n] is None))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path).stdout.split()
    assert out[0] == "2" and set(out[1].split(",")) == {"deepspeed", "bitsandbytes", "wandb", "mlflow", "scipy"}
    before = {n: m for n, m in sys.modules.items() if m is None}
    assert invoke_cli("train", str(path)).returncode == 2
    assert {n: m for n, m in sys.modules.items() if m is None} == before


def test_only_a_cpu_training_process_of_its_own_keeps_freed_memory():
    # In a fresh process (the allocator setting lasts for the process): refused before the process is marked as
    # running one recipe, and for a GPU run; taken by glibc (mallopt returns 1 for each setting) for a CPU run.
    import subprocess
    import sys

    code = ("from finetune.train import startup\nprint(startup.keep_freed_memory('cpu'))\n"
            "startup._one_run = True\nprint(startup.keep_freed_memory('cuda'), startup.keep_freed_memory('cpu'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False", "True"]


EXPORTS_PROBE = """
from pathlib import Path
from finetune.train.startup import cache_transformers_exports
print(cache_transformers_exports())
import transformers
from transformers import AutoModelForCausalLM, LlamaForCausalLM  # resolved through the table
import transformers.utils.import_utils as utils
models = Path(transformers.__file__).parent / "models"
print(utils.define_import_structure(models, prefix="models") == utils.define_import_structure.__wrapped__(
    models, prefix="models"))
"""


def test_transformers_export_table_is_kept_and_read_back_equal(tmp_path):
    # Two fresh processes, as two `finetune train` runs: the first scans and keeps the table, the second reads it;
    # both see exactly the table a scan gives (__wrapped__ is transformers' own function).
    import os
    import subprocess
    import sys

    env = {**os.environ, "FINETUNE_CACHE": str(tmp_path)}
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", EXPORTS_PROBE], capture_output=True, text=True, env=env,
                             check=True).stdout.split()
        assert out == ["True", "True"]
    kept = list((tmp_path / "transformers-exports").iterdir())
    assert len(kept) >= 2  # transformers and transformers.models


def test_an_editable_or_unknown_transformers_is_scanned_every_time(tmp_path):
    from finetune.train.startup import _installation

    package = tmp_path / "transformers"
    package.mkdir()
    assert _installation(package) is None  # no dist-info beside it
    info = tmp_path / "transformers-9.9.9.dist-info"
    info.mkdir()
    (info / "RECORD").write_text("transformers/__init__.py,,\n")
    stamp = _installation(package)
    assert stamp and "9.9.9" in stamp
    (info / "RECORD").write_text("transformers/__init__.py,,\ntransformers/new.py,,\n")  # a reinstall rewrites it
    assert _installation(package) != stamp
    (info / "direct_url.json").write_text('{"url":"file:///src","dir_info":{"editable":true}}')
    assert _installation(package) is None
