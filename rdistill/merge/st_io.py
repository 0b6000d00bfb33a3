"""Streaming safetensors I/O without mmap or whole-shard buffers.

Reading: a model directory's shard headers give every tensor's file, dtype, shape and byte range;
a tensor is read with one `readinto` into its own buffer, so a worker holds only the tensors it
is merging (an mmap would also keep every touched page of the inputs resident).
Writing: the output's headers are known before any tensor is merged (names, shapes, dtypes), so
each shard file is created at its full size with its header, and workers `pwrite` each merged
tensor at its offset as soon as it is computed: no shard is ever held in memory, and any number
of workers can fill the same shard.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from rdistill.errors import DataError

ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32,
             "I64": torch.int64, "BOOL": torch.bool}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX = "model.safetensors.index.json"


class InputError(DataError):
    """An input model is missing, unreadable or incompatible; the message names the file."""


@dataclass(frozen=True)
class TensorLoc:
    file: str
    dtype: str
    """safetensors dtype name (BF16, F32, ...)."""
    shape: tuple
    start: int
    """Absolute byte offset in the file."""
    nbytes: int


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header dict, offset of the data section) of one safetensors file."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise InputError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise InputError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: corrupt safetensors header") from None
    return header, 8 + n


def model_tensors(model_dir: str | Path) -> dict[str, TensorLoc]:
    """Every tensor of an HF model directory (sharded or not), by name."""
    d = Path(model_dir)
    if not d.is_dir():
        raise InputError(f"{d}: model directory not found (a merge input must be a local HF model "
                         "directory with safetensors weights)")
    index = d / INDEX
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError):
            raise InputError(f"{index}: unreadable or has no weight_map") from None
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        bins = list(d.glob("*.bin")) + list(d.glob("*.pt"))
        hint = " (it has PyTorch .bin weights: convert them to safetensors)" if bins else ""
        raise InputError(f"{d}: no safetensors weights{hint}")
    out: dict[str, TensorLoc] = {}
    for name in files:
        path = d / name
        if not path.exists():
            raise InputError(f"{path}: listed in {INDEX} but missing")
        header, data = read_header(path)
        size = path.stat().st_size
        for key, info in header.items():
            if key == "__metadata__":
                continue
            b, e = info["data_offsets"]
            if info["dtype"] not in ST_DTYPES or data + e > size:
                raise InputError(f"{path}: tensor {key} has an unsupported dtype or lies past the end "
                                 "of the file (truncated download?)")
            out[key] = TensorLoc(str(path), info["dtype"], tuple(info["shape"]), data + b, e - b)
    return out


def read_tensor(loc: TensorLoc, handles: dict) -> torch.Tensor:
    """Read one tensor into a fresh buffer (handles: an open-file cache per worker)."""
    f = handles.get(loc.file)
    if f is None:
        f = handles[loc.file] = open(loc.file, "rb", buffering=0)
    buf = torch.empty(loc.nbytes, dtype=torch.uint8)
    f.seek(loc.start)
    view = memoryview(buf.numpy())
    got = 0
    while got < loc.nbytes:
        n = f.readinto(view[got:])
        if not n:
            raise InputError(f"{loc.file}: unexpected end of file (truncated?)")
        got += n
    return buf.view(ST_DTYPES[loc.dtype]).reshape(loc.shape)


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple
    dtype: str
    file: str
    """Shard file name (relative to the output directory)."""
    start: int
    """Absolute byte offset in the shard file."""
    nbytes: int


def layout_shards(tensors: list[tuple[str, tuple, str]], max_shard_bytes: int) -> tuple[list[OutTensor], dict]:
    """Place (name, shape, dtype) tensors into shards of at most max_shard_bytes (a bigger tensor
    gets its own); returns the placements and {file: header bytes} to create the files with."""
    groups: list[list] = [[]]
    size = 0
    for name, shape, dtype in tensors:
        n = _numel(shape) * torch.empty(0, dtype=ST_DTYPES[dtype]).element_size()
        if groups[-1] and size + n > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, shape, dtype, n))
        size += n
    names = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    placed, headers = [], {}
    for fname, group in zip(names, groups):
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, n in group:
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data section 8-byte aligned, as safetensors writes it
        headers[fname] = (struct.pack("<Q", len(blob)) + blob, off)
        base = 8 + len(blob)
        placed += [OutTensor(name, shape, dtype, fname, base + header[name]["data_offsets"][0], n)
                   for name, shape, dtype, n in group]
    return placed, headers


def create_shards(out_dir: Path, headers: dict) -> None:
    """Create each shard at full size (sparse until written) with its header in place."""
    for fname, (blob, data_len) in headers.items():
        with open(out_dir / fname, "wb") as f:
            f.write(blob)
            f.truncate(len(blob) + data_len)


def write_tensor(out_dir: str, t: OutTensor, tensor: torch.Tensor, handles: dict) -> None:
    fd = handles.get(t.file)
    if fd is None:
        fd = handles[t.file] = os.open(os.path.join(out_dir, t.file), os.O_WRONLY)
    data = memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], t.start + done)


def write_index(out_dir: Path, placed: list[OutTensor]) -> None:
    if len({t.file for t in placed}) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in placed)},
                 "weight_map": {t.name: t.file for t in placed}}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
