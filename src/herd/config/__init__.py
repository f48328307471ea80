"""Configuration dataclasses; this package imports nothing else of herd's."""

from herd.config.model import PRESETS, ModelConfig, RopeScaling, preset

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "preset"]
