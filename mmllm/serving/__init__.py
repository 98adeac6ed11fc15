"""Serving a model to people and programs.

The OpenAI-compatible HTTP API: `create_app` (app.py), its request and response schema and
limits (schema.py), media in and out of requests (media.py), the batching worker that owns
the model (worker.py) and `mmllm serve` (command.py). The terminal chat: its session
(session.py) and `mmllm chat` (chat.py). Both read the reply's modality from the user's words
with intent.py. FastAPI is imported only by the HTTP modules.
"""
