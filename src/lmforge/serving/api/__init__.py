"""The serving API: what the rest of lmforge (CLI, stages) uses of serving, and the HTTP server.

``serve.py`` is the public face (:func:`resolve_model_dir`, :func:`serve_model`,
:func:`parse_adapters`, :func:`load_serving_config`, :func:`api_key_from`, re-exported here); ``launch.py`` binds the
socket and runs the app of ``server.py``, whose request and response bodies are in ``protocol.py``;
``proxy.py`` is the front proxy a local deployment keeps on its stable port (its admin path and token header
are re-exported for the deploy stage).
"""

from lmforge.serving.api.proxy import PROXY_ADMIN_PATH, PROXY_TOKEN_HEADER
from lmforge.serving.api.serve import (
    api_key_from,
    load_serving_config,
    parse_adapters,
    read_release,
    resolve_model_dir,
    serve_model,
)

__all__ = ["PROXY_ADMIN_PATH", "PROXY_TOKEN_HEADER", "api_key_from", "load_serving_config", "parse_adapters",
           "read_release", "resolve_model_dir", "serve_model"]
