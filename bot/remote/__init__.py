"""Generation on OpenAI-compatible servers (vLLM): the bot's `BOT_BACKEND=openai`.

It lives in bot/, not model/: it needs aiohttp, which the GPU box's model/ install (torch + transformers +
accelerate only) does not have, while every bot install has it (discord.py depends on it). It uses model/
for everything about the model itself: the prompt builder, the tokenizer, the stop ids and reply cleanup.
Reading order: replicas (health and choice of server), client (one HTTP request), generator (the
ReplyGenerator).
"""
