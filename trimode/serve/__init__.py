"""OpenAI-compatible serving (`trimode serve`): engine.py (worker thread, continuous batching, mode policy),
app.py (FastAPI routes, SSE), schemas.py (wire format, validation), metrics.py (Prometheus text), text.py
(stop strings on detokenized text), cli.py (flags). Needs the `serve` extra (fastapi, uvicorn)."""
