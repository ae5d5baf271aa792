"""Per-row data of an index that may be made of several segments, read without copying it.

An index version is a base folder plus delta segments (see :mod:`shared.index`); each folder holds its
own rows' files. These classes give one row-numbered view over them, so loading a version never
concatenates (or reads) the base's files: a new version costs reading its delta only.

- :class:`Column`: rows of one per-row array (labels, clusters, class predictions...) over the
  segments' memory-mapped arrays; ``column[rows]`` reads just those rows.
- :class:`FileRows`: a ``.npy`` file's rows read with ``pread`` on demand, never mapped, so what
  a query reads stays in the page cache and out of the process's resident memory.
- :class:`IdTable`: image ids. A 64-character hex id (a content hash) is stored as its 32 bytes,
  with one sorted order of rows per segment (``order.npy``) for lookups by id: 36 bytes a row on disk,
  read on demand (memory-mapped), instead of 256 bytes a row of Python-side strings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
DIGEST = 32  # bytes of a hex id stored as binary


class FileRows:
    """Rows of a 2-D ``.npy`` file, read by ``pread`` (no mapping, no whole read).

    Args:
        path: a C-ordered ``.npy`` file.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{path} is Fortran-ordered")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __getitem__(self, rows: Any) -> np.ndarray:
        """The given rows (an int array; runs of consecutive rows are read in one call)."""
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        if not len(rows):
            return out
        ascending = bool(np.all(rows[1:] > rows[:-1]))  # unique and sorted: read straight into ``out``
        order = None if ascending else np.argsort(rows, kind="stable")
        sorted_rows = rows if order is None else rows[order]
        into = out if order is None else np.empty_like(out)
        buf = into.reshape(-1).view(np.uint8).data
        # one read per run of consecutive rows (a row repeated is read again); a plain loop: a query reads
        # a few dozen rows, where numpy's per-call cost would be most of the work
        listed = sorted_rows.tolist()
        rb, base, fd, read = self.row_bytes, self.offset, self._fd, os.preadv
        i, n = 0, len(listed)
        while i < n:
            j = i + 1
            while j < n and listed[j] == listed[j - 1] + 1:
                j += 1
            if read(fd, [buf[i * rb : j * rb]], base + listed[i] * rb) != (j - i) * rb:
                raise OSError(f"{self.path}: short read at row {listed[i]}")
            i = j
        if order is not None:
            out[order] = into
        return out


class Column:
    """One per-row array over several segments (row ``offsets[i] + j`` is ``parts[i][j]``).

    Indexing with an int gives that row; with an int array, those rows (in the order given). Whole-array
    operations (``np.asarray(column)``) concatenate: only for paths that scan every row anyway.
    """

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts]).astype(np.int64)
        first = self.parts[0]
        self.dtype = np.dtype(first.dtype)
        self.shape: tuple[int, ...] = (int(self.offsets[-1]), *tuple(first.shape[1:]))
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, rows: Any) -> Any:
        if isinstance(rows, int | np.integer):
            row = int(rows) + (len(self) if rows < 0 else 0)
            part = int(np.searchsorted(self.offsets, row, side="right")) - 1
            return self.parts[part][row - int(self.offsets[part])]
        if isinstance(rows, tuple) or isinstance(rows, slice):
            return np.asarray(self)[rows]
        rows = np.asarray(rows)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64, copy=False)
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        which = np.searchsorted(self.offsets, rows, side="right") - 1
        for part in np.unique(which):
            sel = which == part
            out[sel] = self.parts[part][rows[sel] - self.offsets[part]]
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = np.concatenate([np.asarray(p) for p in self.parts])
        return out.astype(dtype) if dtype is not None else out

    # comparisons read every row, as they would on an array
    def __eq__(self, other: object) -> Any:
        return np.asarray(self) == other

    def __ne__(self, other: object) -> Any:
        return np.asarray(self) != other

    def __ge__(self, other: Any) -> Any:
        return np.asarray(self) >= other

    def __gt__(self, other: Any) -> Any:
        return np.asarray(self) > other

    def __le__(self, other: Any) -> Any:
        return np.asarray(self) <= other

    def __lt__(self, other: Any) -> Any:
        return np.asarray(self) < other

    __hash__ = None  # type: ignore[assignment]


