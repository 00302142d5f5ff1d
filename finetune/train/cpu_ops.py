"""Two CPU paths of a LoRA SFT step done by hand, because the libraries' own are slow there.

- LoRA dropout. PEFT gives every adapted layer an `nn.Dropout`, whose mask comes from torch's CPU
  `bernoulli_`: ~5 ns per element, ~10% of a step of a small model on one thread (28 masks per step for
  a 4-layer Llama with LoRA on all linear layers). `FastDropout` draws the same Bernoulli(1 - p) mask from
  numpy's PCG64 (~1.5 ns per element), seeded from torch's RNG so that runs stay reproducible and `--resume`
  (which restores torch's RNG state) replays them.
- The LM head's cross-entropy over the trained positions. `fused_cross_entropy` computes the loss and its
  gradient with respect to the hidden states in one pass over vocabulary-wide tiles of rows that stay in
  cache, instead of materialising the logits, their log-softmax, a zero-filled gradient and its backward
  (what Liger's fused linear cross-entropy does with Triton on a GPU). Same loss and gradient to fp32
  rounding (tests/test_speed.py).
"""

from __future__ import annotations

import numpy as np
import torch

TILE_FLOATS = 2 << 20  # fp32 logits per tile (8 MiB: 256 rows of an 8k vocabulary) stay in the CPU's caches


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # from torch's RNG: reproducible
        draws = np.random.Generator(np.random.PCG64(seed)).random(x.numel(), dtype=np.float32)
        mask = torch.from_numpy(draws).view(x.shape)
        mask.ge_(p).mul_(1.0 / (1.0 - p))  # 1/(1-p) where kept, 0 where dropped: nn.Dropout's scaling
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class FastDropout(torch.nn.Dropout):
    """`nn.Dropout` for fp32 CPU tensors with a faster mask; any other tensor takes nn.Dropout's path."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu" or x.dtype != torch.float32:
            return super().forward(x)
        return _Dropout.apply(x, self.p)


def speed_up_lora_dropout(model) -> int:
    """Replace the `nn.Dropout` of every PEFT LoRA layer with FastDropout (same p); returns how many."""
    swapped = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, torch.nn.ModuleDict):
            continue
        for name, dropout in table.items():
            if type(dropout) is torch.nn.Dropout and dropout.p > 0:
                table[name] = FastDropout(dropout.p)
                swapped += 1
    return swapped


class _FusedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets):
        grad = torch.empty_like(hidden)
        loss = torch.zeros((), dtype=torch.float32)
        tile = max(16, TILE_FLOATS // weight.shape[0])
        for start in range(0, hidden.shape[0], tile):
            rows, wanted = hidden[start:start + tile], targets[start:start + tile]
            logits = torch.mm(rows, weight.t()).float()
            picked = logits.gather(1, wanted[:, None]).squeeze(1)
            top = logits.amax(-1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: one pass for the exponentials, reused below
            total = probs.sum(-1, keepdim=True)
            loss += (total.log() + top - picked[:, None]).sum()
            # d(sum of -log softmax[target]) / d logits = softmax - one_hot(target), built in place
            probs.div_(total)
            probs[torch.arange(len(wanted)), wanted] -= 1
            torch.mm(probs.to(weight.dtype), weight, out=grad[start:start + tile])
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return grad * upstream.to(grad.dtype), None, None


def fused_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `targets`, for a frozen `weight` (no gradient to it).

    Args:
        hidden: [tokens, hidden] final hidden states of the positions that carry loss.
        weight: [vocabulary, hidden] LM head weight (no bias).
        targets: [tokens] next-token ids.
    """
    return _FusedCrossEntropy.apply(hidden, weight, targets)
