"""Shared fixtures: the real Hydra config composed in-process, and a sandboxed HCM_ROOT.

Every test session gets its own HCM_ROOT (data, outputs, the tiny model cache), so nothing is
written into the repository and the tiny model and synthetic data are built once per session.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from hcm.config import register_resolvers

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(scope="session", autouse=True)
def hcm_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hcm_root")
    saved = {k: os.environ.get(k) for k in ("HCM_ROOT", "WANDB_MODE", "HF_HUB_OFFLINE")}
    os.environ.update(HCM_ROOT=str(root), WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    register_resolvers()
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def stage_store(tmp_path, monkeypatch) -> Path:
    """Each test its own stage store: a pipeline stage is never reused from another test."""
    store = tmp_path / "stage_store"
    monkeypatch.setenv("HCM_STAGE_STORE", str(store))
    return store


@pytest.fixture
def compose_cfg(tmp_path) -> Callable[..., DictConfig]:
    """compose_cfg("train", ["experiment=tiny_sft", ...]) -> the config train.py would get.

    HydraConfig is set as under @hydra.main (pipelines read the command-line overrides from it),
    and the run's output folder is this test's tmp_path unless an override sets it.
    """

    def make(config_name: str, overrides: list[str] | None = None) -> DictConfig:
        overrides = list(overrides or [])
        GlobalHydra.instance().clear()
        # Left initialised (not a `with` block): pipelines compose their stages through it.
        initialize_config_dir(str(CONF), version_base="1.3")
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            if not any(o.startswith("paths.output_dir=") for o in overrides):
                cfg.paths.output_dir = str(tmp_path / "run")
        return cfg

    yield make
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> Path:
    """A tiny random InternVL3 saved like a hub checkpoint, built once per session."""
    from hcm.model.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.getbasetemp() / "tiny-internvl3")


@pytest.fixture(scope="session")
def tok(tiny_path):
    from hcm.model.loading import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture(scope="session")
def prompts(tiny_path, tok) -> dict:
    """Two left-padded generation prompts, with 3 tiles (56x112: 2 + thumbnail) and 1 tile."""
    import numpy as np
    from PIL import Image

    from hcm.model.inputs import InputBuilder
    from hcm.model.loading import load_image_processor

    rng = np.random.default_rng(0)

    def conv(h, w, text):
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        return [
            {
                "role": "user",
                "content": [{"type": "image", "image": image}, {"type": "text", "text": text}],
            }
        ]

    builder = InputBuilder(tok, load_image_processor(tiny_path), max_patches=4, image_seq_length=4)
    return builder.encode(
        [conv(56, 112, "Which one?"), conv(56, 56, "A")],
        add_generation_prompt=True,
        padding_side="left",
    )
