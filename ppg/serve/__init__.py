"""The trained policy over HTTP, OpenAI-compatible (``ppg serve``).

``app`` is the Ray Serve deployment (one replica: a vLLM engine behind FastAPI), ``schemas`` and
``errors`` its request/response contract, ``service`` starts and stops it, ``cli`` is the command.
"""
