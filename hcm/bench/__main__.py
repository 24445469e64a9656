"""python -m hcm.bench [arch=internvl3_1b|internvl3_2b|tiny] ...: see conf/bench.yaml."""

import hydra
from omegaconf import DictConfig

from hcm import console
from hcm.bench.run import run_bench
from hcm.config import register_resolvers

console.install()
register_resolvers()


@hydra.main(version_base="1.3", config_path="../../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    run_bench(cfg)


if __name__ == "__main__":
    main()
