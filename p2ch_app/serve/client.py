"""A small nodule-serve client on the standard library alone: for notebooks, scripts, the tests and the bench.

It speaks the book's chapter-15 protocol (a multipart form: `meta`, the JSON shape, and `blob`, the
crop's float32 bytes) and the /analyze jobs, over one keep-alive connection per client.
"""

from __future__ import annotations

import http.client
import json
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body and its content type: text fields, and files as (file name, bytes)."""
    boundary = secrets.token_hex(16)
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, data) in files.items():
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class Client:
    """One keep-alive connection to a nodule-serve at url (e.g. http://127.0.0.1:8000)."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        parts = urlsplit(url)
        self.host, self.port, self.timeout = parts.hostname, parts.port or 80, timeout
        self.headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        self._connection: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | Iterable[bytes] | None = None,
                headers: dict | None = None) -> tuple[int, dict, bytes]:
        """(status, headers, body); a body that is an iterable of bytes goes chunked. Reconnects once when
        the server closed the kept-alive connection."""
        for attempt in (0, 1):
            if self._connection is None:
                self._connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self._connection.request(method, path, body, {**self.headers, **(headers or {})},
                                         encode_chunked=body is not None and not isinstance(body, bytes))
                response = self._connection.getresponse()
                return response.status, dict(response.getheaders()), response.read()
            except (ConnectionError, http.client.BadStatusLine):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
        status, _, data = self.request(method, path, body, headers)
        return status, json.loads(data)

    def predict(self, crop: np.ndarray) -> tuple[int, dict]:
        """The book's request: meta {"shape": ...} and blob, the crop's float32 bytes, both as form files."""
        crop = np.ascontiguousarray(crop, dtype="<f4")
        body, content_type = multipart({}, {"meta": ("meta.json", json.dumps({"shape": list(crop.shape)}).encode()),
                                            "blob": ("blob", crop.tobytes())})
        return self.json("POST", "/predict", body, {"Content-Type": content_type})

    def submit(self, path: Path, options: dict | None = None) -> tuple[int, dict]:
        """POST /analyze with a CT file and nodule-analyze's options as fields."""
        fields = {name: str(value).lower() for name, value in (options or {}).items()}
        body, content_type = multipart(fields, {"file": (Path(path).name, Path(path).read_bytes())})
        return self.json("POST", "/analyze", body, {"Content-Type": content_type})

    def wait(self, job_id: str, timeout: float = 600.0, poll_s: float = 0.2) -> dict:
        """The job's status once it is done or failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, job = self.json("GET", f"/jobs/{job_id}")
            if status != 200:
                raise RuntimeError(f"GET /jobs/{job_id}: {status} {job.get('error')}")
            if job["state"] in ("done", "failed"):
                return job
            time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} still not finished after {timeout} s")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def wait_until_up(url: str, timeout: float = 120.0, alive=lambda: True) -> None:
    """Until GET /healthz answers 200 (open even with a token); alive() false stops the wait early,
    for a server process that died while starting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        try:
            if Client(url, timeout=2).json("GET", "/healthz")[0] == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"nodule-serve at {url} did not come up" + ("" if alive() else " (its process ended)"))


def free_port() -> int:
    """A loopback port no one listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(port: int, args: list[str]):
    """nodule-serve ARGS on 127.0.0.1:port in a process of its own, up and answering (for the bench and
    make gpu-check, which time the server as a user runs it)."""
    command = [sys.executable, "-m", "p2ch_app.cli", "nodule-serve", "--port", str(port), *args]
    log = tempfile.TemporaryFile("w+")  # a pipe would fill up with the request log and stall the server
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, text=True)
    process.log = log
    try:
        wait_until_up(f"http://127.0.0.1:{port}", alive=lambda: process.poll() is None)
    except RuntimeError as err:
        process.kill()
        process.wait()
        log.seek(0)
        raise RuntimeError(f"{err}: {log.read()[-500:]}") from None
    return process


def stop(process) -> float:
    """SIGTERM a launched server; returns its peak resident memory in GiB, read just before."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM")))
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    process.log.close()
    return peak_kib / 2**20


def predict_load(url: str, crop: np.ndarray, clients: int, seconds: float) -> dict:
    """`clients` threads, each sending the book's request back to back for `seconds`: requests/s and the
    latency percentiles of the answered (200) requests; refusals (503) counted apart."""
    latencies, refused = [], []
    stop_at = time.perf_counter() + seconds

    def client():
        connection = Client(url)
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            status, _ = connection.predict(crop)
            (latencies if status == 200 else refused).append(time.perf_counter() - start)
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests_per_s": len(latencies) / elapsed, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "refused_503": len(refused)}
