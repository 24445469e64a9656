"""python -m hcm.acceptance [--size gpu|tiny] [--out DIR] [--only CHECK ...]: see
hcm/acceptance/__init__.py and conf/acceptance.yaml."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from hcm import console
from hcm.acceptance.checks import CHECKS
from hcm.acceptance.report import FAIL, JSON_NAME, MARKDOWN_NAME
from hcm.acceptance.run import SIZES, default_folder, default_size, run_acceptance


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hcm.acceptance",
        description="The GPU acceptance run: hcm.bench at InternVL3-2B size (ours against TRL, "
        "full fine-tuning and LoRA, peak memory against README's table), the InternVLProcessor "
        "parity test, one GRPO step under bf16-mixed with flash-attn, and a few steps of the "
        "science_gpu HCM arm. Writes acceptance.json and acceptance.md; exits 1 when a check "
        "fails.",
    )
    parser.add_argument(
        "--size",
        choices=SIZES,
        default=default_size(),
        help="gpu: the real sizes (one H100/H200, ~10 min); tiny: every check at tiny size on "
        "CPU, a smoke run; checks that need CUDA are skipped (default: gpu where CUDA is, else "
        "tiny)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the report's folder (default: $HCM_ROOT/outputs/acceptance/<time>, HCM_ROOT "
        "defaulting to .)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(CHECKS),
        help="run these checks only (the others are reported skipped)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    console.install()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = args.out or default_folder()
    command = shlex.join(["python", "-m", "hcm.acceptance", *argv])
    data = run_acceptance(args.size, folder, args.only, command=command)
    for name, section in data["sections"].items():
        print(f"{name:12s} {section['status']:8s} {section['reason']}")
    print(f"acceptance: {data['status']}; {folder / JSON_NAME}, {folder / MARKDOWN_NAME}")
    return 1 if data["status"] == FAIL else 0


if __name__ == "__main__":
    sys.exit(main())
