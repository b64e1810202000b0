"""Parameters: papermill's inference, stricter validation, and literal-only injection."""

from __future__ import annotations

import ast
import math

import nbformat
import pytest

from phds_tre.execute.parameters import (
    ParameterError,
    declared_parameters,
    inject_parameters,
    validate_parameters,
)

MALICIOUS = "x'); import os; os.system('id'); ('"

PARAMETERS_CELL = """\
n = 10
alpha: float = 0.05
site = "A"  # which site
ages = [0,
  5, 12]
options = {"k": 1}
verbose = True
extra = None
cap: Optional[int] = None
when = date.today()
"""


def notebook(
    parameters: str | None = PARAMETERS_CELL, language: str = "python"
) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "language": language, "display_name": "P"}
    if parameters is not None:
        cell = nbformat.v4.new_code_cell(parameters)
        cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nb.cells.append(nbformat.v4.new_code_cell("print(n)"))
    return nb


def test_declared_types_come_from_annotations_and_defaults() -> None:
    specs = declared_parameters(notebook())
    assert specs is not None
    types = {name: spec.type_name for name, spec in specs.items()}
    assert types == {
        "n": "int",
        "alpha": "float",
        "site": "str",
        "ages": "list",
        "options": "dict",
        "verbose": "bool",
        "extra": "any",
        "cap": "int",
        "when": "any",
    }
    assert specs["cap"].nullable and specs["extra"].nullable and not specs["n"].nullable
    assert specs["site"].help == "which site"


def test_cli_strings_are_converted_to_the_declared_type() -> None:
    values = validate_parameters(
        notebook(),
        {
            "n": "25",
            "alpha": "0.1",
            "site": "007",
            "ages": "[1, 2]",
            "options": '{"a": [1]}',
            "verbose": "false",
            "extra": "3",
            "cap": "None",
            "when": "2024-01-01",
        },
    )
    assert values == {
        "n": 25,
        "alpha": 0.1,
        "site": "007",
        "ages": [1, 2],
        "options": {"a": [1]},
        "verbose": False,
        "extra": 3,
        "cap": None,
        "when": "2024-01-01",
    }
    # Declared order, whatever order they were given in.
    assert list(validate_parameters(notebook(), {"site": "B", "n": 1})) == ["n", "site"]


def test_python_values_are_checked_not_converted() -> None:
    assert validate_parameters(notebook(), {"alpha": 1, "n": 3}) == {"n": 3, "alpha": 1.0}
    assert validate_parameters(notebook(), {"ages": (1, 2)}) == {"ages": [1, 2]}


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"n": "1.5"}, "parameter 'n': expected int, got '1.5'"),
        ({"n": True}, "parameter 'n': expected int, got True"),
        ({"n": None}, "parameter 'n': expected int, got None"),
        ({"alpha": "lots"}, "parameter 'alpha': expected float, got 'lots'"),
        ({"verbose": "perhaps"}, "parameter 'verbose': expected bool, got 'perhaps'"),
        ({"ages": "{}"}, "parameter 'ages': expected list, got '{}'"),
        ({"ages": "[1,"}, "parameter 'ages': expected list, got '[1,'"),
        ({"site": 5}, "parameter 'site': expected str, got 5"),
        ({"options": {1: 2}}, "parameter 'options': dict keys must be strings, got 1"),
        ({"extra": object()}, "parameter 'extra': a value of type object cannot be injected"),
    ],
)
def test_type_mismatch_names_parameter_type_and_value(
    given: dict[str, object], message: str
) -> None:
    with pytest.raises(ParameterError) as info:
        validate_parameters(notebook(), given)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_unknown_parameter_is_an_error_not_a_warning() -> None:
    with pytest.raises(
        ParameterError, match=r"unknown parameter 'nn' \(the parameters cell declares: n, alpha"
    ):
        validate_parameters(notebook(), {"nn": 3})


def test_no_parameters_cell() -> None:
    with pytest.raises(ParameterError, match=r"no cell tagged 'parameters'.*given: n"):
        validate_parameters(notebook(None), {"n": 3})
    notes: list[str] = []
    assert validate_parameters(notebook(None), {}, notes) == {}
    assert notes and "no cell tagged 'parameters'" in notes[0]


def test_non_python_notebook_is_refused() -> None:
    with pytest.raises(ParameterError, match="'r'; sites run Python only"):
        validate_parameters(notebook(language="R"), {})


def test_notebook_without_kernelspec_still_works() -> None:
    nb = notebook()
    del nb.metadata["kernelspec"]
    assert validate_parameters(nb, {"n": "2"}) == {"n": 2}


def _injected(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    return cells[0]


def test_malicious_string_is_injected_as_a_harmless_literal() -> None:
    nb = notebook()
    values = validate_parameters(nb, {"site": MALICIOUS, "options": {"k": MALICIOUS + '"\\'}})
    injected = _injected(inject_parameters(nb, values))
    tree = ast.parse(injected.source)
    # Only `name = <constant>` statements: no call, no import, nothing else.
    assert [type(s) for s in tree.body] == [ast.Assign, ast.Assign]
    site = tree.body[0]
    assert isinstance(site, ast.Assign) and isinstance(site.value, ast.Constant)
    assert site.value.value == MALICIOUS
    assert ast.literal_eval(tree.body[1].value) == {"k": MALICIOUS + '"\\'}
    assert not any(isinstance(n, ast.Call | ast.Import) for n in ast.walk(tree))


def test_injection_places_cell_after_parameters_and_leaves_input_alone() -> None:
    nb = notebook()
    out = inject_parameters(nb, {"n": 3, "alpha": float("nan")})
    assert [c.metadata.get("tags") for c in out.cells[:2]] == [
        ["parameters"],
        ["injected-parameters"],
    ]
    assert len(nb.cells) == 2  # the input notebook is untouched
    assert "alpha = float('nan')" in out.cells[1].source
    assert out.metadata["papermill"]["parameters"]["n"] == 3
    assert math.isnan(out.metadata["papermill"]["parameters"]["alpha"])


def test_injection_refuses_values_that_are_not_literals() -> None:
    with pytest.raises(ParameterError, match="cannot be injected"):
        inject_parameters(notebook(), {"n": {1, 2}})
    with pytest.raises(ParameterError, match="not a Python identifier"):
        inject_parameters(notebook(), {"n; import os": 1})


def test_no_values_injects_nothing() -> None:
    out = inject_parameters(notebook(), {})
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in out.cells)
