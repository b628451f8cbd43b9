"""The fused decode step and prefill on CUDA: Triton kernels, and cuBLAS for larger products.

`fused_step` computes what model/fastgen/ops.py computes, in far fewer launches; read it first. Its kernels:
`step_kernels` (norms, attention, logits processors, sampler, cache copy), `products` with
`product_kernels` (the blocks' matrix products), `top_k_kernels` (ranking the logits). On a CPU the tests
run these kernels in Triton's interpreter (TRITON_INTERPRET=1).
"""
