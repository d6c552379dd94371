import signal
import subprocess
import sys

import pytest

from p2ch_app.errors import UserError
from p2ch_app.serve.client import Client, wait_until_up
from p2ch_app.serve.server import access_token, is_loopback
from tests.conftest import assert_one_line_error, run
from tests.serve.conftest import free_socket


def test_only_loopback_goes_without_a_token(tmp_path):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.org")
    assert access_token("127.0.0.1", None, False) is None
    assert access_token("0.0.0.0", None, True) is None
    with pytest.raises(UserError, match="give --token-file FILE"):
        access_token("0.0.0.0", None, False)
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(UserError, match="at least 16 characters"):
        access_token("0.0.0.0", short, False)
    good = tmp_path / "token"
    good.write_text("s3cr3t-token-of-some-length\n")
    assert access_token("0.0.0.0", good, False) == "s3cr3t-token-of-some-length"
    with pytest.raises(UserError, match="contradict"):
        access_token("0.0.0.0", good, True)


def test_the_command_refuses_an_exposed_host_in_one_line(tmp_path, model_files):
    from p2ch_app.cli import serve

    result = run(serve, ["--host", "0.0.0.0", "--seg-model", model_files["seg"], "--cls-model", model_files["cls"]])
    assert_one_line_error(result, "nodule-serve: error: --host 0.0.0.0 is reachable from other machines")
    result = run(serve, ["--runs-dir", tmp_path / "none"])
    assert_one_line_error(result, "no trained model under")


def test_the_token_guards_every_route_but_health_and_sigterm_drains(tmp_path, model_files):
    """The real command in its own process: the bearer token, one log line per request, SIGTERM exits 0."""
    token = tmp_path / "token"
    token.write_text("a-token-long-enough-for-the-check\n")
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    command = [sys.executable, "-m", "p2ch_app.cli", "nodule-serve", "--port", port, "--token-file", token,
               "--seg-model", model_files["seg"], "--cls-model", model_files["cls"], "--results-dir", tmp_path / "r"]
    process = subprocess.Popen([str(c) for c in command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, alive=lambda: process.poll() is None)  # /healthz needs no token
        status, answer = Client(url).json("GET", "/readyz")
        assert status == 401 and "bearer token" in answer["error"]
        assert Client(url, token="wrong-token-wrong-token").json("GET", "/metrics")[0] == 401
        assert Client(url, token="a-token-long-enough-for-the-check").json("GET", "/readyz")[0] == 200
        assert Client(url).request("GET", "/")[0] == 200  # the page holds no data; it asks for the token
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert '"GET /readyz" 401' in stderr and '"GET /readyz" 200' in stderr and "a-token-long" not in stderr
    assert "Traceback" not in stderr


def test_a_second_ctrl_c_exits_at_once_with_130(monkeypatch):
    import uvicorn

    from p2ch_app.serve import server as module

    exits = []
    monkeypatch.setattr(module.os, "_exit", exits.append)
    server = module._Server(uvicorn.Config(app=None))
    server.handle_exit(signal.SIGINT, None)
    assert server.should_exit and exits == []  # the first one drains
    server.handle_exit(signal.SIGINT, None)
    assert exits == [130]
