"""Preference recipes and data that cannot work are refused by the CLI (exit 2) before any model loads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml

from finetune.errors import UserError
from finetune.recipe import recipe_from_dict
from tests.conftest import invoke_cli

PAIRS = "builtin:sample_preference.jsonl"


def recipe(**sections) -> dict:
    base = {
        "name": "check",
        "model": {"path": "builtin:tiny-llama"},
        "data": {"train": [{"path": PAIRS, "format": "preference"}]},
        "method": {"kind": "dpo"},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16},
        "training": {"max_steps": 2},
    }
    return {**base, **sections}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


CHAT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
PAIR_ROW = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}


def fake_run(tmp_path: Path, name: str, *, adapter: dict, merged: bool = False) -> Path:
    """A finished run directory as `finetune train` leaves it (resolved recipe, adapter or model files)."""
    run = tmp_path / name
    data = recipe(name=name, method={"kind": "sft"}, adapter=adapter,
                  data={"train": [{"path": "builtin:sample_chat.jsonl"}]})
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe_from_dict(data).model_dump(mode="json")))
    out = run / ("model" if adapter["kind"] == "full" else "adapter")
    out.mkdir()
    (out / ("config.json" if adapter["kind"] == "full" else "adapter_config.json")).write_text("{}")
    if merged:
        (run / "merged").mkdir()
        (run / "merged" / "config.json").write_text("{}")
    return run


def cases(tmp: Path) -> dict[str, tuple[dict, str]]:
    sft_data = write_jsonl(tmp / "chat.jsonl", [CHAT_ROW] * 3)
    no_chosen = write_jsonl(tmp / "no_chosen.jsonl", [PAIR_ROW, {"prompt": "Q: 1+1?", "rejected": " 3"}])
    same = write_jsonl(tmp / "same.jsonl", [{"prompt": "Q", "chosen": " A", "rejected": " A"}])
    bad_label = write_jsonl(tmp / "label.jsonl", [{"prompt": "Q", "completion": " A", "label": "yes"}])
    lora = {"kind": "lora", "r": 8, "alpha": 16}
    sft_run = fake_run(tmp, "sft-run", adapter=lora)
    full_run = fake_run(tmp, "full-run", adapter={"kind": "full"})
    unpaired = {"train": [{"path": "builtin:sample_unpaired_preference.jsonl", "format": "unpaired_preference"}]}
    table = [
        ("dpo_on_sft_format", recipe(data={"train": [{"path": "builtin:sample_chat.jsonl"}]}),
         "data.train[0].format: is 'messages', but method.kind is 'dpo', which trains on preference rows"),
        ("dpo_on_sft_rows", recipe(data={"train": [{"path": str(sft_data), "format": "preference"}]}),
         f"{sft_data}:1: missing 'prompt', 'chosen', 'rejected' (this is a 'messages' row, SFT data"),
        ("missing_chosen", recipe(data={"train": [{"path": str(no_chosen), "format": "preference"}]}),
         f"{no_chosen}:2: missing 'chosen'"),
        ("identical_pair", recipe(data={"train": [{"path": str(same), "format": "preference"}]}),
         "'chosen' and 'rejected' are identical"),
        ("packing", recipe(method={"kind": "dpo", "packing": True}),
         "method.packing: unknown key; it is a setting of kind sft, not of kind 'dpo'"),
        ("beta_zero", recipe(method={"kind": "dpo", "beta": 0}), "method.beta: expected greater than 0; found 0"),
        ("beta_negative", recipe(method={"kind": "dpo", "beta": -0.5}), "method.beta: expected greater than 0"),
        ("orpo_beta_zero", recipe(method={"kind": "orpo", "beta": 0}), "method.beta: expected greater than 0"),
        ("kto_beta_negative", recipe(method={"kind": "kto", "beta": -1}, data=unpaired),
         "method.beta: expected greater than 0"),
        ("smoothing_unused", recipe(method={"kind": "dpo", "label_smoothing": 0.1}),
         "method.label_smoothing: is 0.1, but loss_type ['sigmoid'] does not use it"),
        ("smoothing_range", recipe(method={"kind": "dpo", "loss_type": "robust", "label_smoothing": 0.5}),
         "method.label_smoothing: expected less than 0.5"),
        ("exo_without_smoothing", recipe(method={"kind": "dpo", "loss_type": "exo_pair"}),
         "method.label_smoothing: must be > 0 for loss_type exo_pair"),
        ("unknown_loss", recipe(method={"kind": "dpo", "loss_type": "simpo"}), "method.loss_type: expected"),
        ("sft_alone", recipe(method={"kind": "dpo", "loss_type": ["sft"]}), "'sft' alone is supervised fine-tuning"),
        ("weights_mismatch", recipe(method={"kind": "dpo", "loss_type": ["sigmoid", "sft"], "loss_weights": [1]}),
         "method.loss_weights: has 1 weights for 2 loss(es)"),
        ("kto_batch_of_one", recipe(method={"kind": "kto"}, data=unpaired, training={"micro_batch_size": 1}),
         "training.micro_batch_size: must be at least 2 for KTO"),
        ("kto_on_sft_format", recipe(method={"kind": "kto"}, data={"train": [{"path": "builtin:sample_chat.jsonl"}]}),
         "method.kind is 'kto', which trains on unpaired_preference or preference rows"),
        ("unpaired_for_dpo", recipe(data=unpaired), "is 'unpaired_preference', but method.kind is 'dpo'"),
        ("label_not_bool",
         recipe(method={"kind": "kto"}, data={"train": [{"path": str(bad_label), "format": "unpaired_preference"}]}),
         "'label' must be true (desirable) or false (undesirable), found 'yes'"),
        ("start_from_without_run", recipe(model={"path": str(tmp / "nowhere"), "start_from": "adapter"}),
         "model.start_from: is 'adapter', so model.path must be the directory of an earlier `finetune train` run"),
        ("continue_with_other_rank", recipe(model={"path": str(sft_run)}, adapter={**lora, "r": 16}),
         "adapter.r: 16 here, 8 in"),
        ("continue_adapter_full", recipe(model={"path": str(sft_run)}, adapter={"kind": "full"}),
         "adapter.kind: is 'full', but model.path"),
        ("merged_missing", recipe(model={"path": str(sft_run), "start_from": "merged"}),
         "merged holds no finished merge; run `finetune merge"),
        ("adapter_dir_as_model", recipe(model={"path": str(sft_run / "adapter")}),
         f"model.path: {sft_run / 'adapter'} is an adapter, not a model; point model.path at its run directory"),
        ("full_run_has_no_adapter", recipe(model={"path": str(full_run), "start_from": "adapter"}),
         "trained the full model (adapter.kind: full): it has no adapter"),
        ("revision_with_run", recipe(model={"path": str(sft_run), "revision": "main"}),
         "model.revision: "),
    ]
    return {name: (data, message) for name, data, message in table}


CASES = [
    "dpo_on_sft_format", "dpo_on_sft_rows", "missing_chosen", "identical_pair", "packing", "beta_zero",
    "beta_negative", "orpo_beta_zero", "kto_beta_negative", "smoothing_unused", "smoothing_range",
    "exo_without_smoothing", "unknown_loss", "sft_alone", "weights_mismatch", "kto_batch_of_one",
    "kto_on_sft_format", "unpaired_for_dpo", "label_not_bool", "start_from_without_run",
    "continue_with_other_rank", "continue_adapter_full", "merged_missing", "adapter_dir_as_model",
    "full_run_has_no_adapter", "revision_with_run",
]  # fmt: skip


@pytest.fixture(scope="module")
def all_cases(tmp_path_factory):
    return cases(tmp_path_factory.mktemp("cases"))


def test_every_case_is_run(all_cases):
    assert sorted(all_cases) == sorted(CASES)


@pytest.mark.parametrize("name", CASES)
def test_cli_refuses_before_any_model_loads(name, all_cases, tmp_path):
    data, message = all_cases[name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**data, "output": {"dir": str(tmp_path / "run")}}))
    result = invoke_cli("train", str(path))
    assert result.returncode == 2, (name, result.stderr)
    assert message in result.stderr, (name, result.stderr)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists(), f"{name}: the run directory was created before the check"
    assert "loading" not in result.stderr  # the model never started loading


def test_unpaired_and_pair_shapes():
    from finetune.data.pairs import check_preference_row

    assert check_preference_row(PAIR_ROW, "preference") is None
    assert check_preference_row({"prompt": "Q", "completion": " A", "label": False}, "unpaired_preference") is None
    chat = {"prompt": [{"role": "user", "content": "Q"}], "completion": [{"role": "assistant", "content": "A"}],
            "label": True}
    assert check_preference_row(chat, "unpaired_preference") is None
    assert "must all be strings or all be lists" in check_preference_row({**chat, "prompt": "Q"},
                                                                          "unpaired_preference")
    assert "no assistant turn" in check_preference_row(
        {**chat, "completion": [{"role": "user", "content": "A"}]}, "unpaired_preference")
    assert "use format: unpaired_preference" in check_preference_row(chat, "preference")
    assert "use format: preference" in check_preference_row(PAIR_ROW, "unpaired_preference")


def test_kto_unpairs_pairs_without_neighbours_from_the_same_prompt():
    from finetune.data.pairs import unpair
    from finetune.data.sources import Row

    rows = [Row({"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}, f"f:{i}") for i in range(6)]
    out = unpair(rows)
    assert [r["label"] for r in out] == [True, False] * 6
    assert sorted(r["completion"] for r in out) == sorted(f"{kind} {i}" for kind in ("good", "bad") for i in range(6))
    assert all(a["prompt"] != b["prompt"] for a, b in zip(out, out[1:], strict=False))


def test_mixed_conversational_and_plain_rows_are_refused(tmp_path):
    from finetune.data.pairs import build_preference_split
    from finetune.recipe.schema import DatasetSpec

    plain = write_jsonl(tmp_path / "plain.jsonl", [PAIR_ROW])
    specs = [DatasetSpec(path=PAIRS, format="preference", max_rows=2),
             DatasetSpec(path=str(plain), format="preference")]
    with pytest.raises(UserError, match="mixes conversational rows") as info:
        build_preference_split(specs, "data.train", "dpo")
    assert any(f"{plain}:1" in p for p in info.value.problems)


def test_progress_line_shows_reward_accuracy_and_margin():
    from transformers import TrainerState

    from finetune.train.progress import ProgressDisplay

    stream = io.StringIO()
    display = ProgressDisplay(stream=stream)
    state = TrainerState()
    state.global_step, state.max_steps = 4, 10
    logs = {"loss": 0.61, "learning_rate": 1e-3, "num_tokens": 100.0, "rewards/accuracies": 0.875,
            "rewards/margins": 0.21, "rewards/chosen": -0.15, "rewards/rejected": -0.36}
    display.on_log(None, state, None, logs=logs)
    display.on_log(None, state, None, logs={"eval_loss": 0.5, "eval_rewards/accuracies": 1.0,
                                            "eval_rewards/margins": 2.0})
    lines = stream.getvalue().splitlines()
    assert "loss 0.6100  acc 0.88  margin +0.21 (chosen -0.15, rejected -0.36)" in lines[0]
    assert "eval_loss 0.5000  eval acc 1.00  margin +2.00" in lines[1]


def test_data_preview_covers_orpo_pairs_and_refuses_unpaired_kto_rows(tmp_path, monkeypatch):
    from tests.conftest import REPO

    monkeypatch.chdir(tmp_path)
    orpo = invoke_cli("data", "preview", str(REPO / "recipes/tiny/orpo_lora.yaml"), "-n", "1")
    assert orpo.returncode == 0 and "Traceback" not in orpo.stderr, orpo.stderr[-2000:]
    assert "[[" in orpo.stdout  # the trained answer is marked
    kto = invoke_cli("data", "preview", str(REPO / "recipes/tiny/kto_lora.yaml"), "-n", "1",
                     "--set", "model.path=builtin:tiny-llama")
    assert kto.returncode == 2 and "Traceback" not in kto.stderr
    assert "data.train[0]: format unpaired_preference (KTO rows) is not covered" in kto.stderr
