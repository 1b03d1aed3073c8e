"""The config tree and its checks, one module each, imported by their own names:

    moejax.config.sections    ConfigError and the section-dataclass helpers each package's
                              `config.py` builds its section with (imports no package)
    moejax.config.base        default_config(): the tree, one section per package (SECTIONS)
    moejax.config.validation  validate(config) -> Sections, the one place a config is checked
    moejax.config.renames     RENAMES: old field spellings and how they are read (imports no
                              package)
    moejax.config.args        parse_arg: typed `key=value` arguments of `get_config(arg)`
    moejax.config.files       load_config_file: a configs/*.py file by path

This package module re-exports nothing: `sections` is imported by every package and
`base`/`validation` import every package, so imports point one way only.
"""
