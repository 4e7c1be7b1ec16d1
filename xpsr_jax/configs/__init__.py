"""The default config files, shipped inside the package so that `pip install .` works anywhere.

    train.py   training (SD 1.5 size; variants tiny, released_prompts)
    infer.py   inference (the official test recipe; variants validation, tiny)
    data.py    training-data preparation (variants tiny, released_prompts)

Every command takes `--config FILE.py[:variant,...]`; `configs/train.py` (or `train.py`, `train`)
means the packaged file unless a config file of that name exists where the command runs
(`xpsr_jax.cli_config.resolve_config_path`).
"""
