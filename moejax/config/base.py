"""The default config tree: one section per package, defaults taken from the section
dataclasses so there is a single source of truth for every field and its default."""

from __future__ import annotations

import dataclasses

import ml_collections

from moejax.config.train import TrainConfig
from moejax.data.config import DataConfig
from moejax.lora.config import LoRAConfig
from moejax.models.config import ModelConfig
from moejax.moe.config import MoEConfig
from moejax.sharding.config import MeshConfig

SECTIONS = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "mesh": MeshConfig,
    "lora": LoRAConfig,
}


def default_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    for name, cls in SECTIONS.items():
        config[name] = ml_collections.ConfigDict(dataclasses.asdict(cls()))
    return config
