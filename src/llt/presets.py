"""Presets: YAML files of config values in `configs/` (or $LLT_CONFIG_DIR); a preset may `extends:` another.
`llt.config.load_config` resolves defaults <- preset <- overrides."""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml

from llt.errors import LLTError

def config_dir() -> Path:
    """The presets folder: $LLT_CONFIG_DIR, else `configs/` at the root of the source tree."""
    env = os.environ.get("LLT_CONFIG_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "configs"


def available_presets() -> list[str]:
    d = config_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def _preset_path(preset: str) -> Path:
    if preset.endswith((".yaml", ".yml")) or os.sep in preset:
        path = Path(preset)
        if not path.is_file():
            raise LLTError(f"preset file {preset} does not exist")
        return path
    path = config_dir() / f"{preset}.yaml"
    if not path.is_file():
        names = available_presets()
        close = difflib.get_close_matches(preset, names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LLTError(f"unknown preset {preset!r}{hint}; available: {', '.join(names) or 'none found in ' + str(config_dir())}")
    return path


def load_preset_tree(preset: str, seen: tuple[str, ...] = ()) -> dict:
    path = _preset_path(preset)
    if str(path) in seen:
        raise LLTError(f"preset {path} extends itself (cycle: {' -> '.join(seen)})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise LLTError(f"preset {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise LLTError(f"preset {path} must be a mapping of sections")
    base = tree.pop("extends", None)
    if base is None:
        return tree
    merged = load_preset_tree(str(base), seen + (str(path),))
    for section, values in tree.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged
