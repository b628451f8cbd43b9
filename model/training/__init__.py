"""Training data and training: the export format, the open corpora, `chatbot train` / `eval`, the registry.

Read in this order: `dataset` (the export format, hash split, atomic writer, packing into blocks),
`export_dir` (how an export directory is replaced atomically), `corpus` (the open corpora as exports),
`train` (the Trainer entry point), `checkpoints` (which one a resume continues from), `evaluate` (held-out
perplexity and reply metrics) and `registry` (model versions, current / previous, promote and rollback).
"""
