"""Save and load models as their constructor config plus safetensors weights.

A saved model is a folder with ``config.json`` (the model's config dataclass) and
``model.safetensors``. Loading never unpickles: the config rebuilds the architecture (HF
backbones from the config dicts stored in it, never by downloading a checkpoint by name)
and the weights are read with safetensors.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from tmr_core import storage

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound="PretrainedModule")


def config_from_dict(config_class: type, data: dict) -> Any:
    """Rebuild a (nested) config dataclass from its ``asdict`` form, rejecting unknown keys."""
    hints = {f.name: f for f in dataclasses.fields(config_class)}
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(f"{config_class.__name__}: unknown keys {unknown} in saved config")
    kwargs = {}
    types_ = {f.name: f.type for f in dataclasses.fields(config_class)}
    resolved = _resolved_hints(config_class)
    for name, value in data.items():
        tp = resolved.get(name, types_[name])
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = config_from_dict(tp, value)
        elif isinstance(value, list) and name in resolved and getattr(tp, "__origin__", None) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return config_class(**kwargs)


def _resolved_hints(cls: type) -> dict:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - fall back to raw annotations
        return {}


class PretrainedModule(nn.Module):
    """``save_pretrained(dir)`` / ``from_pretrained(dir)`` for a module built from one config."""

    config_class: ClassVar[type]

    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    def save_pretrained(self, directory: str, options: storage.StorageOptions | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` to a local folder or ``s3://`` prefix."""
        config_text = json.dumps(dataclasses.asdict(self.config), indent=2, sort_keys=True)
        if storage.is_remote(directory):
            with tempfile.TemporaryDirectory() as tmp:
                self.save_pretrained(tmp)
                for name in (CONFIG_NAME, WEIGHTS_NAME):
                    with open(os.path.join(tmp, name), "rb") as handle:
                        storage.write_bytes_atomic(storage.join(directory, name), handle.read(), options)
            return
        os.makedirs(directory, exist_ok=True)
        save_model(self, os.path.join(directory, WEIGHTS_NAME))
        storage.write_text_atomic(os.path.join(directory, CONFIG_NAME), config_text)

    @classmethod
    def from_pretrained(
        cls: type[M],
        directory: str,
        device: str | torch.device = "cpu",
        options: storage.StorageOptions | None = None,
    ) -> M:
        """Rebuild the model from ``config.json`` and load ``model.safetensors`` (strict)."""
        if storage.is_remote(directory):
            with tempfile.TemporaryDirectory() as tmp:
                for name in (CONFIG_NAME, WEIGHTS_NAME):
                    with open(os.path.join(tmp, name), "wb") as handle:
                        handle.write(storage.read_bytes(storage.join(directory, name), options))
                return cls.from_pretrained(tmp, device=device)
        config_path = os.path.join(directory, CONFIG_NAME)
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing; a saved {cls.__name__} needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        with open(config_path) as handle:
            config = config_from_dict(cls.config_class, json.load(handle))
        model = cls.from_saved_config(config)
        load_model(model, weights_path, strict=True, device=str(device))
        return model.to(device).eval()

    @classmethod
    def from_saved_config(cls: type[M], config: Any) -> M:
        """Build the architecture for loading saved weights (override to skip hub downloads)."""
        return cls(config)
