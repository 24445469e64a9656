"""Train one stage or a whole pipeline of stages. `python train.py --help` lists the options."""

import hydra
from omegaconf import DictConfig

from hcm import console
from hcm.config import register_resolvers
from hcm.train import train

console.install()
register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with console.one_line_errors():
        metrics = train(cfg)
    return metrics.get("test/score/overall")  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
