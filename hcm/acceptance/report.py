"""The acceptance report: a section per check with its criteria and figures, the run's status,
and the JSON and Markdown files it is written to."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hcm.files import atomic_write_text

PASS, FAIL, SKIPPED, PENDING = "pass", "fail", "skipped", "pending"
JSON_NAME, MARKDOWN_NAME = "acceptance.json", "acceptance.md"


@dataclass
class Section:
    """One check's outcome: its status, why (when skipped or failed), each criterion, figures."""

    title: str
    status: str = PENDING  # until `skip`, a failure, or `close` sets it
    reason: str = ""
    seconds: float = 0.0
    criteria: list[dict[str, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def require(self, name: str, ok: bool | None, detail: str = "") -> None:
        """One criterion: True passes, False fails, None was not evaluated here (say why)."""
        status = SKIPPED if ok is None else PASS if ok else FAIL
        self.criteria.append({"name": name, "status": status, "detail": detail})

    def skip(self, reason: str) -> None:
        self.status, self.reason = SKIPPED, reason

    def close(self) -> None:
        """The status from the criteria: any failed -> fail; none evaluated -> skipped (each
        criterion's reason) or, with no criterion at all, fail: a check must be able to fail."""
        if self.status != PENDING:  # skipped before it ran, or failed by an exception
            return
        states = [c["status"] for c in self.criteria]
        if FAIL in states:
            self.status = FAIL
            self.reason = "; ".join(c["name"] for c in self.criteria if c["status"] == FAIL)
        elif PASS in states:
            self.status = PASS
        elif states:
            self.skip("; ".join(c["detail"] or c["name"] for c in self.criteria))
        else:
            self.status, self.reason = FAIL, "no criterion was checked"


def overall_status(sections: dict[str, Section]) -> str:
    """fail if any section failed; pass if all passed; incomplete otherwise (some skipped)."""
    states = {s.status for s in sections.values()}
    if FAIL in states or not states:
        return FAIL
    return PASS if states == {PASS} else "incomplete"


def to_json(report: dict[str, Any], sections: dict[str, Section]) -> dict[str, Any]:
    return {**report, "sections": {name: asdict(s) for name, s in sections.items()}}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def to_markdown(data: dict[str, Any]) -> str:
    env = data["environment"]
    lines = [
        f"# hcm acceptance run: {data['status']}",
        "",
        f"`{data['command']}` (size {data['size']}), {data['started']}, {data['seconds']:.0f} s; "
        f"device {env.get('device')}; torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}, trl {env.get('trl')}, flash-attn {env.get('flash-attn')}, "
        f"torchvision {env.get('torchvision')}; hcm {env.get('commit')}",
        "",
        "| check | status | s | reason |",
        "|---|---|---|---|",
    ]
    sections = data["sections"]
    for name, s in sections.items():
        lines.append(f"| {name} | {s['status']} | {s['seconds']:.0f} | {s['reason'] or '-'} |")
    for name, s in sections.items():
        lines += ["", f"## {name}: {s['title']}", "", f"**{s['status']}**"]
        if s["reason"]:
            lines[-1] += f": {s['reason']}"
        if s["criteria"]:
            lines.append("")
            for c in s["criteria"]:
                detail = f" ({c['detail']})" if c["detail"] else ""
                lines.append(f"- {c['status']}: {c['name']}{detail}")
        for key, value in s["figures"].items():
            lines += ["", f"### {key}", ""]
            lines += _figure_lines(value)
    return "\n".join(lines) + "\n"


def _figure_lines(value: Any) -> list[str]:
    """A figure: text as it is (a table the check made), a mapping of mappings as a table, a
    flat mapping as a list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        columns = list(dict.fromkeys(k for v in value.values() for k in v))
        rows = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for key, v in value.items():
            rows.append(f"| {key} | " + " | ".join(_cell(v.get(c)) for c in columns) + " |")
        return rows
    if isinstance(value, dict):
        return [f"- {k}: {_cell(v)}" for k, v in value.items()]
    return [_cell(value)]


def write_report(folder: Path, data: dict[str, Any]) -> tuple[Path, Path]:
    """`acceptance.json` and `acceptance.md` in `folder` (written whole, after every check)."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / JSON_NAME, folder / MARKDOWN_NAME
    atomic_write_text(json_path, json.dumps(data, indent=2, default=str) + "\n")
    atomic_write_text(md_path, to_markdown(data))
    return json_path, md_path
