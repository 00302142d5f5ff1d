"""The baseline of scripts/bench_train.py: a plain TRL `SFTTrainer` script doing the same work as `finetune train`.

It is what a user writes from TRL's documentation: load the model and tokenizer, hand the `messages` dataset to
`SFTTrainer` with `assistant_only_loss=True` (the chat template has `{% generation %}` markers, so TRL trains the
same tokens as finetune: each assistant reply and its `<|im_end|>`), LoRA on all linear layers, TRL's defaults for
everything else. Only two things are added, for measurement: a callback that writes every log record with a
timestamp to `<out>/metrics.jsonl`, and a counter of trained and input tokens wrapped around `compute_loss`.

Usage (bench_train.py runs it): python scripts/bench_trl_baseline.py --model DIR --data FILE --out DIR
    [--batch 8] [--max-length 512] [--steps 40] [--lr 1e-4] [--lora-r 16] [--lora-alpha 32] [--lora-dropout 0.05]
    [--checkpointing default|on|off] [--packing]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpointing", choices=["default", "on", "off"], default="default",
        help="Activation checkpointing; 'default' keeps TRL's default (on).",
    )
    parser.add_argument("--packing", action="store_true", help="TRL's packing (its default strategy, bfd).")
    args = parser.parse_args()

    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    # The dtype finetune's `model.dtype: auto` picks, so both load the same weights the same way.
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")

    extra = {} if args.checkpointing == "default" else {"gradient_checkpointing": args.checkpointing == "on"}
    config = SFTConfig(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        assistant_only_loss=True,
        use_cpu=not cuda,
        bf16=bf16,
        seed=args.seed,
        disable_tqdm=True,
        packing=args.packing,
        **extra,
    )
    counted = {"num_trained_tokens": 0, "num_input_tokens": 0}

    class StepLog(TrainerCallback):
        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                record = {"step": state.global_step, "time": time.time(), "cpu_seconds": time.process_time(),
                          **logs, **counted}
                with (out / "metrics.jsonl").open("a") as handle:
                    handle.write(json.dumps(record) + "\n")

    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
            target_modules="all-linear", task_type="CAUSAL_LM",
        ),
        callbacks=[StepLog()],
    )
    compute_loss = trainer.compute_loss

    def counting_compute_loss(model, inputs, *a, **kw):
        if model.training:
            counted["num_trained_tokens"] += int((inputs["labels"][..., 1:] != -100).sum())
            counted["num_input_tokens"] += inputs["input_ids"].numel()
        return compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = counting_compute_loss
    trainer.train()
    summary = {"peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}
    (out / "summary.json").write_text(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
