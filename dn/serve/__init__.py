"""`dn serve`: the OpenAI API over one model loaded once (any format and budget generate takes), on loopback unless
--host says otherwise. docs/serve.md has the endpoints, the flags and what each failure answers."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import sys
from pathlib import Path

from dn import cli
from dn.core.errors import DnError
from dn.generate import add_generation_args, check_cache_args
from dn.model.sources import default_gguf
from dn.runtime import budget, loader, pipeline, residency
from dn.serve import app as http
from dn.serve.engine import Engine

try:  # the serve extra, as dn.serve.app's Starlette
    import uvicorn
except ImportError:
    uvicorn = None


def size(text: str) -> int:
    """A byte size (256MiB, 1GB, 1000000) or 0."""
    if text.strip() == "0":
        return 0
    try:
        return budget.parse_size(text, "size")
    except DnError:
        raise argparse.ArgumentTypeError(f"expected a size like 256MiB, 1GB or 0, got {text!r}") from None


def port(text: str) -> int:
    value = cli.non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {text!r}")
    return value


def setup_arg_parser():
    p = cli.ArgumentParser(prog="dn serve", description="Serve a model over the OpenAI API (chat and text "
                           "completions, streamed or not). Request fields left out take these flags' values.")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback is reachable by others (a warning says so)")
    g.add_argument("--port", type=port, default=8080, help="0: a free port, printed at the start")
    g.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (default: none)")
    g.add_argument("--max-active", type=cli.positive_int, default=None,
                   help="requests decoded at once, in turns of one token each (not batched) (default: 4; 1 under "
                        "--pipeline, whose ranks keep one KV cache)")
    g.add_argument("--max-queue", type=cli.non_negative_int, default=64,
                   help="requests waiting beyond --max-active; more are refused with 429 and Retry-After")
    g.add_argument("--prompt-cache-bytes", type=size, default=None,
                   help="bytes of KV cache kept from finished requests for prompts that extend them (0: off) "
                        "(default: 256MiB; off under --pipeline)")
    g.add_argument("--shutdown-timeout", type=cli.non_negative_float, default=10.0,
                   help="seconds in-flight requests get to finish after SIGTERM before they are cancelled")
    add_generation_args(p)
    pipeline.add_args(p)
    return p


class _Uvicorn(uvicorn.Server if uvicorn else object):
    """uvicorn's server that tells the engine when SIGTERM (or Ctrl-C) starts the shutdown."""

    def __init__(self, config, on_exit):
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig, frame):
        self.on_exit()
        super().handle_exit(sig, frame)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# what serve says on stderr: the local pipeline launcher shows these lines of rank 0's (dn.runtime.launch)
SAID = ("dn serve", "INFO:", "WARNING:", "ERROR:")


def _settle(args) -> list[str]:
    """--max-active and --prompt-cache-bytes as they will be, and the lines saying why where that is not as asked.
    Under --pipeline the other ranks keep one KV cache each, made anew when rank 0 makes one: one request at a
    time, each over a cache of its own (dn.runtime.pipeline)."""
    notes = []
    if args.pipeline is not None:
        if args.max_active not in (None, 1) or args.prompt_cache_bytes:
            raise DnError("--pipeline decodes one request at a time over a fresh cache: --max-active above 1 and "
                          "--prompt-cache-bytes are for one process")
        args.max_active, args.prompt_cache_bytes = 1, 0
        notes.append("dn serve: --pipeline: one request at a time (--max-active 1), no prompt-cache reuse")
    if args.max_active is None:
        args.max_active = 4
    if args.prompt_cache_bytes is None:
        args.prompt_cache_bytes = 256 * 2**20
    if not _loopback(args.host):
        notes.append(f"dn serve: warning: listening on {args.host}, reachable from other machines: " +
                     ("requests need the API key, sent unencrypted (no TLS)" if args.api_key else
                      "there is no authentication (anyone who reaches it can use the model; --api-key adds a key)"))
    if args.max_resident is not None and args.residency_mode == "per-sequence" and args.max_active > 1:
        # the prompt picks each layer's neurons for the whole model: requests in turns would use each other's
        notes.append("dn serve: --residency-mode per-sequence decodes one request at a time (--max-active 1)")
        args.max_active = 1
    return notes


def _main(argv) -> int:
    args = setup_arg_parser().parse_args(argv)
    if uvicorn is None or http.Starlette is None:
        raise DnError("dn serve needs starlette and uvicorn: pip install 'dreamnova[serve]'")
    check_cache_args(args)
    notes = _settle(args)
    if args.pipeline is not None:  # launch the ranks, or be one: rank 0 serves (dn.runtime.pipeline)
        return pipeline.run(args, argv, "serve", lambda run: serve(run, args, notes), shown=SAID)
    sock = _listen(args.host, args.port, notes)
    return serve(loader.load(args.model, args.backend, args.dtype, dense=args.dense, **residency.load_args(args)),
                 args, sock=sock)


def _listen(host: str, port: int, notes: list[str]) -> socket.socket:
    for note in notes:
        print(note, file=sys.stderr, flush=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=256)
    except OSError as e:
        raise DnError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(run, args, notes: list[str] = (), sock: socket.socket | None = None) -> int:
    """Serve a loaded model (run.backend may be a pipeline's) until SIGTERM or Ctrl-C."""
    sock = sock or _listen(args.host, args.port, notes)
    model_id = args.model or Path(default_gguf()).stem
    names = {model_id, run.model_dir.name, str(run.model_dir)} | ({"default"} if args.model is None else set())
    engine = Engine(run, args.max_active, args.max_queue, args.prompt_cache_bytes, args.max_kv_size, args.kv_bits)
    server = http.Server(engine, model_id, names, args, args.api_key, args.shutdown_timeout)
    # uvicorn's own grace is a backstop: the engine ends what still runs at --shutdown-timeout, each stream with
    # an error event, so uvicorn need not cancel a response half sent
    config = uvicorn.Config(server.app(), log_level="info" if args.verbose else "warning", access_log=args.verbose,
                            timeout_graceful_shutdown=args.shutdown_timeout + 2, lifespan="on")
    host, port = sock.getsockname()[:2]
    print(f"dn serve: {model_id} ({run.backend.NAME} {run.backend.device_name()} {run.dtype}) on "
          f"http://{host}:{port}/v1", file=sys.stderr, flush=True)
    # uvicorn turns SIGTERM into a graceful shutdown and raises it again once done: a handler that ignores that
    # second one lets dn exit 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    _Uvicorn(config, lambda: engine.drain(args.shutdown_timeout)).run(sockets=[sock])
    if engine.thread.is_alive():  # a step that outlived --shutdown-timeout (a long prefill): do not wait for it
        print("dn serve: a generation step was still running; exiting without it", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(0)
    print("dn serve: stopped", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return cli.run(_main, argv)

