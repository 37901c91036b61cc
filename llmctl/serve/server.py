"""Run the app under uvicorn with the scheduler's thread beside it, and drain on SIGTERM.

    serve(loaded, ServeOptions(model_id="sft:v0001", port=8000), log=print)

The listening socket is bound here, before uvicorn starts, so a taken port is an error with a
message (not uvicorn's exit 1), and `--port 0` reports the port the system chose. On SIGTERM (or the
first Ctrl-C) the app answers 503 to new requests, uvicorn stops accepting connections and waits up
to `drain_timeout` seconds for running requests to finish, then the scheduler stops; SIGTERM then
exits 0 (a requested stop), Ctrl-C 130 (interrupted) as everywhere in llmctl.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmctl.errors import InputError
from llmctl.model.scheduler import Scheduler
from llmctl.serve.app import ServeState, build_app


@dataclass(frozen=True)
class ServeOptions:
    model_id: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_rows: int = 32
    kv_tokens: int | None = None
    prefill_chunk: int = 512
    prefix_cache: bool = True
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    drain_timeout: float = 30.0


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InputError(
            f"cannot listen on {host}:{port}: {e.strerror}", hint="choose another --port (0: any free port)"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(loaded: Any, options: ServeOptions, log: Callable[[str], None]) -> None:
    """Serve `loaded` (llmctl.inference.LoadedModel) until SIGTERM or Ctrl-C."""
    import uvicorn

    scheduler = Scheduler(
        loaded.engine,
        max_rows=options.max_rows,
        kv_tokens=options.kv_tokens,
        prefill_chunk=options.prefill_chunk,
        prefix_entries=8 if options.prefix_cache else 0,
    )
    state = ServeState(
        loaded,
        scheduler,
        model_id=options.model_id,
        api_key=options.api_key,
        max_queue=options.max_queue,
        max_body_bytes=options.max_body_bytes,
    )

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            state.draining = True  # new requests get 503 while running ones finish
            super().handle_exit(sig, frame)

    sock = bind(options.host, options.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        build_app(state),
        log_level="warning",
        timeout_graceful_shutdown=max(1, round(options.drain_timeout)),
        lifespan="off",
        access_log=False,
    )
    server = DrainingServer(config)
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    log(f"serving {options.model_id} on {url} (OpenAI API under /v1; /health, /metrics)")
    scheduler.start()
    # uvicorn re-raises the signal it caught once it has drained; SIGTERM is a requested stop here.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        scheduler.stop()
        sock.close()
    log("stopped")
