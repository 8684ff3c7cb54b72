"""The JSON files of an HF folder (config.json, generation_config.json, tokenizer_config.json,
the safetensors index), read so that any fault names the file."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import FormatError


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path``; unreadable bytes, invalid UTF-8 or JSON, or a value that is not
    an object is a FormatError that starts with the path."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise FormatError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FormatError(f"{path}: not valid UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r})") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except RecursionError as e:
        raise FormatError(f"{path}: not readable JSON (nested too deeply)") from e
    except ValueError as e:  # Python refuses to read an integer of more than 4300 digits
        raise FormatError(f"{path}: not readable JSON ({str(e).split(':')[0][:80]})") from e
    if not isinstance(value, dict):
        raise FormatError(f"{path}: holds a JSON {_json_kind(value)}, expected an object")
    return value


def _json_kind(value) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return "null"
