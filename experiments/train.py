"""Train and evaluate one configuration (or a Hydra multirun sweep of them).

    python experiments/train.py task=mrpc method=reslora_ms seed=1
    python experiments/train.py -m task=mrpc,rte method=lora,reslora_bs seed=0,1,2 hydra/launcher=joblib_cpu

Tab completion of the overrides in bash: ``source experiments/completion.bash``.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf


def refuse_bad_path_names(args: list[str]) -> None:
    """Check the command line's values that name directories (``PATH_KEYS``: tag, seed, ...) before Hydra makes its
    run dir of them: ``tag=../x`` must not create ``../x``. Every value of a sweep is checked; a line Hydra cannot
    parse is left to Hydra to report. ``run`` checks the composed config again (an experiment's own tag)."""
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if "=" in a and not a.startswith("-")])
    except Exception:  # Hydra reports its own parse errors, naming the override
        return
    if not overrides:
        return
    # Imported here: --help and tab completion stay fast (the package loads torch).
    from reslora.lab.records import PATH_KEYS, check_path_names

    for override in overrides:
        if override.key_or_group in PATH_KEYS:
            values = list(override.sweep_iterator()) if override.is_discrete_sweep() else [override.value()]
            for value in values:
                check_path_names({override.key_or_group: value})


def check_log_files() -> None:
    """Open each log file Hydra configured (lazily: ``delay: true`` in conf/config.yaml), so that a run dir that
    cannot be written fails here naming the file, not as logging's bare ``Unable to configure handler 'file'``."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                open(handler.baseFilename, "a").close()
            except OSError as error:
                raise OSError(error.errno, f"could not write the run's log {handler.baseFilename}: "
                                           f"{error.strerror or error}") from None


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg) -> None:
    check_log_files()
    # Imported here, not above: --help and tab completion then answer without loading torch and transformers.
    from reslora.lab.records import override_defaults
    from reslora.lab.train import run

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    swept = set((hydra_cfg.sweeper.get("params") or {}).keys())  # the experiment's sweep axes
    defaults = override_defaults(overrides, swept, lambda kept: OmegaConf.to_container(
        hydra.compose(config_name="config", overrides=kept), resolve=True))
    run(cfg, overrides, dict(hydra_cfg.runtime.choices), defaults)


if __name__ == "__main__":
    try:
        refuse_bad_path_names(sys.argv[1:])
    except ValueError as error:
        sys.exit(f"refused: {error}")  # before Hydra has made any directory
    main()
