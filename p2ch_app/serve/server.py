"""Running the app under uvicorn: who may connect, and how it stops.

Binding beyond loopback exposes medical images to the network, so it needs a bearer token or an
explicit --no-auth. SIGTERM and the first Ctrl-C drain (uvicorn stops accepting, in-flight requests
and the batch finish, the lifespan gives the running job its grace); a second Ctrl-C exits at once
with 130, as the other commands do on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
from pathlib import Path

import uvicorn

from p2ch_app.errors import UserError

MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_token(host: str, token_file: Path | None, no_auth: bool) -> str | None:
    """The bearer token every route but /healthz and the page requires, or None for none."""
    if token_file is not None and no_auth:
        raise UserError("--token-file and --no-auth contradict each other; give one")
    if token_file is None:
        if not is_loopback(host) and not no_auth:
            raise UserError(f"--host {host} is reachable from other machines, and CT images must not leak; give "
                            "--token-file FILE (a bearer token) or, on a trusted network only, --no-auth")
        return None
    try:
        token = Path(token_file).read_text().strip()
    except OSError as err:
        raise UserError(f"cannot read --token-file {token_file} ({err.strerror}); give a readable file") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise UserError(f"--token-file {token_file} must hold one token of at least {MIN_TOKEN_CHARS} characters "
                        "without spaces; make one with: python -c 'import secrets; print(secrets.token_urlsafe())'")
    return token


class _Server(uvicorn.Server):
    """uvicorn's server, but a second Ctrl-C ends the process at once with exit code 130."""

    interrupts = 0

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts > 1:
                logging.getLogger("nodule_serve").warning("second Ctrl-C: exiting without draining")
                os._exit(130)
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        """uvicorn raises the signal again once it has shut down, which would end the process by that
        signal; a drained server has done what SIGTERM and Ctrl-C ask, so it exits 0 instead."""
        with super().capture_signals():
            yield
            getattr(self, "_captured_signals", []).clear()


def serve(app, host: str, port: int, grace_s: float) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain; returns when the app has shut down."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="info",
                            timeout_graceful_shutdown=max(1, int(grace_s) + 5), server_header=False)
    server = _Server(config)
    server.run()
    if not server.started:
        raise UserError(f"could not listen on {host}:{port} (in use, or not an address of this machine); "
                        "choose another --port or --host")
