"""`griffinlm serve`: an OpenAI-compatible HTTP server with continuous batching over state slots.

Needs the `serve` extra (FastAPI, uvicorn, prometheus-client)."""
