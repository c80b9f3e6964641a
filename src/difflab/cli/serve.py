"""`difflab serve --models DIR`: the generation server and its page (difflab.serve). It binds to loopback unless told
otherwise; binding elsewhere needs --token-file (every API call then sends `Authorization: Bearer TOKEN`)."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
from pathlib import Path

from difflab.cli.common import add_runtime_arguments, setup_runtime
from difflab.errors import DifflabError, flag

GRACEFUL_SHUTDOWN_S = 10  # Ctrl-C: open requests and event streams get this long, then are closed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", required=True, metavar="DIR",
                   help="the folder holding the run folders to offer (each offered by its folder name)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to bind; other than loopback needs --token-file")
    p.add_argument("--port", type=int, default=7860, help="port (AUTOMATIC1111's)")
    p.add_argument("--token-file", metavar="F", help="a file holding the API token (clients send it as a bearer token)")
    p.add_argument("--default-model", metavar="NAME", help="the model of requests that name none (default: the first)")
    p.add_argument("--out", default="outputs", metavar="DIR", help="where the generated PNGs are written")
    limits = p.add_argument_group("limits")
    limits.add_argument("--max-n", type=int, default=16, help="images per request")
    limits.add_argument("--max-steps", type=int, default=200, help="sampling steps per request")
    limits.add_argument("--max-work", type=int, default=1600, help="images x steps per request")
    limits.add_argument("--max-queue", type=int, default=32, help="jobs waiting; more are refused with 429")
    limits.add_argument("--max-batch", type=int, default=16, help="images drawn together in one denoiser call")
    limits.add_argument("--no-batching", action="store_true", help="draw every request alone (for comparison)")
    add_runtime_arguments(p)


def read_token(path: str | None) -> str | None:
    """The token in --token-file (whitespace around it dropped); a missing or empty file is an error."""
    if path is None:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise DifflabError(f"cannot read --token-file '{path}' ({err.__class__.__name__}); pass a text file") from None
    if len(token) < 16:
        raise DifflabError(f"the token in '{path}' is {len(token)} characters; use at least 16 (e.g. `openssl rand "
                           "-hex 32 > token.txt`)")  # fmt: skip
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from difflab.serve import build_server, create_app, require_serve_extra
    from difflab.serve.requests import Limits

    require_serve_extra()
    token = read_token(args.token_file)
    if token is None and not is_loopback(args.host):
        raise DifflabError(f"binding to {args.host} (beyond this machine) needs --token-file F: clients must send its "
                           "token; or bind to 127.0.0.1")  # fmt: skip
    if not 0 <= args.port < 65536:
        raise DifflabError(f"--port must lie in 0..65535 (0: a free one), got {args.port}")
    limits = Limits(args.max_n, args.max_steps, args.max_work, args.max_queue, args.max_batch)
    for name, value in vars(limits).items():
        if value < 1:
            raise DifflabError(f"{flag(name)} must be at least 1, got {value}")
    sock = bind(args.host, args.port)  # before the models load: a busy port is said at once
    logging.basicConfig(format="difflab serve: %(message)s", level=logging.INFO)  # (models skipped, failed jobs)
    device = setup_runtime(args)
    server = build_server(args.models, out_dir=args.out, limits=limits, token=token, default_model=args.default_model,
                          device=str(device), batching=not args.no_batching)  # fmt: skip
    import uvicorn

    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    print(f"difflab serve: {', '.join(server.models)} at {url} (images to {args.out}; Ctrl-C stops)", flush=True)
    try:
        config = uvicorn.Config(create_app(server), log_level="warning", timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C is how a server stops: uvicorn has shut down gracefully and re-raised it
        print("difflab serve: stopped", flush=True)
    finally:
        server.queue.stop()
        sock.close()
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a one-line error (port in use, unknown address)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)  # connections wait from now on, while the models load
    except OSError as err:
        reason = err.strerror or err
        raise DifflabError(f"cannot listen on {host}:{port} ({reason}); pick another --port or --host") from None
    return sock
