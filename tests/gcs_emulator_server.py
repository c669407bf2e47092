"""gcp-storage-emulator, with the object-data headers real GCS sends (tests/conftest.py: gcs_emulator).

    python tests/gcs_emulator_server.py --host=127.0.0.1 --port=PORT --bucket=NAME

Real GCS answers an object download with `x-goog-generation` and `x-goog-metageneration`
headers (https://cloud.google.com/storage/docs/xml-api/reference-headers); gcp-storage-emulator
leaves them out. tensorstore (orbax's array store) reads the generation of OCDBT's manifest from
that header for its conditional updates and fails with "Malformed StorageGeneration" without
it. And the emulator reads a multipart upload with Python's email parser, which drops a final
"\r" of the object's data when the parts are separated by "\n", as gcsfs separates them (a
TFRecord whose last CRC byte is 0x0D came back one byte short); uploads are split at their
boundary here instead. Everything else is the emulator as released, in memory.
"""

from __future__ import annotations

import argparse
import json
import re
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])


def _part(raw: bytes) -> tuple[dict[str, str], bytes]:
    """Headers and body of one MIME part: the line ending after the boundary and the one before
    the next boundary belong to the boundaries, every other byte to the body."""
    # The sender's line ending is the one after the boundary: "\r\n" (RFC 2046) or "\n" (gcsfs).
    eol = b"\r\n" if raw.startswith(b"\r\n") else b"\n"
    raw = raw[len(eol):]
    raw = raw[:-len(eol)] if raw.endswith(eol) else raw
    # The headers end at the first blank line, in either line-ending convention.
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := raw.find(sep)) != -1]
    i, n = min(ends)
    headers = {}
    for line in raw[:i].decode("utf-8").splitlines():
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, raw[i + n:]


_read_data = server._read_data


def _read_data_by_boundary(request_handler, query):
    content_type = request_handler.headers.get("Content-Type") or ""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.startswith("multipart/related") or not match:
        return _read_data(request_handler, query)
    raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)
    delimiter = b"--" + match.group(1).encode()
    parts = raw.split(delimiter)[1:-1]  # before the first boundary: nothing; after the last: "--"
    (_, meta), (headers, content) = (_part(p) for p in parts)
    return {"meta": json.loads(meta), "content": content,
            "content-type": headers.get("content-type", "application/octet-stream").split(";")[0]}


# Before the server module builds its route table from these functions.
objects.download = _download_with_generation
server._read_data = _read_data_by_boundary

create_server = server.create_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True)
    args = parser.parse_args()
    create_server(args.host, args.port, in_memory=True, default_bucket=args.bucket).run()


if __name__ == "__main__":
    main()
