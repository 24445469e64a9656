"""API keys stay in the environment, and W&B offline or disabled sends nothing.

An evaluation of an "API model" (hcm/api_eval.py) runs through eval.py against a stub
OpenAI-compatible server on 127.0.0.1, with a sentinel key in the environment and W&B offline.
The key must reach the server, and appear in no file the run wrote (Hydra's .hydra/ dumps and
job log, W&B's offline run, responses, results) nor in its output. In-process, the same
evaluation with every non-loopback connection and name lookup refused: W&B offline makes an
offline run and attempts no connection; W&B disabled makes no run at all.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hcm.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
SENTINEL = "sk-SENTINEL-7f3a9c-do-not-leak"
ANSWER = "The candidates with defects: <answer>A</answer>"


@pytest.fixture
def stub_server():
    """An OpenAI-compatible /chat/completions on 127.0.0.1; yields (base_url, seen headers)."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(self.headers.get("Authorization", ""))
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": ANSWER}}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def api_overrides(base_url: str) -> list[str]:
    return [
        "experiment=api_base",
        "data=synthetic_tiny",
        "model.name_or_path=stub-vlm",
        f"model.api.base_url={base_url}",
        "model.api.key_env=HCM_TEST_API_KEY",
        "model.api.max_retries=0",
        "logger=wandb",
    ]


def files_holding(root: Path, needle: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
def test_api_key_reaches_the_server_and_no_file(tmp_path, hcm_root, stub_server):
    base_url, seen = stub_server
    run, home = tmp_path / "run", tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HCM_TEST_API_KEY": SENTINEL,
        "WANDB_MODE": "offline",
        "HOME": str(home),  # W&B's and others' per-user files land here, to be searched too
        "TMPDIR": str(home),
    }
    args = [sys.executable, str(REPO / "eval.py"), *api_overrides(base_url), f"hydra.run.dir={run}"]
    r = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    assert len(seen) == 16 and set(seen) == {f"Bearer {SENTINEL}"}  # the key was in use
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in written}
    assert {"config.yaml", "hydra.yaml", "overrides.yaml", "metrics.json"} <= names
    assert any(p.suffix == ".wandb" for p in written)  # the offline W&B run
    assert json.loads((run / "metrics.json").read_text())["metrics"]["test/score/count"] == 16
    leaks = files_holding(tmp_path, SENTINEL.encode()) + files_holding(hcm_root, SENTINEL.encode())
    assert not leaks
    assert SENTINEL not in r.stdout + r.stderr
    assert "HCM_TEST_API_KEY" in (run / ".hydra" / "config.yaml").read_text()  # the name only


@pytest.fixture
def no_network(monkeypatch):
    """Refuse (and record) every connection and name lookup that is not loopback."""
    attempts: list[str] = []
    local = ("127.0.0.1", "::1", "localhost")
    connect, lookup = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in local:
            attempts.append(f"connect {address}")
            raise OSError(f"test: no network ({address})")
        return connect(self, address)

    def guarded_lookup(host, *args, **kwargs):
        if host not in local and host is not None:
            attempts.append(f"lookup {host}")
            raise socket.gaierror(f"test: no network ({host})")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_lookup)
    with pytest.raises(OSError):  # the guard is in place
        socket.create_connection(("example.com", 443), timeout=1)
    assert attempts == ["lookup example.com"]
    attempts.clear()
    return attempts


@pytest.mark.slow
def test_wandb_offline_makes_a_local_run_and_attempts_no_connection(
    compose_cfg, monkeypatch, stub_server, no_network
):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("HCM_TEST_API_KEY", SENTINEL)
    modes = []
    finish = wandb.finish

    def record_then_finish(*args, **kwargs):
        modes.append(wandb.run.settings.mode)
        return finish(*args, **kwargs)

    monkeypatch.setattr(wandb, "finish", record_then_finish)
    cfg = compose_cfg("eval", api_overrides(stub_server[0]))
    results = evaluate(cfg)
    assert results["test/score/count"] == 16
    assert len(modes) == 1 and modes[0] in ("offline", "dryrun")  # Lightning sets "dryrun"
    runs = list((Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1
    assert not no_network, no_network


@pytest.mark.slow
def test_wandb_disabled_makes_no_run(compose_cfg, monkeypatch, stub_server, no_network):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HCM_TEST_API_KEY", SENTINEL)
    cfg = compose_cfg("eval", api_overrides(stub_server[0]))
    assert evaluate(cfg)["test/score/count"] == 16
    assert not (Path(cfg.paths.output_dir) / "wandb").exists()
    assert os.environ["WANDB_MODE"] == "disabled"  # not rewritten to an offline run
    assert not no_network, no_network
