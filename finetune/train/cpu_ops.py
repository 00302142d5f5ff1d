"""Three CPU paths of a LoRA SFT step done by hand, because the libraries' own are slow there.

- LoRA dropout. PEFT gives every adapted layer an `nn.Dropout`, whose mask comes from torch's CPU
  `bernoulli_`: ~5 ns per element, ~10% of a step of a small model on one thread (28 masks per step for
  a 4-layer Llama with LoRA on all linear layers). `FastDropout` draws the same Bernoulli(1 - p) mask from
  numpy's SFC64 as 32-bit integers of which it reads ~8 bits per element (`_keep_mask`; ~1.1 ns per element
  with the scaling), seeded from torch's RNG so that runs stay reproducible and `--resume` (which restores
  torch's RNG state) replays them.
- The LoRA update of a linear layer. PEFT computes `base(x) + B(A(dropout(x))) * scaling`: the scaling
  multiplies and the sum adds over the layer's whole output, two more passes over [tokens, out] in the
  forward and one more in the backward, for every adapted layer (~7% of a packed step of the benchmark's
  model). `speed_up_lora_linears` folds both into the matmul with B (`addmm` with `alpha=scaling` adds
  onto the base output in place, in the same BLAS call). Same output and gradients to fp32 rounding.
- The LM head's cross-entropy over the trained positions. `fused_cross_entropy` computes the loss and its
  gradient with respect to the hidden states in one pass over vocabulary-wide tiles of rows that stay in
  cache, instead of materialising the logits, their log-softmax, a zero-filled gradient and its backward
  (what Liger's fused linear cross-entropy does with Triton on a GPU). Same loss and gradient to fp32
  rounding (tests/test_speed.py).
"""

from __future__ import annotations

import types

import numpy as np
import torch

TILE_FLOATS = 2 << 20  # fp32 logits per tile (8 MiB: 256 rows of an 8k vocabulary) stay in the CPU's caches


def _keep_mask(generator, n: int, threshold: int):
    """n booleans, each True with probability 1 - threshold / 2**32: a 32-bit draw >= threshold, drawn lazily.

    The top 8 bits of each draw (eight per 64-bit output) decide alone unless they equal the threshold's; only
    that 1 in 256 draws its lower 24 bits. Same distribution as comparing full 32-bit draws, ~8 bits per element.
    """
    high, low = divmod(threshold, 1 << 24)
    top = generator.random_raw((n + 7) // 8).view(np.uint8)[:n]
    keep = top > high
    tie = np.flatnonzero(top == high)
    if tie.size:
        keep[tie] = (generator.random_raw((tie.size + 1) // 2).view(np.uint32)[:tie.size] >> 8) >= low
    return keep


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))  # from torch's RNG: reproducible
        mask = _keep_mask(np.random.SFC64(seed), x.numel(), min(round(p * 2**32), 2**32 - 1)).astype(np.float32)
        mask *= np.float32(1.0 / (1.0 - p))  # 1/(1-p) where kept, 0 where dropped: nn.Dropout's scaling
        mask = torch.from_numpy(mask).view(x.shape)
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


def speed_up_lora_linears(model) -> int:
    """Give every plain PEFT LoRA linear layer (nn.Linear base) the fused forward; returns how many.

    Only for weights held whole on this device: ZeRO-3 and FSDP gather `lora_A`/`lora_B` in those modules' own
    forward, which the fused path does not call.
    """
    from peft.tuners.lora.layer import Linear

    swapped = 0
    for module in model.modules():
        if type(module) is Linear and type(module.get_base_layer()) is torch.nn.Linear:
            module.forward = types.MethodType(_fused_lora_forward, module)
            swapped += 1
    return swapped


def _fused_lora_forward(self, x, *args, **kwargs):
    """PEFT's LoRA Linear forward with the update added by `addmm`; PEFT's own for anything but one plain adapter."""
    names = self.active_adapters
    name = names[0] if len(names) == 1 else None
    if (args or kwargs or self.disable_adapters or self.merged or name not in self.lora_A
            or name in self.lora_variant or self.lora_B[name].bias is not None
            or self.lora_A[name]._forward_pre_hooks or self.lora_B[name]._forward_pre_hooks
            or x.dtype != self.lora_A[name].weight.dtype):
        return type(self).forward(self, x, *args, **kwargs)
    flat = x.reshape(-1, x.shape[-1])
    result = self.base_layer(flat)
    low = torch.nn.functional.linear(self.lora_dropout[name](flat), self.lora_A[name].weight)  # [tokens, r]
    # In place, on the base layer's own output (whose backward does not need it): an out-of-place addmm would copy
    # it first, and one on a view of it would make autograd copy its gradient.
    result.addmm_(low, self.lora_B[name].weight.t(), alpha=self.scaling[name])
    return result.view(*x.shape[:-1], result.shape[-1])


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
