"""Storage for every file a stage reads or writes: local disks and gs:// alike (docs/design.md section 13).

    from agfsync_jax import storage

    wd = storage.as_path(workdir)                     # etils.epath.Path; "gs://b/run" stays a URL
    storage.write_json(wd / "train" / "settings.json", settings)   # atomic on both
    with storage.JsonlAppender(wd / "scores" / "scores.jsonl") as out:
        out.append(row); out.flush()                  # durable per batch on object stores
    rows = storage.read_complete_lines(path)
    local = storage.local_copy("gs://b/models/sd15")  # model loaders read local folders

Which client serves gs://, and how each finds an emulator (STORAGE_EMULATOR_HOST): `clients`.
"""

from agfsync_jax.storage.clients import EMULATOR_ENV, configure, emulator_host
from agfsync_jax.storage.files import (atomic_writer, copy_tree, filesystem, list_files, open_image, read_bytes,
                                       read_json, read_npy, read_text, remove, rmtree, size, write_bytes, write_json,
                                       write_text)
from agfsync_jax.storage.folders import (COMMIT, build_folder, cache_root, is_complete, local_copy, publish_folder,
                                         remote_listing_key)
from agfsync_jax.storage.jsonl import (JsonlAppender, count_lines, has_torn_tail, read_complete_lines, read_lines,
                                       write_jsonl)
from agfsync_jax.storage.mirror import LocalMirror
from agfsync_jax.storage.paths import Path, PathLike, absolute, as_path, is_remote

__all__ = [
    "COMMIT", "EMULATOR_ENV", "JsonlAppender", "LocalMirror", "Path", "PathLike", "absolute", "as_path",
    "atomic_writer", "build_folder", "cache_root", "configure", "copy_tree", "count_lines", "emulator_host",
    "filesystem", "has_torn_tail", "is_complete", "is_remote", "list_files", "local_copy", "open_image",
    "publish_folder", "read_bytes", "read_complete_lines", "read_json", "read_lines", "read_npy", "read_text",
    "remote_listing_key", "remove", "rmtree", "size", "write_bytes", "write_json", "write_jsonl", "write_text",
]
