"""Raw images: review when they are what they claim, fail otherwise; SVG must not run code."""

from __future__ import annotations

import base64
import io

import matplotlib
import pytest

from phds_tre.check.image import RAW_IMAGE_REASON, check_base64_image, check_svg

matplotlib.use("Agg")

from matplotlib import pyplot as plt

PNG_1x1 = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082"
    )
).decode()
GIF = base64.b64encode(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;").decode()
JPEG = base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00").decode()


def _figure(fmt: str) -> bytes:
    fig, ax = plt.subplots()
    ax.bar(["a", "b"], [3, 12])
    ax.set_title("Age at onset = 3")
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt)
    plt.close(fig)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mime", "data"), [("image/png", PNG_1x1), ("image/gif", GIF), ("image/jpeg", JPEG)]
)
def test_valid_bitmaps_go_to_review(mime: str, data: str) -> None:
    verdict = check_base64_image(mime, data)
    assert verdict.status == "review"
    assert verdict.reasons == (RAW_IMAGE_REASON,)


def test_base64_wrapped_over_lines_is_accepted() -> None:
    wrapped = "\n".join(PNG_1x1[i : i + 20] for i in range(0, len(PNG_1x1), 20)) + "\n"
    assert check_base64_image("image/png", wrapped).status == "review"


@pytest.mark.parametrize("data", ["not base64!!", "iVBORw0KGgo", "", "    "])
def test_invalid_base64_fails(data: str) -> None:
    assert check_base64_image("image/png", data).status == "fail"


def test_bytes_that_are_not_the_declared_type_fail() -> None:
    verdict = check_base64_image("image/png", GIF)
    assert verdict.status == "fail"
    assert "not a valid image/png" in verdict.reasons[0]


def test_real_matplotlib_png_and_svg_review() -> None:
    png = base64.b64encode(_figure("png")).decode()
    assert check_base64_image("image/png", png).status == "review"
    # matplotlib's SVG writes labels ("Age at onset = 3") into comments: not markup.
    assert check_svg(_figure("svg").decode()).status == "review"


@pytest.mark.parametrize(
    "svg",
    [
        '<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
        '<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"></svg>',
        '<svg><rect onclick="x()" width="1" height="1"/></svg>',
        "<svg><foreignObject><p>3 hidden</p></foreignObject></svg>",
        '<svg><a href="javascript:alert(1)"><text>x</text></a></svg>',
        '<svg><a xlink:href="javascript:alert(1)"><text>x</text></a></svg>',
        '<!DOCTYPE svg [<!ENTITY x "3">]><svg><text>&x;</text></svg>',
    ],
)
def test_svg_that_can_run_code_fails(svg: str) -> None:
    assert check_svg(svg).status == "fail"
