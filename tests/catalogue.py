"""A catalogue of bad inputs: one row per way a request can be wrong, and what it must get.

Every request field of ``/hessian`` and ``/jacobian``, of ``/v2/.../infer``, of the
model paths and of ``POST /models``'s manifest is hit with the wrong type, shape, size,
NaN/Inf, malformed base64, out-of-range indices, unicode and traversal names, extra
fields, empty and huge values. Each row says the 4xx status and the ``field`` the
answer must name (``/v2``: the ``{"error"}`` message starts with it). The tests run it
in process (``tests/api``) and, for the rows that need bytes on the wire, against a
real server (``tests/e2e``).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QUAD = "quadratic4"  # f(x) = x * x * arange(4): Hessian of output i is 2 i e_i e_i^T
X4: dict[str, Any] = {"name": "x", "shape": [4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}
GOOD: dict[str, Any] = {"model": QUAD, "inputs": [X4], "output_index": 1}
V2_GOOD: dict[str, Any] = {
    "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}]
}
MISSING = object()  # a key to remove


@dataclass(frozen=True)
class Row:
    """One bad request and the answer it must get."""

    id: str
    status: int
    field: str | None  # what the problem's top-level field must be (v2: message prefix)
    path: str = "/hessian"
    method: str = "POST"
    json: Any = None  # a JSON body (None: see raw)
    raw: bytes | None = None  # bytes sent as they are, with content_type
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    needle: str = ""  # a word the detail (v2: the error) must contain
    form: dict[str, str] | None = None  # multipart/form-data text parts
    files: dict[str, bytes] | None = None  # multipart/form-data file parts

    @property
    def oip(self) -> bool:
        return self.path.startswith("/v2")


def _merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        if value is MISSING:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def _tensor(**change: Any) -> dict[str, Any]:
    return _merge(X4, change)


def _b64(values: list[float], dtype: str = "<f4") -> str:
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode()


def _raw(text: str) -> bytes:
    return text.encode()


# (id, change to GOOD, status, field, needle): the rows both derivative routes share.
_DERIVATIVE: list[tuple[str, dict[str, Any], int, str, str]] = [
    # model
    ("model-missing", {"model": MISSING}, 422, "model", "required"),
    ("model-null", {"model": None}, 422, "model", ""),
    ("model-number", {"model": 4}, 422, "model", ""),
    ("model-list", {"model": [QUAD]}, 422, "model", ""),
    ("model-empty", {"model": ""}, 422, "model", ""),
    ("model-unknown", {"model": "nope"}, 404, "model", "not loaded"),
    ("model-unknown-version", {"model": f"{QUAD}@9"}, 404, "model", "no version '9'"),
    ("model-empty-version", {"model": f"{QUAD}@"}, 422, "model", "pattern"),
    ("model-only-version", {"model": "@1"}, 422, "model", ""),
    ("model-two-versions", {"model": f"{QUAD}@1@1"}, 422, "model", ""),
    ("model-traversal", {"model": "../quadratic4"}, 422, "model", ""),
    ("model-traversal-deep", {"model": "a/../../etc/passwd"}, 422, "model", ""),
    ("model-backslash", {"model": "..\\quadratic4"}, 422, "model", ""),
    ("model-unicode", {"model": "quadrätic4"}, 422, "model", ""),
    ("model-fullwidth-digit", {"model": "quadratic\uff14"}, 422, "model", ""),
    ("model-nul", {"model": "quadratic4\x00"}, 422, "model", ""),
    ("model-space", {"model": " quadratic4"}, 422, "model", ""),
    ("model-huge", {"model": "q" * 100_000}, 422, "model", ""),
    # inputs
    ("inputs-missing", {"inputs": MISSING}, 422, "inputs", "required"),
    ("inputs-null", {"inputs": None}, 422, "inputs", ""),
    ("inputs-object", {"inputs": X4}, 422, "inputs", ""),
    ("inputs-empty", {"inputs": []}, 422, "inputs", ""),
    ("inputs-two", {"inputs": [X4, X4]}, 422, "inputs", ""),
    ("inputs-number", {"inputs": [4]}, 422, "inputs[0]", ""),
    ("inputs-extra-field", {"inputs": [_tensor(parameters={})]}, 422, "inputs[0].parameters", ""),
    # inputs[0].name
    ("name-number", {"inputs": [_tensor(name=4)]}, 422, "inputs[0].name", ""),
    ("name-huge", {"inputs": [_tensor(name="x" * 1000)]}, 422, "inputs[0].name", ""),
    # inputs[0].shape
    ("shape-missing", {"inputs": [_tensor(shape=MISSING)]}, 422, "inputs[0].shape", "required"),
    ("shape-string", {"inputs": [_tensor(shape="4")]}, 422, "inputs[0].shape", ""),
    ("shape-string-dim", {"inputs": [_tensor(shape=["4"])]}, 422, "inputs[0].shape[0]", ""),
    ("shape-float-dim", {"inputs": [_tensor(shape=[4.0])]}, 422, "inputs[0].shape[0]", ""),
    ("shape-bool-dim", {"inputs": [_tensor(shape=[True, 4])]}, 422, "inputs[0].shape[0]", ""),
    ("shape-negative", {"inputs": [_tensor(shape=[-4])]}, 422, "inputs[0].shape[0]", ""),
    ("shape-empty", {"inputs": [_tensor(shape=[], data=[1.0])]}, 422, "inputs[0].shape", ""),
    ("shape-wrong", {"inputs": [_tensor(shape=[5])]}, 422, "inputs[0].shape", "expected [4]"),
    ("shape-square", {"inputs": [_tensor(shape=[2, 2])]}, 422, "inputs[0].shape", ""),
    ("shape-zero-batch", {"inputs": [_tensor(shape=[0, 4], data=[])]}, 422, "inputs[0].shape", ""),
    (
        "shape-batch-too-big",
        {"inputs": [_tensor(shape=[65537, 4], data="")]},  # the default ceiling + 1
        422,
        "inputs[0].shape",
        "batch size",
    ),
    ("shape-17-dims", {"inputs": [_tensor(shape=[1] * 17)]}, 422, "inputs[0].shape", ""),
    ("shape-huge-dim", {"inputs": [_tensor(shape=[10**12])]}, 422, "inputs[0].shape", ""),
    ("shape-2^64", {"inputs": [_tensor(shape=[2**64, 4])]}, 422, "inputs[0].shape", ""),
    # inputs[0].datatype
    ("datatype-unknown", {"inputs": [_tensor(datatype="STR")]}, 422, "inputs[0].datatype", ""),
    ("datatype-lower", {"inputs": [_tensor(datatype="fp32")]}, 422, "inputs[0].datatype", ""),
    ("datatype-bytes", {"inputs": [_tensor(datatype="BYTES")]}, 422, "inputs[0].datatype", ""),
    ("datatype-number", {"inputs": [_tensor(datatype=32)]}, 422, "inputs[0].datatype", ""),
    (
        "datatype-int-fraction",
        {"inputs": [_tensor(datatype="INT8", data=[1.5, 2, 3, 4])]},
        422,
        "inputs[0].data",
        "integers",
    ),
    (
        "datatype-uint8-range",
        {"inputs": [_tensor(datatype="UINT8", data=[256, 2, 3, 4])]},
        422,
        "inputs[0].data",
        "0 to 255",
    ),
    (
        "datatype-fp16-range",
        {"inputs": [_tensor(datatype="FP16", data=[1e6, 2, 3, 4])]},
        422,
        "inputs[0].data",
        "range of FP16",
    ),
    (
        "datatype-fp32-range",
        {"inputs": [_tensor(data=[3.5e38, 2, 3, 4])]},
        422,
        "inputs[0].data",
        "range of FP32",
    ),
    # inputs[0].data as numbers
    ("data-missing", {"inputs": [_tensor(data=MISSING)]}, 422, "inputs[0].data", "required"),
    ("data-null", {"inputs": [_tensor(data=None)]}, 422, "inputs[0].data", ""),
    ("data-number", {"inputs": [_tensor(data=4.0)]}, 422, "inputs[0].data", ""),
    ("data-object", {"inputs": [_tensor(data={"0": 1.0})]}, 422, "inputs[0].data", ""),
    ("data-short", {"inputs": [_tensor(data=[1.0, 2.0, 3.0])]}, 422, "inputs[0].data", "holds 3"),
    ("data-long", {"inputs": [_tensor(data=[1.0] * 5)]}, 422, "inputs[0].data", "holds 5"),
    ("data-empty", {"inputs": [_tensor(data=[])]}, 422, "inputs[0].data", "holds 0"),
    ("data-strings", {"inputs": [_tensor(data=["1", "2", "3", "4"])]}, 422, "inputs[0].data", ""),
    ("data-nulls", {"inputs": [_tensor(data=[None] * 4)]}, 422, "inputs[0].data", ""),
    ("data-objects", {"inputs": [_tensor(data=[{}] * 4)]}, 422, "inputs[0].data", ""),
    ("data-booleans", {"inputs": [_tensor(data=[True] * 4)]}, 422, "inputs[0].data", "boolean"),
    (
        "data-one-boolean",
        {"inputs": [_tensor(data=[1.0, 2.0, False, 4.0])]},
        422,
        "inputs[0].data",
        "boolean",
    ),
    (
        "data-nested-wrong",
        {"inputs": [_tensor(data=[[1.0, 2.0], [3.0, 4.0]])]},
        422,
        "inputs[0].data",
        "nested as [2, 2]",
    ),
    (
        "data-ragged",
        {"inputs": [_tensor(data=[[1.0, 2.0, 3.0], [4.0]])]},
        422,
        "inputs[0].data",
        "",
    ),
    (
        "data-deep",
        {"inputs": [_tensor(data=[[[[[[[[1.0, 2.0, 3.0, 4.0]]]]]]]])]},
        422,
        "inputs[0].data",
        "",
    ),
    ("data-huge-int", {"inputs": [_tensor(data=[10**30, 2, 3, 4])]}, 422, "inputs[0].data", ""),
    (
        "data-100k-numbers",
        {"inputs": [_tensor(data=[0.5] * 100_000)]},
        422,
        "inputs[0].data",
        "holds 100000",
    ),
    # inputs[0].data as base64
    ("base64-malformed", {"inputs": [_tensor(data="@@@@")]}, 422, "inputs[0].data", "base64"),
    ("base64-padding", {"inputs": [_tensor(data="AAA")]}, 422, "inputs[0].data", "base64"),
    (
        "base64-newline",
        {"inputs": [_tensor(data=_b64([1, 2, 3, 4]) + "\n")]},
        422,
        "inputs[0].data",
        "",
    ),
    ("base64-unicode", {"inputs": [_tensor(data="ÄÖÜß" * 4)]}, 422, "inputs[0].data", ""),
    (
        "base64-short",
        {"inputs": [_tensor(data=_b64([1, 2, 3]))]},
        422,
        "inputs[0].data",
        "12 bytes",
    ),
    (
        "base64-fp64-bytes-as-fp32",
        {"inputs": [_tensor(data=_b64([1, 2, 3, 4], "<f8"))]},
        422,
        "inputs[0].data",
        "32 bytes",
    ),
    ("base64-empty", {"inputs": [_tensor(data="")]}, 422, "inputs[0].data", "0 bytes"),
    (
        "base64-nan",
        {"inputs": [_tensor(data=_b64([1, float("nan"), 3, 4]))]},
        422,
        "inputs[0].data",
        "NaN",
    ),
    (
        "base64-inf",
        {"inputs": [_tensor(data=_b64([1, float("inf"), 3, 4]))]},
        422,
        "inputs[0].data",
        "NaN or Inf",
    ),
    # output_index
    ("index-string", {"output_index": "1"}, 422, "output_index", ""),
    ("index-float", {"output_index": 1.0}, 422, "output_index", ""),
    ("index-bool", {"output_index": True}, 422, "output_index", ""),
    ("index-negative", {"output_index": -1}, 422, "output_index", "out of range"),
    ("index-past-end", {"output_index": 4}, 422, "output_index", "4 outputs"),
    ("index-huge", {"output_index": 10**30}, 422, "output_index", ""),
    ("index-empty-list", {"output_index": []}, 422, "output_index", "1 to 64"),
    ("index-list-bad", {"output_index": [1, 9]}, 422, "output_index", "9 is out of range"),
    ("index-list-string", {"output_index": [1, "2"]}, 422, "output_index", ""),
    ("index-list-too-long", {"output_index": [0] * 65}, 422, "output_index", "1 to 64"),
    ("index-object", {"output_index": {"i": 1}}, 422, "output_index", ""),
    # objective
    ("objective-and-index", {"objective": {"type": "sum"}}, 422, "output_index", "not both"),
    (
        "objective-unknown",
        {"output_index": None, "objective": {"type": "huber"}},
        422,
        "objective",
        "",
    ),
    ("objective-untyped", {"output_index": None, "objective": {}}, 422, "objective", ""),
    ("objective-string", {"output_index": None, "objective": "sum"}, 422, "objective", ""),
    (
        "objective-extra",
        {"output_index": None, "objective": {"type": "sum", "weight": 2}},
        422,
        "objective.weight",
        "",
    ),
    (
        "log-softmax-index-missing",
        {"output_index": None, "objective": {"type": "log_softmax"}},
        422,
        "objective.index",
        "required",
    ),
    (
        "log-softmax-index-range",
        {"output_index": None, "objective": {"type": "log_softmax", "index": 4}},
        422,
        "objective.index",
        "",
    ),
    (
        "log-softmax-index-bool",
        {"output_index": None, "objective": {"type": "log_softmax", "index": True}},
        422,
        "objective.index",
        "",
    ),
    (
        "log-softmax-index-negative",
        {"output_index": None, "objective": {"type": "log_softmax", "index": -1}},
        422,
        "objective.index",
        "",
    ),
    (
        "mse-target-length",
        {"output_index": None, "objective": {"type": "mse", "target": [1.0, 2.0]}},
        422,
        "objective.target",
        "",
    ),
    (
        "mse-target-string",
        {"output_index": None, "objective": {"type": "mse", "target": "zero"}},
        422,
        "objective.target",
        "",
    ),
    (
        "mse-target-bool",
        {"output_index": None, "objective": {"type": "mse", "target": [True] * 4}},
        422,
        "objective.target",
        "boolean",
    ),
    (
        "mse-target-nested-strings",
        {"output_index": None, "objective": {"type": "mse", "target": [["a"]] * 4}},
        422,
        "objective.target",
        "",
    ),
    (
        "mse-target-tensor-bad-base64",
        {"output_index": None, "objective": {"type": "mse", "target": _tensor(data="@@")}},
        422,
        "objective.target.data",
        "base64",
    ),
    (
        "mse-target-tensor-no-shape",
        {"output_index": None, "objective": {"type": "mse", "target": _tensor(shape=MISSING)}},
        422,
        "objective.target",  # the first of the union's errors; the detail lists them all
        "objective.target.shape: Field required",
    ),
    (
        "cross-entropy-class-range",
        {"output_index": None, "objective": {"type": "cross_entropy", "target": 4}},
        422,
        "objective.target",
        "",
    ),
    (
        "cross-entropy-negative",
        {"output_index": None, "objective": {"type": "cross_entropy", "target": -1}},
        422,
        "objective.target",
        "",
    ),
    (
        "cross-entropy-per-sample-count",
        {"output_index": None, "objective": {"type": "cross_entropy", "target": [1, 2]}},
        422,
        "objective.target",
        "",
    ),
    (
        "cross-entropy-string",
        {"output_index": None, "objective": {"type": "cross_entropy", "target": "1"}},
        422,
        "objective.target",
        "",
    ),
    # encoding, layout, precision
    ("encoding-unknown", {"encoding": "hex"}, 422, "encoding", ""),
    ("encoding-null", {"encoding": None}, 422, "encoding", ""),
    ("layout-unknown", {"layout": "sideways"}, 422, "layout", ""),
    ("layout-number", {"layout": 2}, 422, "layout", ""),
    ("precision-float16", {"precision": "float16"}, 422, "precision", ""),
    ("precision-upper", {"precision": "FLOAT32"}, 422, "precision", ""),
    # extra fields
    ("extra-field", {"surprise": 1}, 422, "surprise", ""),
    ("extra-case", {"Model": QUAD}, 422, "Model", ""),
    ("extra-unicode-key", {"módel": QUAD}, 422, "módel", ""),
]

_RAW_DERIVATIVE: list[tuple[str, bytes, int, str, str]] = [
    ("body-not-json", b"{not json", 422, "body", "invalid JSON"),
    ("body-truncated", b'{"model": "quadratic4", "inputs": [', 422, "body", "invalid JSON"),
    ("body-empty", b"", 422, "body", ""),
    ("body-list", b"[1, 2]", 422, "body", ""),
    ("body-string", b'"quadratic4"', 422, "body", ""),
    ("body-null", b"null", 422, "body", ""),
    (
        "body-nan-literal",
        _raw(
            '{"model": "quadratic4", "output_index": 1, "inputs": [{"shape": [4], '
            '"data": [1, NaN, 3, 4]}]}'
        ),
        422,
        "inputs[0].data",
        "NaN or Inf",
    ),
    (
        "body-infinity-literal",
        _raw(
            '{"model": "quadratic4", "output_index": 1, "inputs": [{"shape": [4], '
            '"data": [1, Infinity, 3, 4]}]}'
        ),
        422,
        "inputs[0].data",
        "NaN or Inf",
    ),
    (
        "body-overflowing-number",
        _raw(
            '{"model": "quadratic4", "output_index": 1, "inputs": [{"shape": [4], '
            '"data": [1, 1e400, 3, 4]}]}'
        ),
        422,
        "inputs[0].data",
        "",
    ),
]


def derivative_rows() -> list[Row]:
    """Every derivative row, on both routes; /jacobian takes no output_index too."""
    rows = []
    for path in ("/hessian", "/jacobian"):
        kind = path.strip("/")
        for id_, change, status, field_, needle in _DERIVATIVE:
            rows.append(
                Row(f"{kind}:{id_}", status, field_, path, json=_merge(GOOD, change), needle=needle)
            )
        for id_, raw, status, field_, needle in _RAW_DERIVATIVE:
            rows.append(Row(f"{kind}:{id_}", status, field_, path, raw=raw, needle=needle))
    rows.append(
        Row(
            "hessian:index-required",
            422,
            "output_index",
            json=_merge(GOOD, {"output_index": MISSING}),
            needle="required for /hessian",
        )
    )
    return rows


def _v2(id_: str, change: dict[str, Any], field_: str, needle: str = "") -> Row:
    tensor = _merge(V2_GOOD["inputs"][0], change.pop("tensor", {}))
    body = _merge({**V2_GOOD, "inputs": [tensor]}, change)
    return Row(f"v2:{id_}", 400, field_, f"/v2/models/{QUAD}/infer", json=body, needle=needle)


def v2_rows() -> list[Row]:
    """``POST /v2/models/{name}/infer``: 400 (404 for unknown models), ``{"error"}``."""
    infer = f"/v2/models/{QUAD}/infer"
    rows = [
        _v2("inputs-missing", {"inputs": MISSING}, "inputs"),
        _v2("inputs-empty", {"inputs": []}, "inputs"),
        _v2("inputs-number", {"inputs": [4]}, "inputs[0]"),
        _v2("name-wrong", {"tensor": {"name": "image"}}, "inputs[0].name", "'x'"),
        _v2("name-number", {"tensor": {"name": 4}}, "inputs[0].name"),
        _v2("shape-sample-only", {"tensor": {"shape": [4]}}, "inputs[0].shape", "[B, 4]"),
        _v2("shape-wrong", {"tensor": {"shape": [1, 5]}}, "inputs[0].shape"),
        _v2("shape-zero-batch", {"tensor": {"shape": [0, 4], "data": []}}, "inputs[0].shape"),
        _v2("shape-bool", {"tensor": {"shape": [True, 4]}}, "inputs[0].shape[0]"),
        _v2("shape-negative", {"tensor": {"shape": [-1, 4]}}, "inputs[0].shape[0]"),
        _v2("datatype-int", {"tensor": {"datatype": "INT32"}}, "inputs[0].datatype"),
        _v2("datatype-bytes", {"tensor": {"datatype": "BYTES"}}, "inputs[0].datatype", "BYTES"),
        _v2("datatype-number", {"tensor": {"datatype": 32}}, "inputs[0].datatype"),
        _v2("data-missing", {"tensor": {"data": MISSING}}, "inputs[0].data", "missing"),
        _v2("data-short", {"tensor": {"data": [1.0]}}, "inputs[0].data", "holds 1"),
        _v2("data-strings", {"tensor": {"data": ["a"] * 4}}, "inputs[0].data"),
        _v2("data-booleans", {"tensor": {"data": [False] * 4}}, "inputs[0].data", "boolean"),
        _v2("data-string", {"tensor": {"data": "AAAA"}}, "inputs[0].data"),
        _v2("data-overflow-fp32", {"tensor": {"data": [1e39, 0, 0, 0]}}, "inputs[0].data"),
        _v2("tensor-extra", {"tensor": {"extra": 1}}, "inputs[0].extra"),
        _v2("parameters-string", {"tensor": {"parameters": "x"}}, "inputs[0].parameters"),
        _v2("id-number", {"id": 5}, "id"),
        _v2("id-huge", {"id": "i" * 300}, "id"),
        _v2("outputs-unknown", {"outputs": [{"name": "probabilities"}]}, "outputs[0].name"),
        _v2("outputs-too-many", {"outputs": [{"name": "output"}] * 9}, "outputs"),
        _v2("extra-field", {"surprise": 1}, "surprise"),
        Row("v2:body-not-json", 400, "body", infer, raw=b"{not json", needle="invalid JSON"),
        Row("v2:body-list", 400, "body", infer, raw=b"[1]", needle="JSON object"),
        Row(  # NaN is not JSON: the protocol's parser refuses the body
            "v2:body-nan",
            400,
            "body",
            infer,
            raw=_raw(
                '{"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", '
                '"data": [1, NaN, 3, 4]}]}'
            ),
            needle="invalid JSON",
        ),
        Row(
            "v2:header-length",
            400,
            "Inference-Header-Content-Length",
            infer,
            raw=json.dumps(V2_GOOD).encode(),
            headers={"Inference-Header-Content-Length": "abc"},
        ),
        Row("v2:model-unknown", 404, None, "/v2/models/nope/infer", json=V2_GOOD, needle="'nope'"),
        Row("v2:model-empty-version", 400, "name", f"/v2/models/{QUAD}@/infer", json=V2_GOOD),
        Row("v2:model-unicode", 400, "name", "/v2/models/quadr%C3%A4tic4/infer", json=V2_GOOD),
        Row("v2:model-dots", 400, "name", "/v2/models/..quadratic4/infer", json=V2_GOOD),
        Row(
            "v2:version-unknown",
            404,
            None,
            f"/v2/models/{QUAD}/versions/9/infer",
            json=V2_GOOD,
            needle="no version '9'",
        ),
        Row("v2:version-bad", 400, "version", f"/v2/models/{QUAD}/versions/-1/infer", json=V2_GOOD),
        Row("v2:metadata-bad-name", 400, "name", f"/v2/models/{QUAD}@", method="GET"),
    ]
    return rows


def model_path_rows() -> list[Row]:
    """``GET /models/{name}``: a name, or name@version, nothing else."""
    return [
        Row("models:unknown", 404, "model", "/models/nope", "GET", needle="not loaded"),
        Row("models:unknown-version", 404, "model", f"/models/{QUAD}@9", "GET"),
        Row("models:empty-version", 422, "name", f"/models/{QUAD}@", "GET"),
        Row("models:unicode", 422, "name", "/models/quadr%C3%A4tic4", "GET"),
        Row("models:dot-name", 422, "name", "/models/.hidden", "GET"),
        Row("models:huge", 422, "name", "/models/" + "m" * 5000, "GET"),
        Row("models:no-route", 404, "path", "/models/a/b", "GET"),
        Row("models:wrong-method", 405, "method", "/models/quadratic4", "PUT"),
        Row("route:unknown", 404, "path", "/hessians", "POST"),
    ]


PROBLEM = "application/problem+json"


def send(client: Any, row: Row) -> Any:
    """Send ``row`` with a TestClient or an httpx.Client (the same ``request`` call)."""
    headers = dict(row.headers)
    if row.form is not None or row.files is not None:
        files = {name: (name, data) for name, data in (row.files or {}).items()}
        return client.request(
            row.method, row.path, data=row.form or {}, files=files or None, headers=headers
        )
    if row.raw is not None:
        headers.setdefault("content-type", row.content_type)
        return client.request(row.method, row.path, content=row.raw, headers=headers)
    if row.json is None:
        return client.request(row.method, row.path, headers=headers)
    return client.request(row.method, row.path, json=row.json, headers=headers)


def check(client: Any, row: Row) -> None:
    """The row's status; problem+json naming its field (``/v2``: ``{"error"}`` starting
    with the field); the detail holding the row's needle."""
    response = send(client, row)
    assert response.status_code == row.status, (row.id, response.status_code, response.text)
    content_type = response.headers.get("content-type", "")
    if row.oip:
        assert content_type == "application/json", (row.id, content_type)
        body = response.json()
        assert set(body) == {"error"}, (row.id, body)
        if row.field is not None:
            assert body["error"].startswith(f"{row.field}:"), (row.id, body)
        assert row.needle in body["error"], (row.id, body)
        return
    assert content_type == PROBLEM, (row.id, content_type, response.text)
    body = response.json()
    assert body["status"] == row.status and body["title"] and body["detail"], (row.id, body)
    assert "field" in body and body["field"] == row.field, (row.id, body)
    assert row.needle in body["detail"], (row.id, body)


