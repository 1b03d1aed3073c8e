"""The config tree and its checks, one module each, imported by their own names:

    moejax.config.base        default_config(): the tree, one section per package (SECTIONS)
    moejax.config.train       TrainConfig, the `config.train` section (here rather than in
                              `moejax.train`, which imports this package)
    moejax.config.validation  validate(config) -> Sections, the one place a config is checked
    moejax.config.renames     RENAMES: old field spellings and how they are read (imports no
                              package)
    moejax.config.args        parse_arg: typed `key=value` arguments of `get_config(arg)`
    moejax.config.files       load_config_file: a configs/*.py file by path

`moejax.config` sits above every package whose section it assembles and checks (nn, moe,
lora, models, data, sharding) and below `moejax.hf` and `moejax.train`. The section helpers
those packages build their sections with (`ConfigError`, `section_from_mapping`) are
therefore not here but in `moejax.config_section`, at the bottom; see CONTRIBUTING.md.
This package module re-exports nothing.
"""
