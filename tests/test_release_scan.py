"""Data-aware scanning: the site's identifiers found wherever an output hides them, never quoted."""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import time
import zlib
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output
from PIL import Image, PngImagePlugin

from phds_tre import sdc
from phds_tre.release.scan import (
    UNSCANNED,
    Hit,
    IdentifierIndex,
    IdentifierIndexError,
    hits_verdict,
)

RECORD = "HSJD-10012345"
DIGITS = "10012345"
BIRTH = dt.datetime(2015, 3, 12, 8, 30)
SOURCE = "person.person_source_value"
BIRTH_COLUMN = "person.birth_datetime"
COLUMNS = [SOURCE, BIRTH_COLUMN]
PERSONS = 5000


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site with 5,000 persons: person.parquet with record numbers and birth datetimes."""
    folder = tmp_path_factory.mktemp("site")
    ids = [RECORD] + [f"HSJD-{20_000_000 + i}" for i in range(1, PERSONS)]
    births = [BIRTH] + [
        dt.datetime(2005, 1, 1) + dt.timedelta(days=i % 4000, hours=i % 24)
        for i in range(1, PERSONS)
    ]
    frame = pd.DataFrame(
        {
            "person_id": range(1, PERSONS + 1),
            "person_source_value": ids,
            "birth_datetime": births,
            "year_of_birth": [b.year for b in births],
        }
    )
    with duckdb.connect() as con:
        con.register("persons", frame)
        con.execute(f"COPY persons TO '{folder / 'person.parquet'}' (FORMAT parquet)")
    return folder


@pytest.fixture(scope="module")
def index(site_dir: Path) -> IdentifierIndex:
    return IdentifierIndex.from_site(site_dir, COLUMNS)


def _assert_no_value(hits: list[Hit]) -> None:
    """A hit names where and which column — never the value, in any of its forms."""
    for hit in hits:
        shown = f"{hit} {hit!r}"
        for value in (RECORD, DIGITS, "2015-03-12", "12/03/2015", "20150312"):
            assert value not in shown


def _columns(hits: list[Hit]) -> set[str]:
    return {hit.column for hit in hits}


def _png(text_chunk: str = "", ztxt: str = "", itxt: str = "") -> str:
    info = PngImagePlugin.PngInfo()
    if text_chunk:
        info.add_text("Comment", text_chunk)
    if ztxt:
        info.add_text("Description", ztxt, zip=True)
    if itxt:
        info.add_itxt("Title", itxt, lang="en", tkey="Title", zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (3, 3), "white").save(buffer, "PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _pdf(text: str) -> str:
    stream = zlib.compress(f"BT /F1 12 Tf ({text}) Tj ET".encode())
    raw = (
        b"%PDF-1.4\n1 0 obj << /Length "
        + str(len(stream)).encode()
        + b" /Filter /FlateDecode >>\nstream\n"
        + stream
        + b"\nendstream\nendobj\n%%EOF\n"
    )
    return base64.b64encode(raw).decode("ascii")


def test_builds_fast_for_5000_persons(site_dir: Path) -> None:
    start = time.perf_counter()
    index = IdentifierIndex.from_site(site_dir, COLUMNS)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{elapsed:.3f} s"
    assert index.stats[SOURCE] == {"values": PERSONS, "indexed": PERSONS, "too_short": 0}
    assert index.stats[BIRTH_COLUMN]["indexed"] == PERSONS
    assert index.columns == sorted(COLUMNS)


def _structured_with_evidence_id() -> dict[str, Any]:
    rows = [("F", "a")] * 15 + [("F", "b")] * 15 + [("M", "a")] * 20 + [("M", "b")] * 12
    df = pd.DataFrame(rows, columns=["sex", "band"])
    bundle = json.loads(json.dumps(sdc.crosstab(df.sex, df.band)._repr_mimebundle_()))
    bundle[sdc.MIME_TYPE]["evidence"]["extra"] = {"note": f"first row {RECORD}"}
    return bundle


HIDDEN: dict[str, tuple[dict[str, Any], str]] = {
    "plain text": (new_output("stream", name="stdout", text=f"patient {RECORD} done\n"), "text"),
    "text/plain": (
        new_output("display_data", data={"text/plain": f"id={RECORD}"}),
        "data/text/plain",
    ),
    "html comment": (
        new_output("display_data", data={"text/html": f"<p>ok</p><!-- {RECORD} -->"}),
        "data/text/html",
    ),
    "html attribute": (
        new_output("display_data", data={"text/html": f'<td title="{RECORD}">x</td>'}),
        "data/text/html",
    ),
    "html entity-encoded attribute": (
        new_output("display_data", data={"text/html": '<td data-x="HSJD&#45;10012345">x</td>'}),
        "data/text/html",
    ),
    "json metadata": (
        new_output(
            "display_data", data={"text/plain": "ok"}, metadata={"note": {"patient": [RECORD]}}
        ),
        "metadata/note/patient/0",
    ),
    "structured evidence": (
        new_output("display_data", data=_structured_with_evidence_id()),
        "data/application/vnd.phds.output+json/evidence/extra/note",
    ),
    "error traceback": (
        new_output(
            "error",
            ename="KeyError",
            evalue="'x'",
            traceback=["\x1b[31mKeyError\x1b[0m", f"  df.loc['{RECORD}']"],
        ),
        "traceback/1",
    ),
    "error value": (
        new_output("error", ename="KeyError", evalue=repr(DIGITS), traceback=[]),
        "evalue",
    ),
    "PNG tEXt chunk": (
        new_output("display_data", data={"image/png": _png(text_chunk=RECORD)}),
        "data/image/png (base64) (PNG tEXt chunk)",
    ),
    "PNG zTXt chunk": (
        new_output("display_data", data={"image/png": _png(ztxt=RECORD)}),
        "data/image/png (base64) (PNG zTXt chunk)",
    ),
    "PNG iTXt chunk": (
        new_output("display_data", data={"image/png": _png(itxt=RECORD)}),
        "data/image/png (base64) (PNG iTXt chunk)",
    ),
    "data URI in HTML": (
        new_output(
            "display_data", data={"text/html": f'<img src="data:image/png;base64,{_png(RECORD)}">'}
        ),
        "data/text/html (base64) (PNG tEXt chunk)",
    ),
    "PDF stream": (
        new_output("display_data", data={"application/pdf": _pdf(RECORD)}),
        "data/application/pdf (base64) (PDF stream)",
    ),
    "base64 text in JSON": (
        new_output(
            "display_data",
            data={
                "application/json": {
                    "blob": base64.b64encode(f"xx {RECORD} yy".encode() * 3).decode()
                }
            },
        ),
        "data/application/json/blob (base64)",
    ),
    "integer in JSON": (
        new_output("display_data", data={"application/json": {"ids": [int(DIGITS)]}}),
        "data/application/json/ids/0",
    ),
    "record number without prefix": (
        new_output("stream", name="stdout", text=f"row {DIGITS}\n"),
        "text",
    ),
    "record number, other separator and case": (
        new_output("stream", name="stdout", text="hsjd 10012345\n"),
        "text",
    ),
    "full-width digits": (
        new_output("stream", name="stdout", text="ＨＳＪＤ－１００１２３４５\n"),
        "text",
    ),
    "split across lines of a list": (
        {"output_type": "stream", "name": "stdout", "text": ["HSJD-100", "12345\n"]},
        "text",
    ),
}


@pytest.mark.parametrize("case", list(HIDDEN))
def test_identifier_hidden_anywhere_is_found(index: IdentifierIndex, case: str) -> None:
    output, where = HIDDEN[case]
    hits = index.scan_output(output)
    assert [h for h in hits if h.column == SOURCE and h.where == where], (case, hits)
    assert all(h.kind == "identifier" for h in hits if h.column == SOURCE)
    _assert_no_value(hits)


DATES = [
    "2015-03-12",
    "2015-03-12T08:30:00",
    "Timestamp('2015-03-12 08:30:00')",
    "12/03/2015",
    "12.03.2015",
    "03/12/2015",
    "12-03-2015",
    "20150312",
    "12 March 2015",
    "March 12, 2015",
    "12th of March, 2015",
    "Mar. 12 2015",
    "12 de marzo de 2015",
    "12. März 2015",
]


@pytest.mark.parametrize("text", DATES)
def test_birth_date_in_every_form(index: IdentifierIndex, text: str) -> None:
    output = new_output("display_data", data={"text/html": f"<td>born {text}</td>"})
    hits = index.scan_output(output)
    assert _columns(hits) == {BIRTH_COLUMN}, text
    assert hits[0].kind == "date"
    _assert_no_value(hits)


@pytest.mark.parametrize("scale", [1, 1000, 10**9])
def test_epoch_timestamps(index: IdentifierIndex, scale: int) -> None:
    # Epoch milliseconds are what DataFrame.to_json wrote for datetimes by default.
    epoch = round(BIRTH.replace(tzinfo=dt.UTC).timestamp() * scale)
    output = new_output("display_data", data={"application/json": {"birth": {"0": epoch}}})
    hits = index.scan_output(output)
    assert _columns(hits) == {BIRTH_COLUMN} and hits[0].kind == "date"
    assert _columns(index.scan_output(new_output("stream", name="stdout", text=f"{epoch}\n"))) == {
        BIRTH_COLUMN
    }


NOT_IDENTIFIERS = [
    "cohort of 2015",
    "born in March 2015",
    "period 2015-03",
    "03/2015",
    "n = 12345",
    "count 123456",
    "p = 0.0012345",
    "mean 1001234.5",
    "HSJD",
    "HSJD-",
    "values 10 01 23 45",
    "1999-01-01",
    "31/02/2015",
]


@pytest.mark.parametrize("text", NOT_IDENTIFIERS)
def test_no_false_positive(index: IdentifierIndex, text: str) -> None:
    assert index.scan_text(text) == [], text


def test_short_values_are_not_indexed() -> None:
    index = IdentifierIndex.from_values({"t.id": ["A-12", "12345", "123456", None]})
    assert index.stats["t.id"] == {"values": 3, "indexed": 1, "too_short": 2}
    assert index.scan_text("12 A-12 12345") == []
    assert index.scan_text("id 123456") != []


def test_leading_zeros_and_thousands_separators() -> None:
    index = IdentifierIndex.from_values({"t.mrn": ["MRN-000123456"]})
    for text in ("MRN000123456", "000123456", "123456", "123,456", "mrn_000123456"):
        assert index.scan_text(text), text
    assert index.scan_text("0123456") == []  # another number


def test_key_holding_identifier_is_not_shown(index: IdentifierIndex) -> None:
    output = new_output("display_data", data={"text/plain": "ok"}, metadata={RECORD: 1})
    hits = index.scan_output(output)
    assert [h.where for h in hits] == ["metadata/<key>"]
    _assert_no_value(hits)


def test_clean_outputs_have_no_hits(index: IdentifierIndex) -> None:
    rows = [("F", "a")] * 15 + [("F", "b")] * 15 + [("M", "a")] * 20 + [("M", "b")] * 12
    df = pd.DataFrame(rows, columns=["sex", "band"])
    bundle = json.loads(json.dumps(sdc.crosstab(df.sex, df.band)._repr_mimebundle_()))
    assert index.scan_output(new_output("display_data", data=bundle)) == []
    assert index.scan_output(new_output("display_data", data={"image/png": _png()})) == []


def test_scan_notebook_and_verdict(index: IdentifierIndex) -> None:
    nb = new_notebook(
        cells=[
            new_code_cell("print(1)", outputs=[new_output("stream", name="stdout", text="1\n")]),
            new_code_cell(
                "df.iloc[0]",
                outputs=[
                    new_output("stream", name="stdout", text="fine\n"),
                    new_output("stream", name="stdout", text=f"{RECORD} born 2015-03-12\n"),
                ],
            ),
        ]
    )
    found = index.scan_notebook(nb)
    assert list(found) == [(1, 1)]
    assert _columns(found[(1, 1)]) == set(COLUMNS)
    verdict = hits_verdict(found[(1, 1)])
    assert verdict.status == "fail"
    assert any(SOURCE in r for r in verdict.reasons)
    assert not any(RECORD in r or "2015-03-12" in r for r in verdict.reasons)
    assert hits_verdict([]).status == "pass"


def test_from_site_errors(site_dir: Path) -> None:
    with pytest.raises(IdentifierIndexError, match="no table file"):
        IdentifierIndex.from_site(site_dir, ["visit_occurrence.visit_source_value"])
    with pytest.raises(IdentifierIndexError, match="no column"):
        IdentifierIndex.from_site(site_dir, ["person.nhs_number"])
    with pytest.raises(IdentifierIndexError, match=r"table\.column"):
        IdentifierIndex.from_site(site_dir, ['person."x"; DROP'])


def test_timestamps_with_offsets_index_their_instant() -> None:
    index = IdentifierIndex.from_values(
        {"t.ts": ["2015-03-12 08:30:00-05", "2016-01-02T00:00:00Z"]}
    )
    assert index.stats["t.ts"]["indexed"] == 2
    instant = dt.datetime(2015, 3, 12, 13, 30, tzinfo=dt.UTC)
    assert index.scan_text(f"at {int(instant.timestamp())}")
    assert index.scan_text("on 02/01/2016")


def test_too_deep_to_scan_fails_closed(index: IdentifierIndex) -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(300):
        node["a"] = {}
        node = node["a"]
    hits = index.scan_output(new_output("display_data", data={"application/json": deep}))
    assert [(h.column, h.form) for h in hits] == [(UNSCANNED, "nested too deeply to scan")]
