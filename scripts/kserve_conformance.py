"""Check a running server with KServe's own Python SDK (a V2 client nobody here wrote).

    .venv-kube/bin/python scripts/kserve_conformance.py --url http://127.0.0.1:8080 \\
        --model mnist --mnist tests/data/mnist-sample [--version 2]

With the SDK's InferenceRESTClient (protocol v2): server live and ready, the model
ready (and an unknown one not), inference on real MNIST test digits, sent as JSON
and with the SDK's default binary tensors, a requested output alone, and the error
of an unknown model. The metadata answers (GET /v2, /v2/models/<name>), which that
client does not fetch, are read with httpx and validated by the SDK's own data
models of the protocol (kserve.protocol.rest.v2_datamodels), as are the JSON
inference answers. Prints a line a check; exit status 1 if any fails.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, InferResponse, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from kserve.protocol.rest.v2_datamodels import (
    InferenceResponse,
    ModelMetadataResponse,
    ServerMetadataResponse,
)


def read_idx(folder: Path, stem: str, offset: int) -> np.ndarray:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.exists():
            raw = path.read_bytes()
            return np.frombuffer(
                gzip.decompress(raw) if path.suffix == ".gz" else raw, np.uint8, offset=offset
            )
    raise SystemExit(f"no {stem} in {folder}")


def test_digits(folder: Path, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` test digits spread over the set: [0, 1] FP32 [N, 1, 28, 28], labels."""
    images = read_idx(folder, "t10k-images-idx3-ubyte", 16).reshape(-1, 28, 28)
    labels = read_idx(folder, "t10k-labels-idx1-ubyte", 8)
    chosen = np.linspace(0, len(labels) - 1, count).astype(int)
    return images[chosen, None].astype(np.float32) / 255, labels[chosen].astype(np.int64)


class Checks:
    def __init__(self) -> None:
        self.failed: list[str] = []

    def __call__(self, what: str, ok: bool, detail: Any = "") -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}{f': {detail}' if detail != '' else ''}")
        if not ok:
            self.failed.append(what)


def infer_request(model: str, pixels: np.ndarray, binary: bool, **kwargs: Any) -> InferRequest:
    tensor = InferInput(name="data", shape=list(pixels.shape), datatype="FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return InferRequest(model_name=model, infer_inputs=[tensor], **kwargs)


def outputs(response: InferResponse) -> dict[str, np.ndarray]:
    return {o.name: o.as_numpy() for o in response.outputs}


async def run(args: argparse.Namespace) -> list[str]:
    check = Checks()
    pixels, labels = test_digits(args.mnist, args.count)
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60, retries=2))
    url, model = args.url, args.model
    try:
        check("server live", await client.is_server_live(url) is True)
        check("server ready", await client.is_server_ready(url) is True)
        check(f"model {model} ready", await client.is_model_ready(url, model) is True)
        check("an unknown model is not ready", await client.is_model_ready(url, "no-such") is False)

        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            server = ServerMetadataResponse.model_validate((await http.get(f"{url}/v2")).json())
            check("server metadata", server.name == "digitserve", server.model_dump())
            meta = ModelMetadataResponse.model_validate(
                (await http.get(f"{url}/v2/models/{model}")).json()
            )
            check(
                "model metadata",
                meta.name == model
                and [(t.name, t.datatype, t.shape) for t in meta.inputs]
                == [("data", "FP32", [-1, 1, 28, 28])]
                and {t.name for t in meta.outputs} == {"probabilities", "digit"},
                f"versions {meta.versions}",
            )
            if args.version is not None:
                check(f"serves version {args.version}", str(args.version) in (meta.versions or []))
            raw = await http.post(
                f"{url}/v2/models/{model}/infer",
                json=infer_request(model, pixels, binary=False).to_rest()[0],
            )
            answer = InferenceResponse.model_validate(raw.json())
            check("a JSON answer is the protocol's InferenceResponse", answer.model_name == model)

        for binary in (False, True):
            how = "binary tensors" if binary else "JSON tensors"
            request_id = f"conformance-{how.split()[0]}"
            response = await client.infer(
                url, infer_request(model, pixels, binary, request_id=request_id), model_name=model
            )
            got = outputs(response)
            right = float(np.mean(got["digit"] == labels))
            check(
                f"infer, {how}: {len(labels)} MNIST test digits",
                right >= args.min_accuracy
                and response.id == request_id
                and response.model_name == model
                and got["probabilities"].shape == (len(labels), 10)
                and np.allclose(got["probabilities"].sum(axis=1), 1, atol=1e-4),
                f"{right:.0%} right",
            )
        only = await client.infer(
            url,
            infer_request(model, pixels, False, request_outputs=[RequestedOutput("digit")]),
            model_name=model,
        )
        check("a requested output alone", [o.name for o in only.outputs] == ["digit"])
        try:
            await client.infer(url, infer_request("no-such", pixels, False), model_name="no-such")
            check("an unknown model's infer fails", False, "it answered")
        except httpx.HTTPStatusError as exc:
            check(
                "an unknown model's infer is a 404 with the protocol's error message",
                exc.response.status_code == 404 and "no model named" in str(exc),
                str(exc)[:120],
            )
    finally:
        await client.close()
    return check.failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080")
    p.add_argument("--model", required=True, help="the served model's name")
    p.add_argument("--mnist", required=True, type=Path, help="a folder with MNIST's t10k files")
    p.add_argument("--version", type=int, help="a version the model must list")
    p.add_argument("--count", type=int, default=20, help="test digits to send (20)")
    p.add_argument("--min-accuracy", type=float, default=0.9)
    args = p.parse_args(argv)
    print(f"KServe SDK V2 conformance of {args.url} (model {args.model}):")
    failed = asyncio.run(run(args))
    print(f"conformance: {'all passed' if not failed else f'{len(failed)} failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
