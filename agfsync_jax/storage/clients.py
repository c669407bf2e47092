"""Which clients serve gs:// URLs, and how every one of them finds a GCS emulator.

`configure()` runs once per process, before the first gs:// path is used (`storage.as_path` calls
it), and is the only place that sets these process-wide knobs (docs/design.md section 13).

The backend is etils.epath over fsspec/gcsfs, always (`EPATH_USE_TF=false`, which epath reads
once per process: its cached choice is reset here). With TensorFlow installed epath would
otherwise pick tf.io.gfile, whose GCS file system has Google's endpoints
compiled in: it cannot reach an emulator or a private endpoint. So TensorFlow never opens a
gs:// path in this project: TFRecords are framed in Python (`storage.tfrecord`) and TensorBoard
event files are written to a local directory that is uploaded (`storage.mirror`).

gcsfs keeps no listing cache here (`use_listings_cache=False`): other processes write to the
same bucket, and a cached listing would hide their files.

`STORAGE_EMULATOR_HOST` (e.g. `http://127.0.0.1:9023`), the variable Google's own client
libraries read, points every client at an emulator:

- gcsfs reads it itself; it is given `token="anon"` (an emulator checks no credentials), and
  gcsfs's core file system: the extended one asks the Storage Control API (gRPC to Google) for
  each bucket's layout.
- tensorstore (orbax's array store) reads `TENSORSTORE_GCS_HTTP_URL`, set here to the emulator,
  and `GOOGLE_AUTH_TOKEN_FOR_TESTING`, set to a placeholder bearer token so that it does not look
  for credentials. A (non-empty) value the user set is kept.
- TFDS and orbax's directory operations go through epath, hence gcsfs.

Anonymous access is configured only while `STORAGE_EMULATOR_HOST` is set; without it every
client uses Google's default credentials as usual.
"""

from __future__ import annotations

import os
import threading

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_lock = threading.Lock()
_configured = False


def emulator_host() -> str:
    """The emulator's URL (with scheme), or "" when none is configured."""
    host = os.environ.get(EMULATOR_ENV, "").strip().rstrip("/")
    if host and "://" not in host:
        host = "http://" + host
    return host


def configure() -> None:
    """Sets up epath, gcsfs and tensorstore for gs:// in this process (idempotent)."""
    global _configured
    with _lock:
        if _configured:
            return
        _set_default("EPATH_USE_TF", "false")
        _forget_epath_backend_choice()
        import fsspec

        options: dict = {"use_listings_cache": False}
        host = emulator_host()
        if host:
            import gcsfs.core

            options["token"] = "anon"
            options["endpoint_url"] = host
            for protocol in ("gs", "gcs"):
                fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)
            _set_default("TENSORSTORE_GCS_HTTP_URL", host)
            _set_default("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        for protocol in ("gs", "gcs"):
            fsspec.config.conf.setdefault(protocol, {}).update(options)
        if host and _epath_uses_tensorflow():
            raise RuntimeError(f"{EMULATOR_ENV} is set but etils.epath serves gs:// with tf.io.gfile, which "
                               "cannot reach an emulator; unset EPATH_USE_TF (or set it to false)")
        _configured = True


def _set_default(name: str, value: str) -> None:
    """Sets an environment variable unless the user gave it a (non-empty) value."""
    if not os.environ.get(name):
        os.environ[name] = value


def _forget_epath_backend_choice() -> None:
    """epath decides once per process, at its first path operation (a local one too), whether
    TensorFlow serves gs://; that may have happened before EPATH_USE_TF was set."""
    from etils.epath import gpath

    cache_clear = getattr(getattr(gpath, "_is_tf_installed", None), "cache_clear", None)
    if cache_clear is not None:
        cache_clear()


def _epath_uses_tensorflow() -> bool:
    from etils import epath
    from etils.epath import backend

    return epath.Path("gs://bucket/object")._backend is backend.tf_backend
