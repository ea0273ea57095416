"""OpenAI-compatible serving (`trimode serve`, docs/serving.md). Needs the `serve` extra (fastapi, uvicorn).

engine.py   one worker thread owns the model and a decoder per config; continuous batching; the auto policy
app.py      FastAPI routes, SSE, limits, errors in the OpenAI shape
schemas.py  the wire format and its strict validation
text.py     detokenized text deltas and stop strings
metrics.py  Prometheus text format
cli.py      `trimode serve` flags, serving.json
fake.py     a model-free stand-in for the decoder API (tests, HTTP-layer load tests)
"""
