"""Notebook parameters: validate what a researcher passes, then inject it with papermill.

A study notebook declares its parameters in the cell tagged ``parameters`` (papermill's
convention). :func:`validate_parameters` reads that cell with papermill's own inference
(:func:`papermill.inspect_notebook`) and is stricter than papermill in three ways:

* a name the cell does not declare is an error (papermill only logs a warning, so a typo
  silently runs the study with its default);
* a value given as a string (the CLI, a form) is converted to the declared type, and a
  value that does not fit is an error naming the parameter, the type and the value;
* only JSON-like values (None, bool, int, float, str, list, dict with str keys) pass,
  because those are the values papermill's Python translator writes as literals.

:func:`inject_parameters` then lets papermill write the ``injected-parameters`` cell and
re-reads that cell with :mod:`ast`: every statement must be ``name = <literal>`` whose
value equals what was validated. papermill already escapes strings correctly; the check
is defence in depth, so that a future translator bug cannot turn a parameter value into
code run inside the hospital.

The declared type of a parameter comes from its annotation (``n: int = 5``), else from
papermill's ``# type:`` comment, else from its default value (``n = 5`` is an int).
A default that is not a literal (``start = date.today()``) or ``None`` without an
annotation gives a parameter of unknown type: a string for it is read as JSON when it
parses (``"3"`` → 3, ``"[1, 2]"`` → a list) and is kept as a string otherwise.
"""

from __future__ import annotations

import ast
import copy
import json
import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import nbformat
import papermill
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

__all__ = [
    "ParameterError",
    "ParameterSpec",
    "declared_parameters",
    "inject_parameters",
    "validate_parameters",
]

log = logging.getLogger(__name__)

#: The kernel every site runs; parameters are always translated for it.
KERNEL_NAME = "python3"
KERNEL_LANGUAGE = "python"

_TYPES: dict[str, type] = {
    "int": int,
    "float": float,
    "bool": bool,
    "str": str,
    "list": list,
    "List": list,
    "tuple": list,
    "Tuple": list,
    "dict": dict,
    "Dict": dict,
}
_INT_RE = re.compile(r"[+-]?\d+")
_TRUE = {"true", "yes", "1"}
_FALSE = {"false", "no", "0"}


class ParameterError(ValueError):
    """A parameter is unknown, of the wrong type, or cannot be injected safely (one line)."""


@dataclass(frozen=True)
class ParameterSpec:
    """One parameter declared in the notebook's ``parameters`` cell."""

    name: str
    #: int, float, bool, str, list or dict; ``None`` when the type cannot be told.
    type: type | None
    #: ``None`` is an acceptable value (``Optional[...]`` or a ``None`` default).
    nullable: bool
    #: The default as written in the cell (source text).
    default: str
    help: str

    @property
    def type_name(self) -> str:
        """The declared type's name, for messages ("any" when unknown)."""
        return self.type.__name__ if self.type is not None else "any"


def _notebook_language(nb: nbformat.NotebookNode) -> str | None:
    meta = nb.get("metadata", {})
    language = meta.get("kernelspec", {}).get("language") or meta.get("language_info", {}).get(
        "name"
    )
    return str(language).lower() if language else None


def _has_parameters_cell(nb: nbformat.NotebookNode) -> bool:
    return any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in nb.cells)


def _parse_annotation(text: str) -> tuple[type | None, bool]:
    """(type, nullable) from papermill's ``inferred_type_name`` ("None" means no annotation)."""
    text = text.strip().strip("'\"").strip()
    if text in ("", "None"):
        return None, False
    nullable = False
    match = re.fullmatch(r"Optional\[(.*)\]", text)
    if match:
        text, nullable = match.group(1).strip(), True
    parts = [p.strip() for p in text.split("|")]
    if "None" in parts:
        nullable = True
        parts = [p for p in parts if p != "None"]
    if len(parts) != 1:
        return None, nullable
    base = parts[0].split("[", 1)[0].strip()
    return _TYPES.get(base), nullable


def _spec_from_papermill(info: dict[str, Any]) -> ParameterSpec:
    name = str(info["name"])
    default = str(info.get("default", ""))
    declared, nullable = _parse_annotation(str(info.get("inferred_type_name", "None")))
    try:
        default_value = ast.literal_eval(default)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        default_value = ...  # not a literal: the type cannot be told from it
    if default_value is None:
        nullable = True
    if declared is None and default_value is not ... and default_value is not None:
        declared = _TYPES.get(type(default_value).__name__)
    return ParameterSpec(name, declared, nullable, default, str(info.get("help", "")))


