"""Row data over segments (shared/rows.py) and the 8-bit re-ranking codes (shared/refine.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from shared.refine import RefineCodec, rerank_scores
from shared.rows import Column, FileRows, IdTable, compact_ids


def _ids(n: int, start: int = 0) -> list[str]:
    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(start, start + n)]


def test_file_rows_read_what_a_load_reads(tmp_path: Path) -> None:
    a = np.random.default_rng(0).integers(0, 255, (1000, 33), dtype=np.uint8)
    np.save(tmp_path / "a.npy", a)
    rows = FileRows(tmp_path / "a.npy")
    wanted = np.array([5, 3, 4, 999, 0, 3, 6])  # unsorted, repeated, runs
    np.testing.assert_array_equal(rows[wanted], a[wanted])
    ascending = np.array([0, 1, 2, 10, 998, 999])  # read straight into the result
    np.testing.assert_array_equal(rows[ascending], a[ascending])
    assert len(rows) == 1000 and rows[np.array([], np.int64)].shape == (0, 33)


def test_column_reads_rows_across_parts_without_joining_them() -> None:
    a = np.arange(700, dtype=np.int32).reshape(350, 2)
    col = Column([a[:100], a[100:101], a[101:]])
    rows = np.array([349, 0, 100, 101, 99, 200])
    np.testing.assert_array_equal(col[rows], a[rows])
    np.testing.assert_array_equal(col[100], a[100])
    np.testing.assert_array_equal(np.asarray(col), a)
    assert col.shape == (350, 2) and len(col) == 350


def test_ids_are_stored_as_digests_and_found_by_bisection() -> None:
    ids = _ids(500)
    keys = compact_ids(ids)
    assert keys.dtype == np.uint8 and keys.shape == (500, 32)  # 32 bytes an id, not 256 of U64
    table = IdTable.of(ids)
    assert table[123] == ids[123] and table.row_of(ids[123]) == 123
    np.testing.assert_array_equal(table.rows_of(ids[::-1]), np.arange(500)[::-1])
    assert table.rows_of(["not-a-hash", "0" * 64, ids[0].upper()]).tolist() == [-1, -1, -1]
    np.testing.assert_array_equal(table.rows_of_hex(np.array(ids, dtype="S64")), np.arange(500))
    np.testing.assert_array_equal(np.asarray(table), np.array(ids))
    # rows in id order, without strings
    assert [ids[r] for r in np.argsort(table.sort_key())] == sorted(ids)
    # ids that are not content hashes are kept as strings
    other = IdTable.of(["b", "a", "c"])
    assert other.row_of("a") == 1 and other[2] == "c"


def test_ids_over_segments_keep_the_first_row_and_name_the_repeats() -> None:
    ids = _ids(60)
    keys = compact_ids(ids)
    # base rows 0-39, a delta 40-59, and a later delta that repeats 3 of the base and one of its own
    again = compact_ids([ids[5], ids[7], "f" * 64, ids[9], "f" * 64])
    table = IdTable([(keys[:40], None), (keys[40:], None), (again, None)])
    np.testing.assert_array_equal(table.rows_of(ids), np.arange(60))
    assert table.row_of("f" * 64) == 62
    assert table.repeats().tolist() == [60, 61, 63, 64]
    assert table[45] == ids[45] and table[62] == "f" * 64


def test_refine_codes_rank_like_the_vectors() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codec = RefineCodec.train(x)
    codes = codec.encode(x)
    assert codes.dtype == np.uint8 and np.abs(codec.decode(codes) - x).max() <= codec.step.max()
    q = x[:5]
    rows = np.tile(np.arange(200), (5, 1))
    rows[:, -3:] = -1  # no candidate: scored -inf
    got = rerank_scores(codec, codes, rows, q)
    exact = q @ x[:200].T
    assert np.isneginf(got[:, -3:]).all()
    np.testing.assert_allclose(got[:, :-3], exact[:, :-3], atol=0.02)
    # the best candidate is the query's own row, as with the exact vectors
    assert (got.argmax(1) == np.arange(5)).all()
    # unit: cosines with the decoded rows (their length divided out), computed without decoding them
    decoded = codec.decode(codes[:200])
    cosines = q @ decoded.T / np.linalg.norm(decoded, axis=1)
    unit = rerank_scores(codec, codes, rows, q, unit=True)
    np.testing.assert_allclose(unit[:, :-3], cosines[:, :-3], atol=1e-5)
    assert np.diag(unit[:, :5]).min() > 0.999  # a row's own query scores (almost) 1


def test_refine_scores_agree_however_the_codes_are_held() -> None:
    """In-memory codes are scored a block of queries at a time, codes read through a file (or any other
    row reader) once per distinct row, one query alone without either: the same scores every way."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3000, 48)).astype(np.float32)
    codec = RefineCodec.train(x)
    codes = codec.encode(x)
    q = rng.standard_normal((40, 48)).astype(np.float32)  # more queries than a block
    rows = rng.integers(0, 3000, (40, 30))
    rows[3, 10:] = -1
    rows[7] = -1

    class Reader:  # not an array: the de-duplicating path
        def __getitem__(self, at: np.ndarray) -> np.ndarray:
            return codes[at]

    for unit in (False, True):
        held = rerank_scores(codec, codes, rows, q, unit=unit)
        read = rerank_scores(codec, Reader(), rows, q, unit=unit)
        alone = np.concatenate(
            [rerank_scores(codec, codes, rows[i : i + 1], q[i : i + 1], unit=unit) for i in range(40)]
        )
        assert np.isneginf(held[7]).all() and np.isneginf(held[3, 10:]).all()
        np.testing.assert_allclose(held, read, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(held, alone, rtol=1e-5, atol=1e-4)
