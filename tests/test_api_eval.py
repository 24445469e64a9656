"""The OpenAI-compatible evaluation backend against a local stub server: the request's shape,
the key read from the environment at call time and never written anywhere, retries, resuming."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from hcm.api_eval import ApiClient, ApiError, answer_all, to_openai

SECRET = "sk-test-do-not-store-0123456789"


class StubEndpoint:
    """A chat-completions server on 127.0.0.1 that answers "A" (or fails the first `fail` calls
    with HTTP 429), recording each request's body and Authorization header."""

    def __init__(self, reply: str = "<think>looked</think><answer>A</answer>", fail: int = 0):
        self.requests: list[dict] = []
        self.reply, self.fail = reply, fail
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # http.server's name for the POST handler
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(
                    {"path": self.path, "auth": self.headers.get("Authorization"), "body": body}
                )
                if stub.fail > 0:
                    stub.fail -= 1
                    self.send_error(429, "slow down")
                    return
                reply = {"choices": [{"message": {"role": "assistant", "content": stub.reply}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def chat(color=(255, 0, 0)) -> list[dict]:
    image = Image.new("RGB", (8, 8), color)
    content = [{"type": "text", "text": "Original image:"}, {"type": "image", "image": image}]
    return [{"role": "user", "content": content}]


def test_messages_become_openai_parts_with_png_data_urls():
    message = to_openai(chat()[0])
    assert [p["type"] for p in message["content"]] == ["text", "image_url"]
    url = message["content"][1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (8, 8) and decoded.getpixel((0, 0)) == (255, 0, 0)


def test_key_is_read_from_the_environment_at_call_time(monkeypatch):
    with StubEndpoint() as stub:
        client = ApiClient(model="m", base_url=stub.url, key_env="HCM_TEST_KEY", max_tokens=7)
        monkeypatch.delenv("HCM_TEST_KEY", raising=False)
        with pytest.raises(ApiError, match="HCM_TEST_KEY"):
            client.complete(chat())
        monkeypatch.setenv("HCM_TEST_KEY", SECRET)
        assert client.complete(chat()) == "<think>looked</think><answer>A</answer>"
        monkeypatch.setenv("HCM_TEST_KEY", SECRET + "-rotated")
        client.complete(chat())
    assert [r["auth"] for r in stub.requests] == [f"Bearer {SECRET}", f"Bearer {SECRET}-rotated"]
    body = stub.requests[0]["body"]
    assert stub.requests[0]["path"] == "/v1/chat/completions"
    assert body["model"] == "m" and body["max_tokens"] == 7 and body["temperature"] == 0.0
    assert SECRET not in repr(client)


def test_no_key_env_sends_no_authorization():
    with StubEndpoint(reply="B") as stub:
        assert ApiClient(model="m", base_url=stub.url, key_env=None).complete(chat()) == "B"
    assert stub.requests[0]["auth"] is None


def test_rate_limits_are_retried_then_fail_for_good():
    with StubEndpoint(fail=2) as stub:
        client = ApiClient(model="m", base_url=stub.url, key_env=None, retry_backoff_s=0.01)
        assert client.complete(chat()) != ""
        assert len(stub.requests) == 3
        stub.fail = 10
        impatient = ApiClient(
            model="m", base_url=stub.url, key_env=None, max_retries=1, retry_backoff_s=0.01
        )
        with pytest.raises(ApiError, match="HTTP 429"):
            impatient.complete(chat())


def test_answers_are_saved_as_they_come_and_a_rerun_asks_only_the_rest(tmp_path: Path):
    path = tmp_path / "responses.jsonl"
    with StubEndpoint(reply="C") as stub:
        client = ApiClient(model="m", base_url=stub.url, key_env=None)
        first = answer_all(client, ["q0"], [chat()], path, 2)
        stub.reply = "D"
        again = answer_all(client, ["q0", "q1"], [chat(), chat()], path, 2)
        other = answer_all(client, ["q0"], [chat(color=(0, 0, 255))], path, 2)  # a new request
    assert first == ["C"] and again == ["C", "D"] and other == ["D"]
    assert len(stub.requests) == 3
    assert [json.loads(line)["id"] for line in path.read_text().splitlines()] == ["q0", "q1", "q0"]


@pytest.mark.slow
def test_eval_py_scores_an_api_model_and_stores_no_key(compose_cfg, monkeypatch, tmp_path):
    """evaluate() through the api backend on the tiny synthetic benchmark: the stub answers "A"
    to every question, so the score is the share of questions where A is acceptable."""
    from hcm.evaluate import evaluate

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with StubEndpoint(reply="A") as stub:
        monkeypatch.setenv("OPENAI_BASE_URL", stub.url)
        cfg = compose_cfg(
            "eval",
            ["experiment=api_gpt4o", "data=synthetic_tiny", "prompt=direct", "data.limit_eval=6"],
        )
        results = evaluate(cfg)
    out = Path(cfg.paths.output_dir)
    answers = [json.loads(line)["answer"] for line in (Path(cfg.data.root) / "test.jsonl").open()]
    expected = 100.0 * sum("A" in a for a in answers[:6]) / 6
    assert results["test/score/overall"] == pytest.approx(expected)
    assert len(stub.requests) == 6 and stub.requests[0]["body"]["model"] == "gpt-4o"
    parts = stub.requests[0]["body"]["messages"][0]["content"]
    assert sum(p["type"] == "image_url" for p in parts) == 2  # original + the A-D grid
    assert json.loads((out / "metrics.json").read_text())["metrics"] == results
    rows = [json.loads(line) for line in (out / "predictions.jsonl").open()]
    assert [r["completion"] for r in rows] == ["A"] * 6
    assert [r["correct"] for r in rows] == ["A" in a for a in answers[:6]]
    assert (out / "gallery.html").read_text().count('<article class="row"') == 6
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text(errors="ignore"), f


def test_a_torn_last_response_line_is_dropped_and_trimmed(tmp_path):
    from hcm.api_eval import _read_responses

    path = tmp_path / "responses.jsonl"
    good = json.dumps({"id": "a", "request": "r1", "response": "B"})
    path.write_text(good + "\n" + '{"id": "b", "requ')  # killed mid-append
    assert _read_responses(path) == {("a", "r1"): "B"}
    assert path.read_text() == good + "\n"  # the next append starts on a fresh line
    path.write_text('{"torn\n' + good + "\n")
    with pytest.raises(ValueError, match=":1: not a JSON line"):
        _read_responses(path)
