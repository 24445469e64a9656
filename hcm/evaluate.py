"""evaluate(cfg): score a model on a split and print/save the Table-3 layout.

The model comes from `model.name_or_path` (a hub id, an exported stage's `model/` folder) or a
Lightning checkpoint (`ckpt_path`). Results go to `<output_dir>/metrics.json` (what sweeps and
the report collect) and `<output_dir>/table.md`; each sample's answer and verdict to
`<output_dir>/predictions.jsonl`, shown by `gallery.html` beside it (hcm.predictions).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from hcm.api_eval import evaluate_api
from hcm.checkpoints import check_checkpoint
from hcm.config import validate
from hcm.files import atomic_write_text
from hcm.modules.base import ScreeningModule
from hcm.predictions import publish
from hcm.runtime import finish_loggers, make_loggers, resolve_precision

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    return evaluate_data(cfg)[0]


def evaluate_data(cfg: DictConfig) -> tuple[dict[str, Any], Any]:
    """(the results, the datamodule that read the split): a pipeline's eval stage records which
    manifests it read."""
    with open_dict(cfg):
        cfg.data.mode = "eval"
    validate(cfg)
    ckpt = cfg.get("ckpt_path")
    if ckpt and Path(ckpt).is_file():
        check_checkpoint(ckpt)
    resolve_precision(cfg)
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate(cfg.data, _convert_="all")
    loggers = make_loggers(cfg)
    try:
        if cfg.model.get("api"):  # an OpenAI-compatible endpoint answers (Table 3's API models)
            results, metric, predictions = evaluate_api(cfg, datamodule, loggers)
        else:
            module = ScreeningModule(model=cfg.model, eval_generation=dict(cfg.generation))
            trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
            # verbose=False: the table below shows the results, in the paper's layout
            trainer.test(
                module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), verbose=False
            )
            results, metric = module.test_results, module.test_score
            predictions = module.test_predictions
        model_name = str(cfg.get("ckpt_path") or cfg.model.name_or_path)
        table = metric.table(  # the layout of the metric's paper table
            results,
            Path(model_name).name or model_name,
            cfg.prompt.name.capitalize() if cfg.prompt.name != "cot" else "CoT",
        )
        print(table)
        payload = {
            "metrics": results,
            "model": model_name,
            "prompt": cfg.prompt.name,
            "split": cfg.data.eval_split,
            "manifest_hashes": datamodule.manifest_hashes(),
        }
        atomic_write_text(output_dir / "metrics.json", json.dumps(payload, indent=2))
        atomic_write_text(output_dir / "table.md", table + "\n")
        log.info("results written to %s", output_dir / "metrics.json")
        if rank_zero_only.rank == 0:  # per-sample predictions, their gallery and W&B table
            records = datamodule.load(datamodule.eval_split)[: datamodule.limit_eval]
            publish(output_dir, predictions, records, datamodule.root, loggers)
    finally:
        finish_loggers(loggers)
    return results, datamodule
