"""Train and evaluate one configuration (or a Hydra multirun sweep of them).

    python experiments/train.py task=mrpc method=reslora_ms seed=1
    python experiments/train.py -m task=mrpc,rte method=lora,reslora_bs seed=0,1,2 hydra/launcher=joblib_cpu

Tab completion of the overrides in bash: ``source experiments/completion.bash``.
"""

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> None:
    # Imported here, not above: --help and tab completion then answer without loading torch and transformers.
    from reslora.lab.train import run

    hydra_cfg = HydraConfig.get()
    run(cfg, list(hydra_cfg.overrides.task), dict(hydra_cfg.runtime.choices))


if __name__ == "__main__":
    main()
