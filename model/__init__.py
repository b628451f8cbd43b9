"""GPT-2 tokenizer, prompt, generation, worker and training. Never imports discord."""
