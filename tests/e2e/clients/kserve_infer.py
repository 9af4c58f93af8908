"""KServe's own REST client (``kserve.InferenceRESTClient``, Open Inference Protocol v2)
against a running server: run by tests/e2e/test_kserve_client.py in the kserve venv
(``make test`` makes it: .venv-kserve), with the server's URL and a .npy input file.

Prints one JSON object: readiness, and for each request the outputs' names, shapes,
datatypes and raw bytes (base64), as the client decoded them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput


def tensors(response: object) -> dict[str, dict[str, object]]:
    found = {}
    for output in response.outputs:  # type: ignore[attr-defined]
        array = output.as_numpy()
        found[output.name] = {
            "shape": list(array.shape),
            "datatype": output.datatype,
            "bytes": base64.b64encode(np.ascontiguousarray(array).tobytes()).decode(),
        }
    return found


async def main(url: str, path: str) -> None:
    x = np.load(path)
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=120))
    report: dict[str, object] = {
        "server_ready": await client.is_server_ready(url),
        "model_ready": await client.is_model_ready(url, "digits_cnn"),
    }
    for binary in (True, False):
        given = InferInput(name="x", shape=list(x.shape), datatype="FP32")
        given.set_data_from_numpy(x, binary_data=binary)
        request = InferRequest(
            model_name="digits_cnn",
            infer_inputs=[given],
            request_outputs=[
                RequestedOutput("output", parameters={"binary_data": binary}),
                RequestedOutput("hessian", parameters={"binary_data": binary}),
            ],
            parameters={"output_index": 2},
        )
        response = await client.infer(url, request, model_name="digits_cnn")
        report["binary" if binary else "json"] = tensors(response)
    await client.close()
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
