"""GPT-2 tokenizer, prompt, generation, worker and training. Never imports discord, aiosqlite or bot.

Read in this order:
1. `api` — the backend-neutral interface the bot talks to (ReplyRequest → Reply, ReplyGenerator).
2. `sampling`, `prompt`, `encoding` — sampling settings, the dialogue format with its exact token budget,
   and the tokenizer calls that build prompts and decode replies.
3. `loading` — resolving and checking a model directory or hub id, then loading it.
4. `engine` (the DecodeEngine protocol), `hf_engine` (the reference engine on `generate`) and `replies`
   (what ends a reply and how it is cleaned, shared by every engine).
5. `serving/` — the worker: one thread owns the model; the event loop talks to it through a queue.
6. `fastgen/` — the batched GPT-2 decoder the worker uses for GPT-2 models (KV cache, CUDA graphs, Triton);
   `ct2/` — the CPU engine on CTranslate2 (an optional package), with its conversion cache.
7. `training/` — the export format, open corpora, `chatbot train` / `eval` and the model registry.
"""
