"""The CPU engine on CTranslate2: a served Hugging Face GPT-2 converted once, then decoded in int8 or float32.

Most self-hosters have no GPU; there CTranslate2 (OpenNMT's C++ inference library) decodes the same model
with less CPU per token than the torch engines. Reading order:
- `convert.py`: the conversion of the loaded model, cached under the data directory by a hash of its
  weights, written atomically (a temporary sibling directory, fsynced, then renamed);
- `engine.py`: `CT2Engine`, a `model.engine.DecodeEngine` on `ctranslate2.Generator`;
- `scoring.py`: held-out log-likelihood through `Generator.score_batch` (`chatbot eval --engine ct2`).
`ctranslate2` is an optional dependency (the `cpu` extra): it is imported inside functions only, so
`model/` still imports with torch and transformers alone. model.serving.engines decides when it serves.
"""