def column(parts: Sequence[Any]) -> Any:
    """The parts as one row-indexed array: the part itself when there is one (no wrapper, no copy)."""
    return parts[0] if len(parts) == 1 else Column(parts)


def compact_ids(ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """``ids`` as stored in ``ids.npy``: uint8 (n, 32) when every id is a 64-character lowercase hex
    string (a content hash), else the strings (``U64``)."""
    arr = np.asarray(ids)
    if arr.dtype == np.uint8 and arr.ndim == 2:
        return arr
    strings = arr.astype("U64")
    if len(strings) and all(_HEX64.match(s) for s in strings.tolist()):
        return np.frombuffer(bytes.fromhex("".join(strings.tolist())), np.uint8).reshape(len(strings), DIGEST)
    if not len(strings):
        return np.zeros((0, DIGEST), np.uint8)
    return strings


def id_order(keys: np.ndarray) -> np.ndarray:
    """Rows sorted by id (``order.npy``): int32 while rows fit, int64 beyond."""
    order = np.argsort(_sortable(keys), kind="stable")
    return order.astype(np.int32 if len(keys) < 2**31 else np.int64)


def _sortable(keys: np.ndarray) -> np.ndarray:
    """Keys in a form numpy sorts and searches: 32-byte strings for binary ids."""
    if keys.dtype == np.uint8:
        return np.ascontiguousarray(keys).view(f"S{DIGEST}").reshape(len(keys))
    return keys


def _query_keys(ids: Sequence[str], binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """(keys comparable with a table's sorted keys, mask of ids that can be in it at all)."""
    if not binary:
        return np.asarray(list(ids), dtype="U64"), np.ones(len(ids), bool)
    ok = np.array([bool(_HEX64.match(i)) for i in ids], dtype=bool)
    raw = b"".join(bytes.fromhex(i) if good else bytes(DIGEST) for i, good in zip(ids, ok, strict=True))
    return np.frombuffer(raw, f"S{DIGEST}"), ok


class IdTable:
    """Image ids of an index's rows, over its segments.

    Args:
        parts: per segment, (keys, order): keys as :func:`compact_ids` stores them (memory-mapped is
            fine), order as :func:`id_order` gives (``None``: sorted here).
    """

    def __init__(self, parts: Sequence[tuple[np.ndarray, np.ndarray | None]]):
        self.keys = [k for k, _ in parts]
        self.orders = [o if o is not None and len(o) == len(k) else id_order(k) for k, o in parts]
        self.offsets = np.cumsum([0] + [len(k) for k in self.keys]).astype(np.int64)

    @classmethod
    def of(cls, ids: Sequence[str] | np.ndarray) -> IdTable:
        """A one-segment table of ``ids`` (strings)."""
        keys = compact_ids(ids)
        return cls([(keys, id_order(keys))])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _id(self, row: int) -> str:
        part = int(np.searchsorted(self.offsets, row, side="right")) - 1
        key = self.keys[part][row - int(self.offsets[part])]
        return bytes(np.asarray(key, np.uint8)).hex() if self.keys[part].dtype == np.uint8 else str(key)

    def __getitem__(self, rows: Any) -> Any:
        """The id (str) of a row, or an array of ids (``U64``) of an int array of rows."""
        if isinstance(rows, int | np.integer):
            return self._id(int(rows) + (len(self) if rows < 0 else 0))
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        return np.array([self._id(int(r)) for r in rows], dtype="U64")

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """Every id as strings (``U64``): O(n), for paths that need them all."""
        parts = []
        for keys in self.keys:
            if keys.dtype == np.uint8:
                text = np.ascontiguousarray(keys).tobytes().hex()
                parts.append(np.array([text[i : i + 64] for i in range(0, len(text), 64)], dtype="U64"))
            else:
                parts.append(np.asarray(keys, dtype="U64"))
        out = np.concatenate(parts) if parts else np.zeros(0, "U64")
        return out.astype(dtype) if dtype is not None else out

    def __iter__(self) -> Iterator[str]:
        """Every id (str), row order: O(n), for paths that need them all."""
        return iter(np.asarray(self).tolist())

    def sort_key(self) -> np.ndarray:
        """int64 (n,) each row's rank by id within its segment: sorts rows as their ids do (within a
        segment) without turning the ids into strings."""
        out = np.empty(len(self), np.int64)
        for part, order in enumerate(self.orders):
            start = int(self.offsets[part])
            out[start + np.asarray(order, dtype=np.int64)] = np.arange(len(order))
        return out

    def tolist(self) -> list[str]:
        return list(np.asarray(self).tolist())

    def astype(self, dtype: Any) -> np.ndarray:
        return np.asarray(self).astype(dtype)

    def part_rows_of(self, part: int, image_ids: Sequence[str]) -> np.ndarray:
        """int64 rows (within segment ``part``) of ids, -1 where that segment lacks them."""
        keys, order = self.keys[part], self.orders[part]
        out = np.full(len(image_ids), -1, np.int64)
        if not len(image_ids) or not len(keys):
            return out
        binary = keys.dtype == np.uint8
        wanted, ok = _query_keys(image_ids, binary)
        table = _sortable(keys) if binary else keys
        pos = np.minimum(np.searchsorted(table, wanted, sorter=order), len(keys) - 1)
        rows = np.asarray(order[pos], dtype=np.int64)
        found = ok & (np.asarray(table[rows]) == wanted)
        out[found] = rows[found]
        return out

    def rows_of_hex(self, hex_ids: np.ndarray) -> np.ndarray:
        """:meth:`rows_of` for many ids given as ASCII bytes (``S64``, e.g. a classifier's predictions):
        vectorised, without a Python string per id. Ids that are not 64 hex characters are not found."""
        hex_ids = np.asarray(hex_ids, dtype="S64")
        out = np.full(len(hex_ids), -1, np.int64)
        if not len(hex_ids):
            return out
        ok = np.char.str_len(hex_ids) == 2 * DIGEST
        text = b"".join(np.where(ok, hex_ids, b"0" * 2 * DIGEST).tolist())
        try:
            raw = bytes.fromhex(text.decode("ascii"))
        except ValueError:  # a non-hex id among them: one at a time
            return self.rows_of([i.decode("ascii", "replace") for i in hex_ids.tolist()])
        wanted = np.frombuffer(raw, f"S{DIGEST}")
        for part, (keys, order) in enumerate(zip(self.keys, self.orders, strict=True)):
            todo = np.flatnonzero((out < 0) & ok)
            if not len(todo) or not len(keys):
                continue
            if keys.dtype != np.uint8:  # string ids: compare as strings
                rows = self.part_rows_of(part, [hex_ids[i].decode() for i in todo])
            else:
                table = _sortable(keys)
                pos = np.minimum(np.searchsorted(table, wanted[todo], sorter=order), len(keys) - 1)
                rows = np.asarray(order[pos], dtype=np.int64)
                rows = np.where(np.asarray(table[rows]) == wanted[todo], rows, -1)
            hit = rows >= 0
            out[todo[hit]] = rows[hit] + self.offsets[part]
        return out

    def rows_of(self, image_ids: Sequence[str]) -> np.ndarray:
        """int64 (m,) the first row of each id (the earliest segment holding it), -1 if not indexed."""
        ids = list(image_ids)
        out = np.full(len(ids), -1, np.int64)
        for part in range(len(self.keys)):
            todo = np.flatnonzero(out < 0)
            if not len(todo):
                break
            rows = self.part_rows_of(part, [ids[i] for i in todo])
            hit = rows >= 0
            out[todo[hit]] = rows[hit] + self.offsets[part]
        return out

    def row_of(self, image_id: str) -> int | None:
        row = int(self.rows_of([image_id])[0])
        return row if row >= 0 else None

    def repeats(self) -> np.ndarray:
        """int64 rows of later segments whose id an earlier segment holds already (sorted): costs a lookup
        per row of the later segments only, never a pass over the base."""
        out = []
        for part in range(1, len(self.keys)):
            later = IdTable([(self.keys[part], self.orders[part])])
            earlier = IdTable(list(zip(self.keys[:part], self.orders[:part], strict=True)))
            ids = list(np.asarray(later))
            seen = earlier.rows_of(ids) >= 0
            # an id twice within this segment: its later row is a repeat too
            _, first = np.unique(np.asarray(ids), return_index=True)
            within = np.ones(len(ids), bool)
            within[first] = False
            out.append(np.flatnonzero(seen | within) + self.offsets[part])
        if not out:
            return np.zeros(0, np.int64)
        return np.sort(np.concatenate(out)).astype(np.int64)
