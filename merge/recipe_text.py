"""Recipe text: a file or a YAML string read as plain data (``yaml.SafeLoader``, a key given
twice refused, tags refused), and the schema's validation errors as one line each. The schema
itself is ``splice.merge.recipe``; relative paths follow :mod:`splice.paths`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from splice.errors import SpliceError


def read_text(path: Path) -> str:
    """A recipe file's text; one line saying why when it is unreadable, binary or not UTF-8."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise SpliceError(f"recipe {path}: cannot read it ({e.strerror})") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise SpliceError(f"recipe {path} is UTF-16 text; save it as UTF-8")
    if b"\x00" in raw:
        raise SpliceError(f"recipe {path} is a binary file, not YAML text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SpliceError(
            f"recipe {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None


_TAG = re.compile(r"tag '([^']*)'")


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only) that also refuses a key given twice in a mapping,
    which YAML loaders otherwise settle silently by keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            try:
                duplicate = key in seen
            except TypeError:  # an unhashable key: the base class reports it
                break
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def source_text(source: str | os.PathLike[str]) -> tuple[str, Path | None, str]:
    """``(text, folder of the file or None, what to call it)`` for a recipe file or YAML text
    (a string with a newline)."""
    if isinstance(source, str) and "\n" in source:
        return str(source), None, "recipe"
    path = Path(source)
    if path.is_dir():
        raise SpliceError(f"{path}: a folder, not a recipe file")
    if not path.is_file():
        raise SpliceError(f"{path}: no such recipe file")
    return read_text(path), path.parent, f"recipe {path}"


def yaml_documents(text: str, what: str) -> list[Any]:
    """The YAML documents of a recipe (``---`` separates them; empty ones are dropped), read
    as plain data only (a ``SafeLoader``); ``SpliceError`` in one line."""
    try:
        return [d for d in yaml.load_all(text, Loader=_Loader) if d is not None]
    except RecursionError:  # the YAML parser recurses per nesting level
        raise SpliceError(f"{what} nests lists or mappings too deeply to read") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        problem = str(getattr(e, "problem", None) or "").replace("\n", " ")
        tag = _TAG.search(problem) if isinstance(e, yaml.constructor.ConstructorError) else None
        if tag:
            name = re.sub(r"^tag:yaml\.org,2002:", "!!", tag.group(1))
            raise SpliceError(
                f"{what} uses the YAML tag {name}{where}, which splice refuses: recipes are data"
            ) from None
        if problem.startswith("the key "):
            raise SpliceError(f"{what}: {problem}{where}") from None
        raise SpliceError(
            f"{what} is not valid YAML{where}" + (f": {problem}" if problem else "")
        ) from None


def one_mapping(docs: list[Any], what: str) -> dict[str, Any]:
    """The recipe mapping of a one-document recipe; ``SpliceError`` in one line otherwise."""
    if not docs:
        raise SpliceError(f"{what} is empty; it needs at least `merge_method`")
    (data,) = docs
    if isinstance(data, list):
        raise SpliceError(
            f"{what} is a YAML list; a recipe is a mapping with at least `merge_method`"
        )
    if not isinstance(data, dict):
        raise SpliceError(
            f"{what} is a single YAML value ({shown(data)}); a recipe is a mapping with at "
            "least `merge_method`"
        )
    return data


_EXPECTED = {
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "finite_number": "a finite number",
}


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def format_errors(e: ValidationError, what: str = "recipe") -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "union")))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] in _EXPECTED:
            msg = f"expected {_EXPECTED[err['type']]}, got {shown(err.get('input'))}"
        elif err["loc"] and err["loc"][-1] == "layer_range" and err["type"] != "value_error":
            msg = f"expected [start, end], got {shown(err.get('input'))}"
        elif err["type"] == "too_short":
            msg = "must not be empty"
        lines.append(f"{what}: {loc}: {msg}" if loc else f"{what}: {msg}")
    return "\n".join(dict.fromkeys(lines))
