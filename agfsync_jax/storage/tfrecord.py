"""TFRecord files, framed in Python, so that they can live wherever `storage` paths can.

The format (https://www.tensorflow.org/tutorials/load_data/tfrecord#tfrecords_format_details):

    uint64 length | uint32 masked_crc32c(length) | data[length] | uint32 masked_crc32c(data)

little-endian, with masked_crc32c(x) = ((crc >> 15 | crc << 17) + 0xa282ead8) mod 2**32 over
CRC-32C (Castagnoli). TensorFlow's own readers and writers cannot be given a gs:// path here
(`storage.clients`); the bytes written are identical to `tf.io.TFRecordWriter`'s and
`tf.data.TFRecordDataset` reads them (tests/agfsync_jax/storage/test_tfrecord.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import IO

import google_crc32c

from agfsync_jax.storage.files import atomic_writer, size as file_size
from agfsync_jax.storage.paths import PathLike, as_path

HEADER_BYTES = 12
FOOTER_BYTES = 4
_MASK_DELTA = 0xA282EAD8


class RecordFileError(IOError):
    """A TFRecord file is truncated or a record fails its checksum; the message says where."""


def masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _MASK_DELTA) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    """One record in TFRecord framing."""
    header = struct.pack("<Q", len(record))
    return b"".join((header, struct.pack("<I", masked_crc32c(header)), record,
                     struct.pack("<I", masked_crc32c(record))))


def write_records(path: PathLike, records: Iterable[bytes]) -> int:
    """Writes `records` to `path` atomically (`atomic_writer`); returns how many."""
    count = 0
    with atomic_writer(path) as f:
        for record in records:
            f.write(frame(bytes(record)))
            count += 1
    return count


def scan_record_offsets(path: PathLike) -> list[int]:
    """Byte offsets of the records of a TFRecord file, from the length headers alone.

    A file that ends inside a record (a truncated copy, a writer killed mid-write) raises
    RecordFileError naming the file, the record and the byte position.
    """
    p = as_path(path)
    size = file_size(p)
    offsets: list[int] = []
    pos = 0
    with p.open("rb") as f:
        while pos < size:
            if size - pos < HEADER_BYTES:
                raise RecordFileError(f"{p}: truncated TFRecord file: record {len(offsets)} at byte {pos} "
                                      f"has an incomplete header ({size - pos} of {HEADER_BYTES} bytes)")
            f.seek(pos)
            (length,) = struct.unpack("<Q", f.read(8))
            end = pos + HEADER_BYTES + length + FOOTER_BYTES
            if end > size:
                raise RecordFileError(f"{p}: truncated TFRecord file: record {len(offsets)} at byte {pos} "
                                      f"needs {end - pos} bytes but the file ends at byte {size}")
            offsets.append(pos)
            pos = end
    return offsets


class RecordReader:
    """Random access to the records of one TFRecord file by byte offset, both CRCs checked."""

    def __init__(self, path: PathLike):
        self.path = as_path(path)
        self._f: IO[bytes] = self.path.open("rb")

    def read(self, offset: int) -> bytes:
        self._f.seek(offset)
        header = self._f.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES:
            raise RecordFileError(f"{self.path}: no record header at byte {offset}")
        (length,), (length_crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
        if masked_crc32c(header[:8]) != length_crc:
            raise RecordFileError(f"{self.path}: corrupted record at byte {offset} (length checksum mismatch)")
        body = self._f.read(length + FOOTER_BYTES)
        if len(body) < length + FOOTER_BYTES:
            raise RecordFileError(f"{self.path}: truncated record at byte {offset}")
        data, (data_crc,) = body[:length], struct.unpack("<I", body[length:])
        if masked_crc32c(data) != data_crc:
            raise RecordFileError(f"{self.path}: corrupted record at byte {offset} (data checksum mismatch)")
        return data

    def close(self) -> None:
        self._f.close()
