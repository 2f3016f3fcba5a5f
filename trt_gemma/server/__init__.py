"""The OpenAI-compatible HTTP server: ``trt-gemma serve`` (commands.py) builds ``app.create_app``.

Modules: protocol (pydantic bodies), errors (OpenAI error shapes), engine_client (the runtime
adapter and admission control), serving (shared request plumbing), completions / chat (the two
endpoints), sse (streaming), metrics (Prometheus), app (routes and middleware).
"""
