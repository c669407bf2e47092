"""A local directory mirrored to a remote one, for writers that only write local files.

    mirror = LocalMirror(train_dir / "tensorboard")
    writer = tf.summary.create_file_writer(str(mirror.local))
    ...; writer.flush(); mirror.sync()
    mirror.close()

TensorFlow's file systems cannot reach an emulator or a private endpoint (`storage.clients`), so
TensorBoard event files are written locally (in the system temp directory, never the work
directory) and every file that changed is uploaded whole by `sync()`: the periodic whole-object
rewrite TensorFlow's own GCS writer does on each flush. For a local target the mirror is the
target itself and `sync()` does nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from etils import epath

from agfsync_jax.storage.files import filesystem, list_files
from agfsync_jax.storage.paths import PathLike, as_path, is_remote


class LocalMirror:
    """`local` is where to write; `sync()` uploads what changed to `target`."""

    def __init__(self, target: PathLike):
        self.target = as_path(target)
        self.remote = is_remote(self.target)
        self._uploaded: dict[str, tuple[int, int]] = {}
        if self.remote:
            self._tmp = tempfile.mkdtemp(prefix="agfsync-mirror-")
            self.local = epath.Path(self._tmp)
        else:
            self.local = self.target
            self.local.mkdir(parents=True, exist_ok=True)

    def sync(self) -> int:
        """Uploads every file written or grown since the last sync; returns how many."""
        if not self.remote:
            return 0
        fs, key = filesystem(self.target)
        count = 0
        for name in list_files(self.local):
            st = os.stat(os.path.join(self._tmp, name))
            stamp = (st.st_size, st.st_mtime_ns)
            if self._uploaded.get(name) != stamp:
                fs.put_file(os.path.join(self._tmp, name), f"{key.rstrip('/')}/{name}")
                self._uploaded[name] = stamp
                count += 1
        return count

    def close(self) -> None:
        """A last sync; then the local copy goes."""
        if self.remote:
            try:
                self.sync()
            finally:
                shutil.rmtree(self._tmp, ignore_errors=True)
