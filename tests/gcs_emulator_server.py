"""gcp-storage-emulator, with the object-data headers real GCS sends (tests/conftest.py: gcs_emulator).

    python tests/gcs_emulator_server.py --host=127.0.0.1 --port=PORT --bucket=NAME

Real GCS answers an object download with `x-goog-generation` and `x-goog-metageneration`
headers (https://cloud.google.com/storage/docs/xml-api/reference-headers); gcp-storage-emulator
leaves them out. tensorstore (orbax's array store) reads the generation of OCDBT's manifest from
that header for its conditional updates and fails with "Malformed StorageGeneration" without
it. Everything else is the emulator as released, in memory.
"""

from __future__ import annotations

import argparse
from http import HTTPStatus

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])


# Before the server module builds its route table from these functions.
objects.download = _download_with_generation

from gcp_storage_emulator.server import create_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bucket", required=True)
    args = parser.parse_args()
    create_server(args.host, args.port, in_memory=True, default_bucket=args.bucket).run()


if __name__ == "__main__":
    main()
