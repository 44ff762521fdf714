"""The config schema as text: `llt show-config --help-fields` and the field tables of docs/configuration.md,
generated from the dataclasses' metadata (a test keeps the docs equal to them)."""

from __future__ import annotations

import dataclasses
import typing

from llt.config import SECTIONS, RunConfig, _type_name


def fields_markdown() -> str:
    """The field tables of docs/configuration.md (generated from the dataclasses; a test keeps them equal)."""
    lines = []
    for s in SECTIONS:
        cls = type(getattr(RunConfig(), s))
        hints = typing.get_type_hints(cls)
        lines += [f"### `{s}`", "", "| field | type | default | meaning |", "| --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            ch = f.metadata.get("choices")
            meaning = f.metadata["help"] + (f" (one of: {', '.join(ch)})" if ch else "")
            lines.append(f"| `{s}.{f.name}` | {_type_name(hints[f.name])} | `{f.default!r}` | {meaning.replace('|', '/')} |")
        lines.append("")
    return "\n".join(lines)


def describe_fields() -> str:
    """One line per field: key, type, default and help text."""
    hints_cache = {}
    lines = []
    for s in SECTIONS:
        cls = type(getattr(RunConfig(), s))
        hints_cache[s] = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices")
            extra = f" [{'|'.join(choices)}]" if choices else ""
            lines.append(f"{s}.{f.name} ({_type_name(hints_cache[s][f.name])}, default {f.default!r}){extra}: {f.metadata['help']}")
    return "\n".join(lines)
