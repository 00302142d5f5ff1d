"""TRL's SFTTrainer with finetune's speed choices: how rows become batches and how the loss head runs.

Each choice is a recipe field whose effect `scripts/bench_train.py` measures on and off; none changes the
loss of a batch (tests/test_speed.py compares losses and gradients with TRL's own `compute_loss`):

- `training.batching`: `padding_free` concatenates the rows of a micro-batch with no padding, and attention
  runs per row (flash-attention's varlen kernel, or finetune.train.attention for sdpa), so a step costs
  its real tokens only; `grouped` puts rows of similar length in the same micro-batch, in an order that
  `--resume` replays (finetune.train.sampling); `padded` is TRL's default. `auto` takes padding_free
  with sdpa and flash_attention_2, grouped with eager and flex attention.
- `training.lm_head`: TRL 1.16 runs the LM head in vocabulary chunks so the logits are never materialised
  (`chunked`: least memory, the right choice on a GPU); on a CPU its tile loop scores every position and
  recomputes in the backward, ~2x slower than `full_logits`: the model's own LM head, run only on the
  positions whose next token is trained (`logits_to_keep`; prompts and system turns need no logits),
  and cross-entropy. Both give the same loss.
- `training.token_metrics`: TRL also computes the entropy and top-1 accuracy of every trained token for its
  logs. Off, only the log-probabilities are computed (hand-written here because TRL has no switch for it).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from transformers import Trainer
from trl import SFTTrainer
from trl.trainer.utils import add_fused_lm_head

from finetune.train.bookkeeping import RunBookkeeping, find_bookkeeping
from finetune.train.cpu_ops import fused_cross_entropy, speed_up_lora_dropout, speed_up_lora_linears
from finetune.train.sampling import EpochLengthGroupedSampler


def _zero_stage(trainer) -> int | None:
    """The DeepSpeed ZeRO stage the trainer's accelerator runs, or None without DeepSpeed."""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return None
    plugin = trainer.accelerator.state.deepspeed_plugin
    return getattr(plugin, "zero_stage", None)


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
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        if lm_head == "chunked" and not token_metrics:
            # Patch again over TRL's head, asking for log-probabilities only; the forward without
            # `fused_lm_head=True` still reaches the model's own.
            add_fused_lm_head(base, outputs=("log_probs",))
        # A tensor `logits_to_keep` picks sequence positions for the LM head (transformers' causal LMs); a model
        # without it, or one that scales or caps its logits, computes its own loss over all of them.
        text = base.config.get_text_config()
        self._keeps_positions = "logits_to_keep" in inspect.signature(base.forward).parameters and not any(
            getattr(text, key, None) for key in ("final_logit_softcapping", "logit_scale", "logits_scaling"))
        cpu = self.args.device.type == "cpu"
        # ZeRO-3 and FSDP shard weights, gathering them only inside each module's own forward (partitioned in
        # train()): the fused paths below, which read weights directly, are for weights held whole.
        sharded = getattr(self, "is_fsdp_enabled", False) or _zero_stage(self) == 3
        if cpu:
            speed_up_lora_dropout(self.model)
            if not sharded:
                speed_up_lora_linears(self.model)
        # The fused CPU head computes no gradient for the head's weight: only for a frozen, bias-free head.
        head = base.get_output_embeddings()
        self._fused_head = head if cpu and not sharded and type(head) is torch.nn.Linear and head.bias is None \
            and not head.weight.requires_grad else None

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
            or not self.model_accepts_loss_kwargs  # the Trainer would then rescale for gradient accumulation
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
        if self.lm_head == "full_logits" and self._keeps_positions and inputs["input_ids"].shape[0] == 1:
            loss = self._scaled(self._trained_positions_loss(model, inputs, num_items_in_batch, self._fused_head),
                                num_items_in_batch)
        elif self.lm_head == "full_logits":
            # transformers' Trainer: the model's forward with labels computes the shifted cross-entropy,
            # normalised by num_items_in_batch and scaled across devices as TRL's path does.
            loss = Trainer.compute_loss(self, model, inputs, num_items_in_batch=num_items_in_batch)
        else:
            outputs = model(**inputs, fused_lm_head=True)
            count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = self._scaled(-outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1), num_items_in_batch)
        if self.model.training:
            self._count_real_tokens(inputs)
        return loss

    @staticmethod
    def _trained_positions_loss(model, inputs, num_items_in_batch, fused_head=None):
        """The model's cross-entropy, with the LM head run only where the next token is trained.

        A padding-free batch is one row, so its trained positions are one index list for `logits_to_keep`.
        Untrained positions (prompts, system turns, each sequence's last token) add nothing to the loss or its
        gradient; skipping them saves their share of the LM head, which is ~40% of a small model's compute.
        With `fused_head` (the model's frozen LM head, on a CPU) the forward stops at the hidden states and
        finetune.train.cpu_ops computes head and loss together.
        """
        labels = inputs.pop("labels")[0, 1:]  # the token each position predicts
        keep = (labels != -100).nonzero().squeeze(1)
        if fused_head is None:
            logits = model(**inputs, logits_to_keep=keep).logits[0]
            loss = torch.nn.functional.cross_entropy(logits.float(), labels[keep], reduction="sum")
        else:
            with _returning_input(fused_head):
                hidden = model(**inputs, logits_to_keep=keep).logits[0]
            loss = fused_cross_entropy(hidden, fused_head.weight, labels[keep])
        return loss / (num_items_in_batch if num_items_in_batch is not None else keep.numel() or 1)

    def _scaled(self, loss, num_items_in_batch):
        # As transformers' Trainer.compute_loss: a loss over the global token count is summed across processes.
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            scale = self.accelerator.num_processes // self.get_tp_size()
            loss = loss * (scale if self.args.n_gpu <= 1 else self.args.n_gpu)
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
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochLengthGroupedSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                         seed)


@contextmanager
def _returning_input(module):
    """Make `module` hand back its input for the duration: the model's forward then returns hidden states."""
    module.forward = _identity  # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del module.forward


def _identity(x):
    return x
