"""The experiment platform around the library: the shared training loop, the benchmark tasks, run records,
paired statistics and the reports that turn records into the paper's tables and figures. It needs the heavy
stack (transformers, peft, accelerate, datasets, hydra, wandb, ...): `pip install .[experiments]`."""
