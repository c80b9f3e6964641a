"""`difflab serve`: a generation server (FastAPI + uvicorn, `pip install 'difflab[serve]'`) with a web page, its own
JSON API and AUTOMATIC1111's /sdapi/v1/txt2img. Models are the run folders under one folder, offered by name; jobs
wait in a bounded queue and compatible ones are drawn in one denoiser call (`difflab.serve.jobs`).

    server = difflab.serve.build_server("runs", out_dir="outputs")
    app = difflab.serve.create_app(server)          # run it with uvicorn, or test it with FastAPI's TestClient
"""

from __future__ import annotations

import contextlib
import importlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from difflab.errors import DifflabError

INSTALL_SERVE = "pip install 'difflab[serve]'"


def require_serve_extra() -> None:
    """A one-line DifflabError naming the install when FastAPI or uvicorn is missing."""
    for module in ("fastapi", "uvicorn"):
        try:
            importlib.import_module(module)
        except ImportError:
            raise DifflabError(f"difflab serve needs `{INSTALL_SERVE}` (missing Python package '{module}')") from None


def build_server(models_dir: str | Path, *, out_dir: str | Path = "outputs", limits=None, token: str | None = None,
                 default_model: str | None = None, device: str = "cpu", batching: bool = True):  # fmt: skip
    """A Server: the models under `models_dir` loaded on `device`, a job queue writing PNGs under `out_dir`."""
    import torch

    from difflab.serve.app import Server
    from difflab.serve.jobs import JobQueue
    from difflab.serve.models import find_models
    from difflab.serve.requests import Limits

    models = find_models(models_dir, torch.device(device))
    if default_model is not None and default_model not in models:
        raise DifflabError(f"--default-model '{default_model}' is not among the models found: {', '.join(models)}")
    limits = limits or Limits()
    return Server(models, JobQueue(limits, Path(out_dir), batching=batching), limits, token, default_model)


def create_app(server):
    """The FastAPI application serving `server` (difflab.serve.app)."""
    from difflab.serve.app import create_app as create

    return create(server)


@contextlib.contextmanager
def running(server, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `server` with uvicorn in a background thread (port 0: a free one); yields its base URL. For notebooks,
    tests and benchmarks; `difflab serve` runs it in the foreground."""
    import socket

    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, port))
    config = uvicorn.Config(create_app(server), log_level="warning", timeout_graceful_shutdown=5)
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not web.started:
        if not thread.is_alive():
            raise DifflabError(f"the server did not start on {host}:{sock.getsockname()[1]}")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        web.should_exit = True
        thread.join(timeout=30)
        sock.close()
