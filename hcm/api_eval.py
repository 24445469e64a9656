"""Evaluation through an OpenAI-compatible chat endpoint: Table 3's API models (GPT-4o,
Qwen-VL-Max/Plus) and open models served that way (e.g. `vllm serve Qwen/Qwen2.5-VL-72B-Instruct`).

Each test question goes to `<base_url>/chat/completions` as the same chat the local models see,
its images inline as base64 `data:` URLs, greedy (temperature 0). The responses are scored with
the datamodule's metric, so the numbers are comparable with `eval.py`'s.

The key is read from the environment variable named by `model.api.key_env` at the moment of each
request, and is never stored: not in the config (which holds only the variable's name), not in
logs, responses or results. `key_env: null` sends no key (a local server).

Responses are appended to `<output_dir>/responses.jsonl` as they arrive, and a rerun sends only
the questions not answered yet: a long paid run that stopped resumes where it was.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from hcm.files import atomic_write_text

log = logging.getLogger(__name__)

RETRY_STATUS = (408, 409, 429, 500, 502, 503, 504)  # worth another try after a pause


class ApiError(RuntimeError):
    """A request that failed for good (after its retries), without the key in the message."""


@dataclass(frozen=True)
class ApiClient:
    """POSTs chat completions; `key_env` names the variable holding the key (read per call)."""

    model: str
    base_url: str
    key_env: str | None = "HCM_API_KEY"
    timeout_s: float = 120.0
    max_retries: int = 4
    retry_backoff_s: float = 2.0
    max_tokens: int = 256
    image_format: str = "PNG"
    extra_body: dict | None = None

    def _key(self) -> str | None:
        if self.key_env is None:
            return None
        key = os.environ.get(self.key_env)
        if not key:
            raise ApiError(f"set the API key in the environment variable {self.key_env}")
        return key

    def body(self, messages: Sequence[dict]) -> dict:
        return {
            "model": self.model,
            "messages": [to_openai(m, self.image_format) for m in messages],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            **(self.extra_body or {}),
        }

    def complete(self, messages: Sequence[dict]) -> str:
        """The assistant's text for one chat, retrying rate limits and server errors."""
        return self.send(json.dumps(self.body(messages)).encode())

    def send(self, data: bytes) -> str:
        """POST one request body; the reply's text."""
        url = self.base_url.rstrip("/") + "/chat/completions"
        for attempt in range(self.max_retries + 1):
            headers = {"Content-Type": "application/json"}
            key = self._key()
            if key is not None:
                headers["Authorization"] = f"Bearer {key}"
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    reply = json.loads(response.read())
                return reply["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:
                retry, reason = e.code in RETRY_STATUS, f"HTTP {e.code} {e.reason}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                retry, reason = True, f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                retry, reason = False, f"unexpected reply ({type(e).__name__}: {e})"
            if not retry or attempt == self.max_retries:
                raise ApiError(f"{url} ({self.model}): {reason}")
            pause = self.retry_backoff_s * 2**attempt
            log.warning("%s: %s; retrying in %.0f s", url, reason, pause)
            time.sleep(pause)
        raise AssertionError("unreachable")


def data_url(image: Any, image_format: str = "PNG") -> str:
    """A PIL image as a base64 `data:` URL."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    mime = f"image/{image_format.lower()}"
    return f"data:{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def to_openai(message: dict, image_format: str = "PNG") -> dict:
    """An HF-style chat message (text and PIL image items) in the OpenAI format."""
    content = message["content"]
    if isinstance(content, str):
        return {"role": message["role"], "content": content}
    parts = []
    for item in content:
        if item["type"] == "text":
            parts.append({"type": "text", "text": item["text"]})
        elif item["type"] == "image":
            url = data_url(item["image"], image_format)
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise ValueError(f"cannot send a {item['type']!r} item")
    return {"role": message["role"], "content": parts}


# -- the questions of a datamodule (eval_samples, messages, labels), without a tokenizer --------
def questions(datamodule: Any) -> tuple[list[str], list[list[dict]], dict[str, list]]:
    """(ids, chat messages, labels for the metric) of the evaluation split."""
    datamodule.prepare_data()  # the synthetic benchmark is generated on first use
    samples = datamodule.eval_samples()
    messages = [datamodule.messages(s) for s in samples]
    return [s.id for s in samples], messages, datamodule.labels(samples)


def _read_responses(path: Path) -> dict[tuple[str, str], str]:
    """Saved responses by (id, request hash). A run killed mid-append leaves a torn last line:
    it is dropped (that question is asked again); a bad line elsewhere is an error."""
    done: dict[tuple[str, str], str] = {}
    if not path.is_file():
        return done
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    for n, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):
                log.warning(
                    "%s: dropping a torn last line (%s); asking that question again", path, e
                )
                # rewrite without it, or the next append would be glued onto the torn text
                atomic_write_text(path, "".join(x + "\n" for x in lines[:-1]))
                break
            raise ValueError(
                f"{path}:{n}: not a JSON line ({e}); delete the file to ask again"
            ) from None
        done[row["id"], row["request"]] = row["response"]
    return done


def answer_all(
    client: ApiClient, ids: list[str], messages: list[list[dict]], path: Path, concurrency: int = 4
) -> list[str]:
    """Every question's response, asking only those `path` holds no answer to yet.

    A response is reused only for the identical request (same model, prompt, images, settings:
    its sha256 is stored with it), so a rerun with another prompt asks again.
    """
    done = _read_responses(path)
    bodies = [json.dumps(client.body(m)).encode() for m in messages]
    keys = [hashlib.sha256(b).hexdigest()[:16] for b in bodies]
    todo = [i for i in range(len(ids)) if (ids[i], keys[i]) not in done]
    log.info("%s: %d questions, %d answered before", client.model, len(ids), len(ids) - len(todo))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out, ThreadPoolExecutor(concurrency) as pool:
        for i, text in zip(todo, pool.map(lambda i: client.send(bodies[i]), todo), strict=True):
            done[ids[i], keys[i]] = text
            row = {"id": ids[i], "request": keys[i], "response": text}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
    return [done[qid, key] for qid, key in zip(ids, keys, strict=True)]


def evaluate_api(
    cfg: DictConfig, datamodule: Any, loggers: Sequence[Any] = ()
) -> tuple[dict[str, float], Any, list[dict]]:
    """Score `cfg.model` behind `cfg.model.api` on the evaluation split: (results, metric,
    each question's verdict for predictions.jsonl). The results go to `loggers`."""
    api = dict(cfg.model.api)
    concurrency = int(api.pop("concurrency", 4))
    client = ApiClient(
        model=str(cfg.model.name_or_path),
        max_tokens=int(cfg.generation.max_new_tokens),
        **api,
    )
    ids, messages, labels = questions(datamodule)
    responses = answer_all(
        client, ids, messages, Path(cfg.paths.output_dir) / "responses.jsonl", concurrency
    )
    metric = datamodule.make_metric()
    keys = [labels[k] for k in metric.batch_keys]
    metric.update(responses, *keys)
    verdicts = [{"id": i, **v} for i, v in zip(ids, metric.judge(responses, *keys), strict=True)]
    results = {f"test/score/{k}": float(v) for k, v in metric.compute().items()}
    for lg in loggers:
        lg.log_metrics(results, step=0)
    return results, metric, verdicts
