"""Configuration: dataclasses, named presets and the models that ship inside packages; this
package imports nothing else of herd's, so every layer may import it."""

from herd.config.model import PRESETS, ModelConfig, RopeScaling, preset

__all__ = ["PRESETS", "ModelConfig", "RopeScaling", "preset"]
