"""The OpenAI-compatible server of ``workbench serve``, over the runtime's ``AsyncLLMEngine``.

    serve("engine/", host="127.0.0.1", port=8000)                    # workbench serve engine/ --port 8000
    app = create_app(AsyncLLMEngine(LLMEngine(program, tokenizer)), model_name="smollm2")   # FastAPI

``app.py`` is the HTTP layer (routes, body limits, disconnects, shutdown), ``openai_api.py`` OpenAI's request
and response shapes over the engine (pydantic bodies and their limits, choices, server-sent events, error
bodies), ``access.py`` who may use it (API key, Host allow-list, JSON-only bodies, CORS), and ``metrics.py``
the Prometheus page of the metrics the runtime records (``runtime.metrics``). The runtime
imports nothing from here.
"""

from .access import Access
from .app import MAX_BODY_BYTES, create_app, serve
from .openai_api import ApiError

__all__ = ["Access", "ApiError", "MAX_BODY_BYTES", "create_app", "serve"]
