"""GPT-2's parameters as the batched decoder reads them: each block's tensors, shared with the Hugging
Face module (not copied), and the few copies the GPU paths want (ops.py has the math).

Shapes in comments: V = vocabulary, C = width.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

# Which matrix of a block: the order of LayerWeights.out_in.
QKV, PROJ, FC, OUT = range(4)

# Activations that are the tanh approximation of GELU; the CUDA-graph path runs them as one fused kernel.
TANH_GELUS = frozenset({"gelu_new", "gelu_pytorch_tanh", "gelu_fast"})
LM_HEAD_ROW_MULTIPLE = 64  # vocabulary padding of the GPU's LM-head copy (see GPT2Weights)


@dataclass(frozen=True)
class LayerWeights:
    """One block's parameters as plain tensors (Conv1D weights are [in, out], as addmm wants them)."""

    ln_1: tuple[torch.Tensor, torch.Tensor]
    attn_w: torch.Tensor
    attn_b: torch.Tensor
    proj_w: torch.Tensor
    proj_b: torch.Tensor
    ln_2: tuple[torch.Tensor, torch.Tensor]
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    out_w: torch.Tensor
    out_b: torch.Tensor
    # attn_w, proj_w, fc_w, out_w (index QKV, PROJ, FC, OUT) copied as [out, in], contiguous: the fused
    # step's Triton products read rows or tiles of them (triton/products.py). None: not made.
    out_in: tuple[torch.Tensor, ...] | None = None

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four matrices, [in, out], in QKV, PROJ, FC, OUT order (the order of out_in)."""
        return self.attn_w, self.proj_w, self.fc_w, self.out_w

    def biases(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The four matrices' biases, in the same order."""
        return self.attn_b, self.proj_b, self.fc_b, self.out_b


@dataclass(frozen=True)
class GPT2Weights:
    """The model's tensors (shared with the HF module, not copied) and the few numbers the math needs."""

    wte: torch.Tensor  # [V, C]
    wpe: torch.Tensor  # [n_positions, C]
    ln_f: tuple[torch.Tensor, torch.Tensor]
    lm_head: torch.Tensor  # [V, C]; the same tensor as wte when tied
    lm_head_t: torch.Tensor | None  # [C, V] contiguous copy on the CPU, where it makes the GEMV 3× faster
    # [V rounded up to 64, C] zero-padded copy on the GPU: with V = 50257 the logits' rows are not
    # 16-byte aligned and cuBLAS falls back to a slow kernel (212 µs instead of ~40 at 256 rows, H100).
    lm_head_padded: torch.Tensor | None
    layers: tuple[LayerWeights, ...]
    n_head: int
    eps: float
    attn_scale: float
    act: Callable[[torch.Tensor], torch.Tensor]
    is_tanh_gelu: bool  # the activation is GELU's tanh approximation (fused into a matmul epilogue)

    @property
    def width(self) -> int:
        return int(self.wte.shape[1])

    @property
    def head_dim(self) -> int:
        return self.width // self.n_head

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.shape[0])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """[..., C] hidden states → [..., V] logits in the model's dtype."""
        if self.lm_head_t is not None:
            return h @ self.lm_head_t
        if self.lm_head_padded is not None:
            return F.linear(h, self.lm_head_padded)[..., : self.vocab_size]
        return F.linear(h, self.lm_head)


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _padded_rows(weight: torch.Tensor, multiple: int) -> torch.Tensor | None:
    """`weight` with zero rows appended up to a multiple of `multiple` (None when already there)."""
    extra = -weight.shape[0] % multiple
    return None if extra == 0 else F.pad(weight, (0, 0, 0, extra))


def weights_from_hf(model: Any, fast_activation: bool, out_in_copies: bool = False) -> GPT2Weights:
    """The parameters of a GPT2LMHeadModel, shared (not copied; cuBLAS ran [in, out] Conv1D weights as
    fast as [out, in] copies on an H100); `fast_activation` swaps gelu_new for PyTorch's fused tanh GELU.
    `out_in_copies` adds LayerWeights.out_in, one more copy of the blocks' matrices (the fused step)."""
    config, body = model.config, model.transformer
    layers = tuple(
        LayerWeights(
            ln_1=(block.ln_1.weight, block.ln_1.bias),
            attn_w=block.attn.c_attn.weight,
            attn_b=block.attn.c_attn.bias,
            proj_w=block.attn.c_proj.weight,
            proj_b=block.attn.c_proj.bias,
            ln_2=(block.ln_2.weight, block.ln_2.bias),
            fc_w=block.mlp.c_fc.weight,
            fc_b=block.mlp.c_fc.bias,
            out_w=block.mlp.c_proj.weight,
            out_b=block.mlp.c_proj.bias,
        )
        for block in body.h
    )
    if out_in_copies:
        layers = tuple(
            replace(layer, out_in=tuple(w.detach().t().contiguous() for w in layer.matrices()))
            for layer in layers
        )
    act = body.h[0].mlp.act
    if fast_activation and config.activation_function in TANH_GELUS:
        act = _tanh_gelu  # one kernel instead of eight; equal up to float rounding
    head_dim = config.n_embd // config.n_head
    head = model.lm_head.weight.detach()
    return GPT2Weights(
        wte=body.wte.weight,
        wpe=body.wpe.weight,
        ln_f=(body.ln_f.weight, body.ln_f.bias),
        lm_head=head,
        lm_head_t=head.t().contiguous() if head.device.type == "cpu" else None,
        lm_head_padded=_padded_rows(head, LM_HEAD_ROW_MULTIPLE) if head.device.type == "cuda" else None,
        layers=layers,
        n_head=config.n_head,
        eps=config.layer_norm_epsilon,
        attn_scale=head_dim**-0.5 if config.scale_attn_weights else 1.0,  # as HF's GPT2Attention.scaling
        act=act,
        is_tanh_gelu=config.activation_function in TANH_GELUS,
    )
