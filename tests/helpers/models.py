"""Tiny GPT-2 models from a config plus the real tokenizer (no hub, no downloads), ways to bend them, and
folders that only look like a saved model (for the registry)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

GPT2_TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "model" / "assets" / "gpt2-tokenizer"


def build_tiny_gpt2(
    out_dir: Path, n_layer: int = 2, n_embd: int = 64, seed: int = 0, n_positions: int = 1024
) -> Path:
    """Save a randomly initialised GPT-2 (real vocabulary) with the real tokenizer into out_dir."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=2, n_positions=n_positions, vocab_size=50257)
    GPT2LMHeadModel(config).save_pretrained(out_dir)  # safetensors by default
    GPT2TokenizerFast.from_pretrained(GPT2_TOKENIZER_DIR).save_pretrained(out_dir)
    return out_dir


def perturbed(model: Any, seed: int = 5) -> Any:
    """The model with noise on its biases and layer norms, in place: HF starts biases at 0 and norms at
    1, where a bias added twice or never, or a norm skipped, changes nothing."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                param.add_(0.1 * torch.randn(param.shape, generator=generator).to(param.device))
    return model


@torch.no_grad()
def force_next_token(model: Any, token_id: int) -> Any:
    """Make a GPT-2 predict `token_id` at every position, whatever the input."""
    # The final layer norm outputs its bias alone (weight 0), so every hidden state is e0 and the tied
    # output layer gives logit[j] = wte[j, 0]: 100 for the forced token, 0 for the rest.
    model.transformer.ln_f.weight.zero_()
    model.transformer.ln_f.bias.zero_()
    model.transformer.ln_f.bias[0] = 1.0
    model.transformer.wte.weight[:, 0] = 0.0
    model.transformer.wte.weight[token_id, 0] = 100.0
    return model


def fake_model_dir(path: Path, marker: str = "a") -> Path:
    """A directory that looks like a saved model (enough for the registry, which never loads weights)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "marker": marker}))
    (path / "model.safetensors").write_bytes(b"weights-" + marker.encode())
    (path / "training_card.json").write_text(json.dumps({"base_model": "starter", "marker": marker}))
    return path
