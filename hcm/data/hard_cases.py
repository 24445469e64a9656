"""Hard cases: the training samples the SFT model answers wrongly, and their cache file.

Paper, section 4.2: the Stage 1 (SFT) model answers every training sample; those it gets wrong are
hard cases, the rest easy cases, and HCM-GRPO oversamples the hard ones after `switch_epoch`
(see `hcm.data.sampler`). The paper mines with one answer per sample (right or wrong by the rule
`mining.correct` picks, hcm/mining.py, whose `classify` also accepts k sampled answers per
sample and a pass-rate threshold, which reduce to the paper's rule at k=1).

Mining runs the model over the whole training set, so its result is cached in a JSON file that
records what it was mined from (model, weights fingerprint, manifest hash, mining parameters).
A cache is reused only when all of these match. The file carries a sha256 per field, so an
edited or damaged file is refused with the field named rather than silently changing the set.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

from hcm.files import atomic_write_text

SCHEMA_VERSION = 1
FIELDS = ("model", "fingerprint", "manifest_sha256", "params", "created", "hard_ids", "easy_ids")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class HardCaseFileError(ValueError):
    """A bad hard-case cache file, located by file and field."""

    def __init__(self, path: Path | str, field_name: str | None, message: str):
        self.path, self.field, self.message = str(path), field_name, message
        what = f" field '{field_name}'" if field_name else ""
        super().__init__(f"{self.path}:{what} {message}")


class _InvalidField(ValueError):
    def __init__(self, field_name: str, message: str):
        super().__init__(f"field '{field_name}': {message}")
        self.field, self.message = field_name, message


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _field_sha256(value: Any) -> str:
    return hashlib.sha256(_canonical(value).encode("utf-8")).hexdigest()


def _normalise_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON round trip, so that a tuple and a list (or a reloaded file) compare equal."""
    if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
        raise _InvalidField("params", f"must be a mapping with string keys, got {params!r}")
    try:
        return json.loads(json.dumps(dict(params), sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise _InvalidField(
            "params",
            f"must be plain JSON values (convert a DictConfig with OmegaConf.to_container): {e}",
        ) from None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class HardCaseSet:
    """The result of mining one model on one training manifest.

    `model` names the mined model (path or hub id); `fingerprint` identifies its weights and is
    computed by the caller (e.g. a hash of the checkpoint); `manifest_sha256` is
    `hcm.data.manifest.manifest_hash` of the training manifest; `params` the mining settings
    (greedy, k, pass_threshold, prompt name, ...) as plain JSON values. Ids are stored sorted.
    """

    hard_ids: tuple[str, ...]
    easy_ids: tuple[str, ...]
    model: str
    fingerprint: str
    manifest_sha256: str
    params: Mapping[str, Any]
    created: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        for name in ("model", "fingerprint", "created"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise _InvalidField(name, f"must be a non-empty string, got {value!r}")
        if not isinstance(self.manifest_sha256, str) or not _SHA256_HEX.fullmatch(
            self.manifest_sha256
        ):
            raise _InvalidField(
                "manifest_sha256", f"must be 64 lowercase hex digits, got {self.manifest_sha256!r}"
            )
        try:
            datetime.fromisoformat(self.created)
        except ValueError:
            raise _InvalidField("created", f"not an ISO 8601 timestamp: {self.created!r}") from None
        for name in ("hard_ids", "easy_ids"):
            ids = getattr(self, name)
            if isinstance(ids, str) or not all(isinstance(i, str) and i for i in ids):
                raise _InvalidField(name, "must be a list of non-empty id strings")
            ids = tuple(sorted(ids))
            repeated = sorted({a for a, b in pairwise(ids) if a == b})
            if repeated:
                raise _InvalidField(name, f"repeated ids {repeated[:10]}")
            object.__setattr__(self, name, ids)
        both = sorted(set(self.hard_ids) & set(self.easy_ids))
        if both:
            raise _InvalidField("easy_ids", f"ids both hard and easy: {both[:10]}")
        object.__setattr__(self, "params", _normalise_params(self.params))

    def content(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "fingerprint": self.fingerprint,
            "manifest_sha256": self.manifest_sha256,
            "params": dict(self.params),
            "created": self.created,
            "hard_ids": list(self.hard_ids),
            "easy_ids": list(self.easy_ids),
        }

    def to_json(self) -> str:
        content = self.content()
        doc = {
            "schema_version": SCHEMA_VERSION,
            "content": content,
            "sha256": {name: _field_sha256(value) for name, value in content.items()},
        }
        return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write atomically, so an interrupted save leaves the old cache or none, never half."""
        path = Path(path)
        atomic_write_text(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> HardCaseSet:
        """Read and validate a cache file. Raises HardCaseFileError naming the file and field."""
        path = Path(path)
        if not path.is_file():
            raise HardCaseFileError(path, None, "hard-case file not found")
        try:
            doc = json.loads(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise HardCaseFileError(path, None, f"not valid UTF-8 (byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise HardCaseFileError(
                path, None, f"not valid JSON, truncated or corrupt? ({e.msg}, line {e.lineno})"
            ) from None
        if not isinstance(doc, dict):
            raise HardCaseFileError(path, None, "must hold a JSON object")
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise HardCaseFileError(
                path,
                "schema_version",
                f"is {doc.get('schema_version')!r}, this code reads {SCHEMA_VERSION}",
            )
        extra = sorted(set(doc) - {"schema_version", "content", "sha256"})
        if extra:
            raise HardCaseFileError(path, None, f"unexpected top-level keys {extra}")
        content, checksums = doc.get("content"), doc.get("sha256")
        for name, value in (("content", content), ("sha256", checksums)):
            if not isinstance(value, dict):
                raise HardCaseFileError(path, name, f"must be an object, got {value!r:.80}")
        for name in FIELDS:
            if name not in content:
                raise HardCaseFileError(path, f"content.{name}", "missing")
            if checksums.get(name) != _field_sha256(content[name]):
                raise HardCaseFileError(
                    path, f"content.{name}", "does not match its sha256: edited or corrupted"
                )
        extra = sorted(set(content) - set(FIELDS))
        if extra:
            raise HardCaseFileError(path, None, f"unexpected content fields {extra}")
        for name in ("hard_ids", "easy_ids"):
            if not isinstance(content[name], list):
                raise HardCaseFileError(path, f"content.{name}", "must be a list of id strings")
        try:
            return cls(**content)
        except _InvalidField as e:
            raise HardCaseFileError(path, f"content.{e.field}", e.message) from None

    def mismatches(
        self, model: str, fingerprint: str, manifest_sha256: str, params: Mapping[str, Any]
    ) -> list[str]:
        """What differs between this cache and a requested mining, for a log line."""
        wanted = {
            "model": model,
            "fingerprint": fingerprint,
            "manifest_sha256": manifest_sha256,
            "params": _normalise_params(params),
        }
        return [
            f"{name}: cached {getattr(self, name)!r}, wanted {value!r}"
            for name, value in wanted.items()
            if getattr(self, name) != value
        ]

    def indices(self, ids_in_dataset_order: Iterable[str]) -> list[int]:
        """Dataset positions of the hard cases, ascending: what `HardCaseSampler` takes."""
        position: dict[str, int] = {}
        for i, sample_id in enumerate(ids_in_dataset_order):
            if sample_id in position:
                raise ValueError(
                    f"dataset id {sample_id!r} appears twice (positions "
                    f"{position[sample_id]} and {i})"
                )
            position[sample_id] = i
        missing = [h for h in self.hard_ids if h not in position]
        if missing:
            raise ValueError(
                f"{len(missing)} hard case(s) are not in the dataset, e.g. {missing[:5]}: "
                f"was the cache mined on another manifest (it records {self.manifest_sha256})?"
            )
        return sorted(position[h] for h in self.hard_ids)