ADMIN_TOKEN = "catalogue-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
MANIFEST: dict[str, Any] = {
    "name": "catalogue_quad",
    "version": "1",
    "format": "zoo",
    "architecture": "quadratic4",
    "input_shape": [4],
}


def _upload(id_: str, change: dict[str, Any], field_: str, needle: str = "") -> Row:
    manifest = json.dumps(_merge(MANIFEST, change))
    return Row(
        f"upload:{id_}",
        422,
        field_,
        "/models",
        form={"manifest": manifest},
        files={"file": b"weights are never read: the manifest is refused first"},
        headers=AUTH,
        needle=needle,
    )


def admin_rows() -> list[Row]:
    """``POST /models`` manifests and ``DELETE /models/{name}``, with the admin token."""
    file = {"file": b"unused"}
    good = {"manifest": json.dumps(MANIFEST)}
    return [
        _upload("name-missing", {"name": MISSING}, "manifest.name", "required"),
        _upload("name-traversal", {"name": "../up"}, "manifest.name"),
        _upload("name-slash", {"name": "a/b"}, "manifest.name"),
        _upload("name-backslash", {"name": "a\\b"}, "manifest.name"),
        _upload("name-unicode", {"name": "quadrätic"}, "manifest.name"),
        _upload("name-rtl-override", {"name": "quad\u202eratic"}, "manifest.name"),
        _upload("name-huge", {"name": "n" * 10_000}, "manifest.name"),
        _upload("name-number", {"name": 4}, "manifest.name"),
        _upload("name-empty", {"name": ""}, "manifest.name"),
        _upload("version-empty", {"version": ""}, "manifest.version"),
        _upload("version-slash", {"version": "1/2"}, "manifest.version"),
        _upload("version-at", {"version": "1@2"}, "manifest.version"),
        _upload("version-number", {"version": 1}, "manifest.version"),
        _upload("format-pickle", {"format": "pickle"}, "manifest.format"),
        _upload("zoo-without-architecture", {"architecture": MISSING}, "manifest"),
        _upload("architecture-on-export", {"format": "export"}, "manifest"),
        _upload("input-shape-missing", {"input_shape": MISSING}, "manifest.input_shape"),
        _upload("input-shape-empty", {"input_shape": []}, "manifest.input_shape"),
        _upload("input-shape-zero", {"input_shape": [0]}, "manifest.input_shape[0]"),
        _upload("input-shape-bool", {"input_shape": [True]}, "manifest.input_shape[0]"),
        _upload("input-shape-string", {"input_shape": ["4"]}, "manifest.input_shape[0]"),
        _upload("input-shape-huge", {"input_shape": [2048, 2048]}, "manifest", "at most"),
        _upload("input-shape-9-dims", {"input_shape": [1] * 9}, "manifest.input_shape"),
        _upload("output-shape-string", {"output_shape": "4"}, "manifest.output_shape"),
        _upload("dtype-float16", {"dtype": "float16"}, "manifest.dtype"),
        _upload("device-tpu", {"device": "tpu"}, "manifest.device"),
        _upload("file-named", {"file": "weights.safetensors"}, "manifest.file"),
        _upload("weights-traversal", {"weights": "../w"}, "manifest.weights"),
        _upload("extra-field", {"surprise": 1}, "manifest.surprise"),
        _upload("description-huge", {"description": "d" * 5000}, "manifest.description"),
        _upload("training-string", {"training": "yes"}, "manifest.training"),
        Row(
            "upload:manifest-missing", 422, "manifest", "/models", form={}, files=file, headers=AUTH
        ),
        Row(
            "upload:manifest-not-json",
            422,
            "manifest",
            "/models",
            form={"manifest": "{not json"},
            files=file,
            headers=AUTH,
        ),
        Row(
            "upload:manifest-list",
            422,
            "manifest",
            "/models",
            form={"manifest": "[]"},
            files=file,
            headers=AUTH,
        ),
        Row("upload:file-missing", 422, "file", "/models", form=good, headers=AUTH),
        Row("upload:as-json", 422, "manifest", "/models", json=MANIFEST, headers=AUTH),
        Row("upload:no-token", 401, "Authorization", "/models", form=good, files=file),
        Row(
            "upload:wrong-token",
            401,
            "Authorization",
            "/models",
            form=good,
            files=file,
            headers={"Authorization": "Bearer wrong"},
        ),
        Row(
            "upload:basic-scheme",
            401,
            "Authorization",
            "/models",
            form=good,
            files=file,
            headers={"Authorization": f"Basic {ADMIN_TOKEN}"},
        ),
        Row(
            "upload:replace-not-bool",
            422,
            "replace",
            "/models?replace=perhaps",
            form=good,
            files=file,
            headers=AUTH,
        ),
        Row("delete:empty-version", 422, "name", f"/models/{QUAD}@", "DELETE", headers=AUTH),
        Row("delete:dot-name", 422, "name", "/models/.hidden", "DELETE", headers=AUTH),
        Row("delete:unknown", 404, "model", "/models/nope", "DELETE", headers=AUTH),
        Row("delete:unknown-version", 404, "model", f"/models/{QUAD}@9", "DELETE", headers=AUTH),
        Row("delete:no-token", 401, "Authorization", f"/models/{QUAD}", "DELETE"),
    ]


def size_rows(max_body_bytes: int, max_json_number_bytes: int) -> list[Row]:
    """Bodies over the server's limits: 413 naming the body, before anything is parsed."""
    numbers = max_json_number_bytes // 4 + 1  # "0.5," is 4 bytes of JSON numbers
    return [
        Row(
            "size:json-numbers",
            413,
            "body",
            json=_merge(GOOD, {"inputs": [_tensor(data=[0.5] * numbers)]}),
        ),
        Row(
            "size:body",
            413,
            "body",
            json=_merge(GOOD, {"inputs": [_tensor(data="A" * max_body_bytes)]}),
        ),
        Row(
            "size:v2-body",
            413,
            None,
            f"/v2/models/{QUAD}/infer",
            raw=b" " * (max_body_bytes + 1),
        ),
    ]