def declared_parameters(nb: nbformat.NotebookNode) -> dict[str, ParameterSpec] | None:
    """The parameters declared in the notebook's ``parameters`` cell, in order.

    ``None`` when the notebook has no cell tagged ``parameters``. Raises
    :class:`ParameterError` for a notebook that is not a Python notebook.
    """
    language = _notebook_language(nb)
    if language is not None and language != KERNEL_LANGUAGE:
        raise ParameterError(f"the notebook is written in {language!r}; sites run Python only")
    if not _has_parameters_cell(nb):
        return None
    # papermill infers from the notebook's kernelspec; every site runs the python3 kernel,
    # so infer as if the notebook said so (a notebook without kernelspec would fail otherwise).
    probe = copy.deepcopy(nb)
    probe.metadata["kernelspec"] = {
        "name": KERNEL_NAME,
        "language": KERNEL_LANGUAGE,
        "display_name": "Python 3",
    }
    inferred = papermill.inspect_notebook(probe)
    return {name: _spec_from_papermill(info) for name, info in inferred.items()}


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_json_like(name: str, value: object, depth: int = 0) -> None:
    """Only values papermill's Python translator writes as literals may be injected."""
    if depth > 20:
        raise ParameterError(f"parameter '{name}': value is nested too deeply")
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        return
    if isinstance(value, list):
        for item in value:
            _check_json_like(name, item, depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ParameterError(
                    f"parameter '{name}': dict keys must be strings, got {_show(key)}"
                )
            _check_json_like(name, item, depth + 1)
        return
    raise ParameterError(
        f"parameter '{name}': a value of type {type(value).__name__} cannot be injected "
        "(use None, bool, int, float, str, list or dict)"
    )


def _mismatch(spec: ParameterSpec, value: object) -> ParameterError:
    return ParameterError(f"parameter '{spec.name}': expected {spec.type_name}, got {_show(value)}")


def _from_string(spec: ParameterSpec, text: str) -> object:
    """Convert a CLI string to the declared type."""
    wanted = spec.type
    stripped = text.strip()
    if spec.nullable and stripped in ("None", "null") and wanted is not str:
        return None
    if wanted is int:
        if not _INT_RE.fullmatch(stripped):
            raise _mismatch(spec, text)
        return int(stripped)
    if wanted is float:
        try:
            return float(stripped)
        except ValueError:
            raise _mismatch(spec, text) from None
    if wanted is bool:
        lowered = stripped.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise _mismatch(spec, text)
    if wanted in (list, dict):
        try:
            parsed = json.loads(stripped)
        except (ValueError, RecursionError):
            raise _mismatch(spec, text) from None
        if not isinstance(parsed, wanted):
            raise _mismatch(spec, text)
        return parsed
    # Unknown type: JSON when it parses ("3", "[1, 2]", "null"), the string otherwise.
    try:
        return json.loads(stripped)
    except (ValueError, RecursionError):
        return text


def _convert(spec: ParameterSpec, value: object) -> object:
    if value is None:
        if spec.nullable or spec.type is None:
            return None
        raise _mismatch(spec, value)
    wanted = spec.type
    if isinstance(value, str) and wanted is not str:
        return _from_string(spec, value)
    if wanted is None:
        return value
    if wanted is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _mismatch(spec, value)
        return float(value)
    if wanted is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _mismatch(spec, value)
        return value
    if wanted is list and isinstance(value, tuple):
        return list(value)
    if not isinstance(value, wanted):
        raise _mismatch(spec, value)
    return value


def validate_parameters(
    nb: nbformat.NotebookNode,
    given: dict[str, str | object],
    notes: list[str] | None = None,
) -> dict[str, object]:
    """Check ``given`` against the notebook's ``parameters`` cell and convert the values.

    Returns the converted values in the order the cell declares them. Raises
    :class:`ParameterError` for an unknown name, a value of the wrong type, a value that
    cannot be written as a Python literal, or any parameter given to a notebook without a
    ``parameters`` cell. Notes for the researcher (e.g. "no parameters cell") are appended
    to ``notes`` when a list is passed, and logged.
    """
    declared = declared_parameters(nb)
    if declared is None:
        if given:
            names = ", ".join(sorted(given))
            raise ParameterError(
                f"the notebook has no cell tagged 'parameters', so it takes no parameters "
                f"(given: {names})"
            )
        note = "the notebook has no cell tagged 'parameters'; it runs with its own values"
        log.info(note)
        if notes is not None:
            notes.append(note)
        return {}
    for name in given:
        if name not in declared:
            known = ", ".join(declared) or "none"
            raise ParameterError(
                f"unknown parameter '{name}' (the parameters cell declares: {known})"
            )
    result: dict[str, object] = {}
    for name, spec in declared.items():
        if name in given:
            value = _convert(spec, given[name])
            _check_json_like(name, value)
            result[name] = value
    return result


def _literal(node: ast.expr) -> object:
    """The value of a literal papermill wrote, including its ``float('nan')`` spelling.

    Like :func:`ast.literal_eval` but for the JSON-like shapes only (and that call).
    """
    if isinstance(node, ast.Constant) and (
        node.value is None or isinstance(node.value, bool | int | float | str)
    ):
        return node.value
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub | ast.UAdd)
        and isinstance(node.operand, ast.Constant)
        and isinstance(node.operand.value, int | float)
        and not isinstance(node.operand.value, bool)
    ):
        number = node.operand.value
        return -number if isinstance(node.op, ast.USub) else number
    if isinstance(node, ast.List):
        return [_literal(item) for item in node.elts]
    if isinstance(node, ast.Dict):
        result: dict[Any, object] = {}
        for key, value in zip(node.keys, node.values, strict=True):
            if key is None:
                raise ValueError("dict unpacking is not a literal")
            result[_literal(key)] = _literal(value)
        return result
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "float"
        and len(node.args) == 1
        and not node.keywords
        and isinstance(node.args[0], ast.Constant)
        and node.args[0].value in ("nan", "inf", "-inf")
    ):
        return float(node.args[0].value)
    raise ValueError(f"not a literal: {type(node).__name__}")


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _verify_injected(source: str, values: dict[str, object]) -> None:
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        raise ParameterError(f"the injected parameters cell does not parse ({exc.msg})") from None
    seen: dict[str, object] = {}
    for stmt in tree.body:
        if not (
            isinstance(stmt, ast.Assign)
            and len(stmt.targets) == 1
            and isinstance(stmt.targets[0], ast.Name)
        ):
            raise ParameterError(
                f"the injected parameters cell holds a statement that is not 'name = literal' "
                f"(line {stmt.lineno})"
            )
        try:
            seen[stmt.targets[0].id] = _literal(stmt.value)
        except (ValueError, TypeError, SyntaxError, RecursionError):
            raise ParameterError(
                f"parameter '{stmt.targets[0].id}' was not injected as a literal"
            ) from None
    if seen.keys() != values.keys() or not all(_same(seen[k], values[k]) for k in values):
        raise ParameterError("the injected parameters cell does not hold the validated values")


def inject_parameters(
    nb: nbformat.NotebookNode, values: dict[str, object]
) -> nbformat.NotebookNode:
    """A copy of ``nb`` with papermill's ``injected-parameters`` cell holding ``values``.

    ``values`` must come from :func:`validate_parameters`. The copy carries papermill's
    notebook and cell metadata (as :func:`papermill.iorw.load_notebook_node` sets it up),
    so it can be executed directly. With no values the notebook is returned unchanged
    apart from that metadata (papermill injects nothing either).
    """
    prepared = load_notebook_node(nb)
    if not values:
        return prepared
    for name, value in values.items():
        if not name.isidentifier():
            raise ParameterError(f"parameter name {name!r} is not a Python identifier")
        _check_json_like(name, value)
    injected = parameterize_notebook(
        prepared, dict(values), kernel_name=KERNEL_NAME, language=KERNEL_LANGUAGE
    )
    for cell in injected.cells:
        if "injected-parameters" in cell.metadata.get("tags", []):
            _verify_injected(cell.source, values)
            cell.metadata.setdefault("papermill", {})
            break
    else:  # pragma: no cover - papermill always adds the cell
        raise ParameterError("papermill did not inject a parameters cell")
    return injected
