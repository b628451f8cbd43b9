"""The model worker: one thread owns the model and its engine; the event loop talks to it through a queue.

Read in this order: `worker` (the loop side: async API, bounded queue, shutdown), `worker_thread` (the
thread's loop: prompt builders → engine steps → replies, reloads, the OOM policy), `jobs` (the records passed
between them), `prompt_builders` (the threads that tokenize prompts), `readiness` (load → smoke test → swap)
and `engines` (which DecodeEngine serves a model).
"""
