"""Arrays on nnInteractive's wire (protocol 2.6), written from the published format.

Layout (little-endian)::

    b"NNIA" | version u8 (1) | codec u8 (1 = blosc2 ZSTD, 2 = LZ4) | ndim u8 | dtype-name length u8
    | dtype name (ascii, e.g. "float32") | shape: ndim x int64
    | chunk count u32 | per chunk: uncompressed length u64, compressed length u64, blosc2 frame

:func:`unpack` checks the declared shape against a voxel limit *before* allocating, and every
chunk's frame size against its header, so a small body cannot make the server allocate or write
more than it declared.
"""
from __future__ import annotations

import struct
from typing import Optional

import blosc2
import numpy as np

MAGIC = b"NNIA"
VERSION = 1
CODECS = {1: blosc2.Codec.ZSTD, 2: blosc2.Codec.LZ4}
CHUNK = 1 << 30
DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "int64", "uint64",
          "float16", "float32", "float64")


class WireError(ValueError):
    """A packed array that does not follow the format (or exceeds a limit)."""


def pack(arr: np.ndarray, codec_id: int = 1, clevel: int = 3) -> bytes:
    """Pack an array (any of :data:`DTYPES`) in the wire format."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    name = arr.dtype.name.encode("ascii")
    out = [struct.pack("<4sBBBB", MAGIC, VERSION, codec_id, arr.ndim, len(name)), name,
           struct.pack(f"<{arr.ndim}q", *arr.shape)]
    raw = memoryview(arr).cast("B") if arr.nbytes else memoryview(b"")
    n = (raw.nbytes + CHUNK - 1) // CHUNK
    out.append(struct.pack("<I", n))
    for i in range(n):
        part = raw[i * CHUNK:(i + 1) * CHUNK]
        comp = blosc2.compress2(part, typesize=arr.dtype.itemsize, codec=CODECS[codec_id], clevel=clevel,
                                filters=[blosc2.Filter.NOFILTER])
        out += [struct.pack("<QQ", part.nbytes, len(comp)), comp]
    return b"".join(out)


def unpack(buf: bytes, max_voxels: Optional[int] = None, what: str = "array") -> np.ndarray:
    """Unpack a wire array; WireError (naming ``what``) on any inconsistency or when the declared
    shape has more than ``max_voxels`` elements."""
    try:
        if len(buf) < 8:
            raise WireError(f"{what}: body of {len(buf)} bytes is too short for a packed array")
        magic, version, codec, ndim, nlen = struct.unpack_from("<4sBBBB", buf, 0)
        if magic != MAGIC:
            raise WireError(f"{what}: not a packed array (magic {magic!r}, expected {MAGIC!r})")
        if version != VERSION:
            raise WireError(f"{what}: wire version {version} is not supported (only {VERSION})")
        if codec not in CODECS:
            raise WireError(f"{what}: codec id {codec} is not supported (1 = ZSTD, 2 = LZ4)")
        off = 8
        name = bytes(buf[off:off + nlen]).decode("ascii", "replace")
        off += nlen
        if name not in DTYPES:
            raise WireError(f"{what}: dtype {name!r} is not supported ({', '.join(DTYPES)})")
        shape = struct.unpack_from(f"<{ndim}q", buf, off)
        off += 8 * ndim
        if any(s < 0 for s in shape):
            raise WireError(f"{what}: negative shape {list(shape)}")
        count = int(np.prod(shape, dtype=object)) if shape else 1
        if max_voxels is not None and count > max_voxels:
            raise WireError(f"{what}: shape {list(shape)} has {count} voxels, more than this server's limit "
                            f"of {max_voxels}")
        dtype = np.dtype(name)
        out = np.empty(count, dtype)
        total = count * dtype.itemsize
        (nchunks,) = struct.unpack_from("<I", buf, off)
        off += 4
        mv = memoryview(buf)
        done = 0
        for _ in range(nchunks):
            ulen, clen = struct.unpack_from("<QQ", buf, off)
            off += 16
            if done + ulen > total or ulen % dtype.itemsize:
                raise WireError(f"{what}: chunk of {ulen} bytes does not fit shape {list(shape)} ({name})")
            if off + clen > len(buf):
                raise WireError(f"{what}: truncated body (chunk needs {clen} bytes, {len(buf) - off} left)")
            src = mv[off:off + clen]
            nbytes = blosc2.get_cbuffer_sizes(src)[0]
            if nbytes != ulen:
                raise WireError(f"{what}: chunk header says {ulen} bytes, its frame says {nbytes}")
            if ulen:
                blosc2.decompress2(src, dst=out[done // dtype.itemsize:(done + ulen) // dtype.itemsize])
            done += ulen
            off += clen
        if done != total:
            raise WireError(f"{what}: payload has {done} bytes, shape {list(shape)} ({name}) needs {total}")
        return out.reshape(shape)
    except struct.error as e:
        raise WireError(f"{what}: truncated or malformed packed array ({e})") from None
    except (RuntimeError, ValueError) as e:
        if isinstance(e, WireError):
            raise
        raise WireError(f"{what}: could not decompress ({e})") from None
