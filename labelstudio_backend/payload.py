"""Reading the backend's request bodies: JSON within bounds, ids, strings and lists of objects.

Every reader raises :class:`~labelstudio_backend.errors.BackendError` (400) naming the field, so a
malformed request is a client error with a message and never reaches the handlers as a wrong type.
"""

from __future__ import annotations

import re

from insid3_core.io import json_value

from .errors import BackendError

MAX_DEPTH = 64
MAX_ID_DIGITS = 18
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_object(body: bytes) -> dict:
    """The JSON object in ``body``; 400 for anything else, or for nesting deeper than ``MAX_DEPTH``."""
    try:
        payload = json_value(body)
    except ValueError as err:
        raise BackendError(f"request body is not JSON: {str(err)[:200]}") from None
    if not isinstance(payload, dict):
        raise BackendError("request body must be a JSON object")
    if depth(payload) > MAX_DEPTH:
        raise BackendError(f"request body is nested more than {MAX_DEPTH} levels deep")
    if _SURROGATE_ESCAPE.search(body) and has_lone_surrogate(payload):
        raise BackendError("request body holds a lone UTF-16 surrogate (an escape \\ud800-\\udfff without "
                           "its pair): not text")
    return payload


def has_lone_surrogate(value) -> bool:
    """Whether a JSON value holds a string (or key) with an unpaired surrogate, which no text
    encoding can write (json reads ``"\\ud800"`` as one), counted without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def depth(value) -> int:
    """Nesting depth of a JSON value (a scalar is 0), counted without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            level += 1
            deepest = max(deepest, level)
            stack.extend((child, level) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def identifier(value, what: str) -> int:
    """A Label Studio id (a number or its digits, at most ``MAX_ID_DIGITS`` of them)."""
    text = str(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else ""
    if not text.isdigit() or not text.isascii() or len(text) > MAX_ID_DIGITS:
        raise BackendError(f"{str(value)[:40]!r} is not a {what} id (a number of at most {MAX_ID_DIGITS} digits)")
    return int(text)


def project_id(value) -> int | None:
    """Project id from Label Studio's ``"<id>.<timestamp>"``, a number, an object with an ``id`` (and
    maybe a string ``label_config``), or ``None``."""
    if isinstance(value, dict):
        text(value, "label_config")
        value = value.get("id")
    if value in (None, ""):
        return None
    head = value.split(".")[0] if isinstance(value, str) else value
    return identifier(head, "project")


def text(payload: dict, *keys: str) -> str:
    """The first of ``keys`` that ``payload`` sets, as a string (``""`` when none is set)."""
    for key in keys:
        value = payload.get(key)
        if value in (None, ""):
            continue
        if not isinstance(value, str):
            raise BackendError(f"request field {key!r} must be a string, not {type(value).__name__}")
        return value
    return ""


def objects(payload: dict, key: str, required: bool = True) -> list[dict]:
    """``payload[key]`` checked to be a list of JSON objects (an empty list when absent and not ``required``)."""
    value = payload.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise BackendError(f"request field {key!r} must be a list of objects")
    return value


def optional_object(payload: dict, key: str) -> dict:
    """``payload[key]`` when it is an object, ``{}`` when absent; 400 for any other type."""
    value = payload.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BackendError(f"request field {key!r} must be an object, not {type(value).__name__}")
    return value
