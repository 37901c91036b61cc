"""`llmctl serve`: an OpenAI-compatible HTTP server over the engine's continuous-batching scheduler
(app.py: endpoints and errors; protocol.py: request bodies; metrics.py: /metrics; server.py: uvicorn,
draining on SIGTERM; vllm.py: handing a model folder to vLLM's server on a GPU)."""
