"""A base model's safetensors checkpoint, read one tensor at a time.

The one home of a checkpoint's layout: ``model.safetensors``, or shards named by
``model.safetensors.index.json``'s weight map; each file an 8-byte header length, a JSON header
(name -> dtype, shape, byte offsets) and the data. ``checkpoint_entries`` checks the whole layout
before anything is built (shards present, not truncated, the index naming only tensors its shards
hold), so a bad checkpoint is refused before a model is touched; ``read_tensor`` then reads one
tensor straight into its own buffer: no memory map, whose touched pages would stay resident (and
counted) until the whole file is closed, so reading a model costs one tensor at a time.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class Entry:
    """Where one tensor lives: its file, the file's data start, and its header entry."""

    path: Path
    data_start: int
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


def has_safetensors(base_dir: Path) -> bool:
    return (Path(base_dir) / INDEX).is_file() or (Path(base_dir) / SINGLE).is_file()


def shard_files(base_dir: Path) -> tuple[list[str], dict | None]:
    """(the checkpoint's files, its index or None for a single file); refused when a listed shard is missing."""
    index_path = base_dir / INDEX
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            files = sorted(set(index["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"{index_path} is not a valid safetensors index ({type(exc).__name__}: {exc}); it "
                              "must be JSON with a weight_map of tensor name -> shard file. Copy it from the "
                              "original checkpoint") from None
        missing = [f for f in files if not (base_dir / f).is_file()]
        if missing:
            raise ConfigError(f"{base_dir} lists shard {missing[0]} in {INDEX} but the file is missing "
                              f"({len(missing)} of {len(files)} shards missing); copy the whole checkpoint")
        return files, index
    if (base_dir / SINGLE).is_file():
        return [SINGLE], None
    raise ConfigError(f"{base_dir} holds no {SINGLE} (or sharded index): this reads safetensors checkpoints")


def read_header(path: Path) -> tuple[int, dict]:
    """(bytes before the data, the header) of a safetensors file; refused when it is not one."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > path.stat().st_size - 8:
                raise ValueError(f"its header claims {length} bytes but the file has {path.stat().st_size}")
            return 8 + length, json.loads(handle.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable safetensors file ({exc}); copy it again from the original "
                          "checkpoint") from None


def checkpoint_entries(base_dir: str | Path) -> dict[str, Entry]:
    """Every tensor of the checkpoint, by name, after checking the layout: each shard's header
    readable and its data all there (a truncated download is caught here), and every tensor the
    index names present in the shard it names."""
    base_dir = Path(base_dir)
    files, index = shard_files(base_dir)
    entries: dict[str, Entry] = {}
    for file in files:
        path = base_dir / file
        data_start, header = read_header(path)
        size = path.stat().st_size - data_start
        for key, value in header.items():
            if key == "__metadata__":
                continue
            start, end = value["data_offsets"]
            if end > size:
                raise ConfigError(f"{path} is truncated: tensor {key} ends at byte {end} of the data but the file "
                                  f"holds {size}; copy the shard again from the original checkpoint")
            entries[key] = Entry(path, data_start, value["dtype"], tuple(value["shape"]), (start, end))
    if index is not None:
        absent = [(key, file) for key, file in index["weight_map"].items()
                  if key not in entries or entries[key].path.name != file]
        if absent:
            key, file = absent[0]
            raise ConfigError(f"{base_dir / INDEX} names tensor {key} in {file}, which does not hold it ({len(absent)} "
                              "such tensors); the index and the shards come from different checkpoints")
    return entries


def read_tensor(path: Path, data_start: int, entry: dict) -> torch.Tensor:
    """One tensor (a header ``entry`` of the file at ``path``), read straight into its own buffer."""
    start, end = entry["data_offsets"]
    buffer = torch.empty(end - start, dtype=torch.uint8)
    with open(path, "rb") as handle:
        handle.seek(data_start + start)
        handle.readinto(buffer.numpy().data)
    return buffer.view(TORCH_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def read_entry(entry: Entry) -> torch.Tensor:
    return read_tensor(entry.path, entry.data_start, {"data_offsets": entry.offsets, "dtype": entry.dtype,
                                                      "shape": entry.shape})


def read_rows(entry: Entry, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of a tensor (its first dimension), reading only their bytes: a sharded load
    takes its own slice of each tensor without holding the rest."""
    row_bytes = entry.nbytes // entry.shape[0] if entry.shape and entry.shape[0] else 0
    first = entry.offsets[0] + start * row_bytes
    part = Entry(entry.path, entry.data_start, entry.dtype, (stop - start, *entry.shape[1:]),
                 (first, first + (stop - start) * row_bytes))
    return read_entry(part)
