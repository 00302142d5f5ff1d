"""TRL's SFTTrainer with finetune's speed choices: how rows become batches and how the loss head runs.

Each choice is a recipe field whose effect `scripts/bench_train.py` measures on and off; none changes the
loss of a batch (tests/test_speed.py compares losses and gradients with TRL's own `compute_loss`):

- `training.batching`: `grouped` puts rows of similar length in the same micro-batch (transformers'
  `LengthGroupedSampler`), so batches carry little padding; `padding_free` concatenates the rows of a batch
  with no padding (the same batches as `padded`, and what flash_attention_2 runs fastest); `auto` takes
  padding_free with flash_attention_2 and grouped otherwise (SDPA and eager attend over the whole
  concatenation of a padding-free batch, which costs more than the padding it saves).
- `training.lm_head`: TRL 1.16 runs the LM head in vocabulary chunks so the logits are never materialised
  (`chunked`: least memory, the right choice on a GPU); on a CPU its tile loop and backward recomputation
  make it ~2x slower than the model's own logits and cross-entropy (`full_logits`). Both give the same loss.
- `training.token_metrics`: TRL also computes the entropy and top-1 accuracy of every trained token for its
  logs. Off, only the log-probabilities are computed (hand-written here because TRL has no switch for it).
"""

from __future__ import annotations

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler
from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from finetune.train.bookkeeping import RunBookkeeping, find_bookkeeping


class FastSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss skips what the recipe does not ask for, and which counts trained tokens.

    Logs `num_trained_tokens` (labels that carry loss) and `num_input_tokens` (every position, padding
    included) next to TRL's `num_tokens` (non-padding), all cumulative, so throughput can be read off
    metrics.jsonl. The counts live in the run's `RunBookkeeping`, which checkpoints carry, so they continue
    after a resume.
    """

    def __init__(self, *args, lm_head: str = "chunked", token_metrics: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.lm_head = lm_head
        self.token_metrics = token_metrics
        self.bookkeeping = find_bookkeeping(self.callback_handler.callbacks)
        if self.bookkeeping is None:  # a trainer built without finetune's callbacks
            self.bookkeeping = RunBookkeeping()
            self.add_callback(self.bookkeeping)
        if lm_head == "chunked" and not token_metrics:
            # Patch again over TRL's head, asking for log-probabilities only; the forward without
            # `fused_lm_head=True` still reaches the model's own.
            base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
            add_fused_lm_head(base, outputs=("log_probs",))

    def _lean_loss_applies(self, return_outputs: bool) -> bool:
        # Anything beyond plain token-level NLL keeps TRL's own path.
        args = self.args
        return not (
            self.token_metrics
            or return_outputs
            or self.compute_loss_func is not None
            or self.label_smoother is not None
            or args.loss_type != "nll"
            or self.aux_loss_enabled
            or getattr(self.accelerator, "parallelism_config", None) is not None
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.model.training:
            self._count_tokens(inputs)
        if not self._lean_loss_applies(return_outputs):
            # TRL counts num_tokens itself: carry the run's count through its counter
            self._total_train_tokens = self.bookkeeping.tokens["num_tokens"]
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self.model.training:
                self.bookkeeping.tokens["num_tokens"] = self._total_train_tokens
            return result
        inputs["use_cache"] = False
        if self.lm_head == "full_logits":
            # transformers' Trainer: the model's forward with labels computes the shifted cross-entropy,
            # normalised by num_items_in_batch and scaled across devices as TRL's path does.
            loss = Trainer.compute_loss(self, model, inputs, num_items_in_batch=num_items_in_batch)
        else:
            outputs = model(**inputs, fused_lm_head=True)
            count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.model.training:
            self._count_real_tokens(inputs)
        return loss

    def _count_tokens(self, inputs) -> None:
        counts = torch.stack([(inputs["labels"][..., 1:] != -100).sum(), torch.tensor(inputs["input_ids"].numel(),
                              device=inputs["input_ids"].device)])
        trained, total = self.accelerator.gather_for_metrics(counts.unsqueeze(0)).sum(0).tolist()
        self.bookkeeping.add_tokens(num_trained_tokens=trained, num_input_tokens=total)
        for key in ("num_trained_tokens", "num_input_tokens"):
            self._metrics["train"][key] = [self.bookkeeping.tokens[key]]

    def _count_real_tokens(self, inputs) -> None:
        # TRL's `num_tokens` (non-padding tokens), as its own compute_loss records it.
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        else:
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        self.bookkeeping.add_tokens(num_tokens=self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size)
        self._metrics["train"]["num_tokens"] = [self.bookkeeping.tokens["num_tokens"]]

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.args.train_sampling_strategy != "group_by_length" or dataset._indices is not None:
            return super()._get_train_sampler(train_dataset)
        # Row lengths straight from the Arrow column: transformers would read every row to count them.
        import pyarrow.compute as pc

        lengths = pc.list_value_length(dataset.data.column("input_ids")).to_pylist()
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps, lengths=lengths)
