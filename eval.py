"""Score a model on a split and print the Table-3 layout. `python eval.py --help` lists options."""

import hydra
from omegaconf import DictConfig

from hcm import console
from hcm.config import register_resolvers
from hcm.evaluate import evaluate

console.install()
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    with console.one_line_errors():
        return evaluate(cfg)["test/score/overall"]


if __name__ == "__main__":
    main()
