"""`fromage serve`: an HTTP API over one `Fromage` pipeline (FastAPI; OpenAPI schema at /docs).

- `POST /v1/chat/completions`: the OpenAI chat format (content is a string or a list of `text`
  and `image_url` parts with base64 `data:` URLs). The answer's text is `message.content`, so
  OpenAI clients read it unchanged; retrieved images are listed in `message.images` (id,
  caption, score, URL under `/v1/images/{id}`). `stream: true` sends server-sent events.
- `POST /v1/retrieve`, `POST /v1/caption`, `GET /v1/images/{id}` (only images of the loaded
  index: no path from a request reaches the filesystem), `GET /health`, `GET /v1/models`.

Bad input gets a 4xx JSON error `{"error": {"message", "type"}}` naming the problem; the
limits are `ServeConfig` fields. The model is never asked for two forward passes at once:
every model call holds one lock, and concurrent `/v1/retrieve` and `/v1/caption` requests are
queued and run as one batch (up to `batch_size`, after waiting at most `batch_wait_ms` for
company).

Files: app.py (routes), schemas.py (request bodies and API errors), middleware.py (the request
body guard), images.py (image URLs), batching.py (micro-batches of retrieve/caption jobs).
"""

from ...config import ServeConfig
from .app import create_app, serve, server_config

__all__ = ["ServeConfig", "create_app", "serve", "server_config"]
