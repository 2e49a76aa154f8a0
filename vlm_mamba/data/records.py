"""Reading the official annotation files with errors that name the file, the record and the field.

A malformed annotation file must fail before any shard is written, with a message a user can act on
("captions_val2014.json: annotations[12] (id=48): field 'caption' must be str, got int").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file, the record and the field."""


def load_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing file or a syntax error names the file (and line/column)."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: file not found")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from err
    except UnicodeDecodeError as err:
        raise AnnotationError(f"{path}: not UTF-8 text: {err}") from err


def top_list(doc: Any, key: str, path: str | Path) -> list:
    """``doc[key]`` as a list (the ``images`` / ``annotations`` / ``questions`` arrays)."""
    if not isinstance(doc, dict):
        raise AnnotationError(f"{path}: top level must be a JSON object, got {type(doc).__name__}")
    if key not in doc:
        raise AnnotationError(f"{path}: missing top-level field {key!r} (has {sorted(doc)[:10]})")
    value = doc[key]
    if not isinstance(value, list):
        raise AnnotationError(f"{path}: top-level field {key!r} must be a list, got {type(value).__name__}")
    return value


def field(record: Any, name: str, types: type | tuple[type, ...], where: str, optional: bool = False) -> Any:
    """``record[name]`` checked against ``types``; ``where`` is "file: array[i] (id=..)".

    ``bool`` is rejected where ``int`` is asked for (JSON ``true`` is not an id).
    """
    if not isinstance(record, dict):
        raise AnnotationError(f"{where}: record must be a JSON object, got {type(record).__name__}")
    if name not in record or record[name] is None:
        if optional:
            return None
        raise AnnotationError(f"{where}: missing field {name!r}")
    value = record[name]
    want = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, want) or (isinstance(value, bool) and bool not in want):
        names = "/".join(t.__name__ for t in want)
        raise AnnotationError(
            f"{where}: field {name!r} must be {names}, got {type(value).__name__} {value!r:.60}"
        )
    return value


def where(path: str | Path, array: str, index: int, record: Any, id_field: str = "id") -> str:
    """Location string for error messages: ``file: array[index] (id=...)``."""
    rid = record.get(id_field) if isinstance(record, dict) else None
    return f"{Path(path).name}: {array}[{index}]" + (f" ({id_field}={rid})" if rid is not None else "")
