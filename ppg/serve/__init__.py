"""The trained policy over HTTP, OpenAI-compatible (``ppg serve``).

``app`` is the Ray Serve deployment (one replica: a vLLM engine behind FastAPI) and ``engine_loop``
drives its engine step by step; ``schemas`` and ``errors`` are the request/response contract,
``requests`` turns a request into the engine's job, ``responses`` turns the engine's deltas into
OpenAI objects and stream chunks; ``service`` starts and stops the app, ``cli`` is the command.
"""
