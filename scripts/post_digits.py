"""Post real MNIST test digits, as PNG files, to a server's /predict and check them.

    .venv-kube/bin/python scripts/post_digits.py --url http://127.0.0.1:8080 \\
        --mnist DIR --version 2 [--count 20] [--min-accuracy 0.9]

Each digit goes in its own multipart request (field "image"), as a client would send
it; every answer must name --version, and at least --min-accuracy of the digits must
be right. Prints "vN: R of T test digits right"; exit status 1 otherwise.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import urllib.request
import uuid
from pathlib import Path

from kserve_conformance import test_digits
from PIL import Image


def post_png(url: str, png: bytes) -> dict:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="d.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{url}/predict",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=30) as answer:
        return json.load(answer)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True)
    p.add_argument("--mnist", required=True, type=Path)
    p.add_argument("--version", required=True, type=int, help="the version every answer names")
    p.add_argument("--count", type=int, default=20)
    p.add_argument("--min-accuracy", type=float, default=0.9)
    args = p.parse_args(argv)
    pixels, labels = test_digits(args.mnist, args.count)
    right = 0
    for image, label in zip(pixels, labels, strict=True):
        buf = io.BytesIO()
        Image.fromarray((image[0] * 255).round().astype("uint8")).save(buf, "PNG")
        answer = post_png(args.url, buf.getvalue())
        if answer["model"]["version"] != args.version:
            print(f"answered by v{answer['model']['version']}, expected v{args.version}")
            return 1
        right += answer["digit"] == label
    print(f"v{args.version}: {right} of {len(labels)} test digits right")
    return 0 if right / len(labels) >= args.min_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())
