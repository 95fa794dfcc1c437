"""``tuner dashboard``: optuna-dashboard on a study's storage and its artifact folder.

It serves optuna-dashboard's own WSGI app (``optuna_dashboard.wsgi``) from a threaded
server in this process, bound to 127.0.0.1 unless ``host=`` says otherwise; the dashboard
has no authentication, so any other address gets a warning. Ctrl-C ends it quietly.
"""

from __future__ import annotations

import errno
import socket
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import optuna_dashboard

from tuner import artifacts as artifact_files
from tuner import storage as storages
from tuner.config import StudyConfig
from tuner.errors import UserError
from tuner.text import printable

Print = Callable[[str], None]
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per request: the dashboard polls while a page loads its plots."""

    daemon_threads = True  # Ctrl-C does not wait for a browser's open connection


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access-log line per request: the dashboard polls every few seconds."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def url(host: str, port: int) -> str:
    """The address to open in a browser."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/dashboard"


def check_host(host: str) -> None:
    """An address to bind: an empty one would bind every address, as 0.0.0.0 does."""
    if not host.strip():
        raise UserError(
            f"host={host}: an empty host listens on every address (0.0.0.0), and the dashboard"
            " has no authentication; give an address to listen on: leave host= out for"
            " 127.0.0.1 (this machine only), or name the address."
        )


def check_port(port: int) -> None:
    """A port a server can listen on (0 picks a free one)."""
    if not 0 <= port <= 65535:
        raise UserError(f"port={port}: a port is a number from 1 to 65535 (0: any free one).")


def make(
    study: StudyConfig, host: str = "127.0.0.1", port: int = 8080, artifacts: str | None = None
) -> WSGIServer:
    """A dashboard server on the study's storage, bound and ready to ``serve_forever``.

    Every option is checked, and the address bound, before the storage is opened.
    """
    check_host(host)
    check_port(port)
    if artifacts is not None:
        _check_artifacts(artifacts)
    if not storages.exists(study.storage):
        raise UserError(
            f"No storage at {storages.mask(study.storage)}: run `python -m tuner run` first"
            " (or pass storage=...)."
        )
    server_class = _IPv6Server if ":" in host else _Server
    try:
        server = make_server(
            host, port, _not_ready, server_class=server_class, handler_class=_QuietHandler
        )
    except (OSError, UnicodeError) as exc:
        busy = isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE
        hint = "try another port=" if busy else "check host="
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UserError(f"Cannot listen on {host}:{port}: {reason} ({hint}).") from None
    try:
        storage = storages.open_storage(study.storage, read_only=True)  # may be read-only
        store = artifact_files.store(study.storage, artifacts)
    except BaseException:
        server.server_close()
        raise
    server.set_app(optuna_dashboard.wsgi(storage, artifact_store=store))
    return server


def _check_artifacts(artifacts: str) -> None:
    path = Path(artifacts)
    if not artifacts.strip():
        raise UserError(
            "artifacts=: give the artifact folder, e.g. artifacts=tuner_artifacts (the"
            " default: tuner_artifacts/ beside the SQLite file)."
        )
    if path.exists() and not path.is_dir():
        raise UserError(f"artifacts={artifacts} is a file; give the artifact folder.")
    if not path.is_dir():
        raise UserError(
            f"artifacts={artifacts}: no such folder (the default: tuner_artifacts/ beside the"
            " SQLite file)."
        )


def _not_ready(_environ: Any, start_response: Any) -> list[bytes]:
    start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
    return [b"starting"]


def serve(
    study: StudyConfig,
    host: str = "127.0.0.1",
    port: int = 8080,
    artifacts: str | None = None,
    out: Print = print,
) -> None:
    """Serve the dashboard until Ctrl-C; its lines escape control characters (a path with
    ESC in it)."""
    out = _escaped(out)
    server = make(study, host, port, artifacts)
    bound = int(server.server_address[1])
    if host not in LOCAL_HOSTS:
        print(
            f"tuner: warning: the dashboard has no authentication; anyone who can reach"
            f" {printable(host)}:{bound} can read and change these studies.",
            file=sys.stderr,
        )
    out(f"optuna-dashboard on {storages.mask(study.storage)}: {url(host, bound)}")
    folder = artifact_files.folder(study.storage, artifacts)
    have = "" if folder.is_dir() else " (none yet)"
    out(f"artifacts (best trials' weights): {folder.resolve()}{have}")
    out("Ctrl-C stops it.")
    sys.stdout.flush()  # the address shows at once where the output is a pipe
    try:
        with warnings.catch_warnings():
            # Importances of a few trials warn on each page load; the page says enough.
            warnings.simplefilter("ignore", UserWarning)
            server.serve_forever()
    except KeyboardInterrupt:
        out("")
    finally:
        server.server_close()


def _escaped(out: Print) -> Print:
    def say(line: str) -> None:
        out(printable(line))

    return say
