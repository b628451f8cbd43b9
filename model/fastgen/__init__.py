"""The batched GPT-2 decoder: continuous batching over a preallocated KV cache, CUDA graphs on the GPU.

Imports nothing from model.serving or model.training: the worker drives it through model.engine's protocol.
Read in this order:
1. `engine` — BatchedGPT2Engine: slots, admission, prefill, steps, retirement (start here).
2. `weights` — GPT-2's parameters as the decoder reads them.
3. `ops` — the plain reference step: state buffers, prefill and one decode step in torch, operation by
   operation as Hugging Face computes it (the CPU path, and what the fused step must equal).
4. `sampling` — per-row repetition penalty, n-gram ban, top-k / top-p on the device.
5. `inputs` — a prefill's host side; `graphs` — capturing and replaying the CUDA graphs.
6. `triton/` — the fused step on CUDA that speeds `ops` up: `fused_step` first, then its kernels.
"""
