"""Calibration/verification data: folders of .npz (plain, compressed, Fortran-ordered),
batching across files (exact batches for a pinned batch size), limits and validation."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.calib_data import InputSpec, mmap_npz, open_dataset
from qcompile.errors import DataError

SPEC = [InputSpec("x", np.dtype(np.float32), (None, 2, 4)), InputSpec("m", np.dtype(np.int64), (None, 3))]


@pytest.fixture
def folder(tmp_path):
    """Three files (3, 5 and 2 samples) in three layouts; returns (folder, all samples in order)."""
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((n, 2, 4)).astype(np.float32) for n in (3, 5, 2)]
    ms = [rng.integers(0, 100, (n, 3)).astype(np.int64) for n in (3, 5, 2)]
    np.savez(tmp_path / "a.npz", x=xs[0], m=ms[0])
    np.savez_compressed(tmp_path / "b.npz", x=xs[1], m=ms[1])
    np.savez(tmp_path / "c.npz", x=np.asfortranarray(xs[2]), m=np.asfortranarray(ms[2]))
    return tmp_path, {"x": np.concatenate(xs), "m": np.concatenate(ms)}


@pytest.mark.parametrize("batch,exact,sizes", [
    (4, False, [4, 4, 2]),
    (4, True, [4, 4]),
    (3, True, [3, 3, 3]),
    (7, False, [7, 3]),
    (1, False, [1] * 10),
    (10, True, [10]),
])
def test_batches_cross_file_boundaries_in_order(folder, batch, exact, sizes):
    path, ref = folder
    ds = open_dataset(path, SPEC)
    assert ds.num_samples == 10
    got = list(ds.batches(batch, exact=exact))
    assert [b["x"].shape[0] for b in got] == sizes
    for key in ("x", "m"):
        cat = np.concatenate([b[key] for b in got])
        assert cat.dtype == ref[key].dtype
        np.testing.assert_array_equal(cat, ref[key][: sum(sizes)])


@pytest.mark.parametrize("batch,limit,exact,sizes", [(4, 6, False, [4, 2]), (4, 6, True, [4]), (2, 100, False, [2] * 5)])
def test_batches_respect_the_limit(folder, batch, limit, exact, sizes):
    path, ref = folder
    got = list(open_dataset(path, SPEC).batches(batch, limit=limit, exact=exact))
    assert [b["x"].shape[0] for b in got] == sizes
    np.testing.assert_array_equal(np.concatenate([b["x"] for b in got]), ref["x"][: sum(sizes)])


def test_exact_batch_larger_than_the_data_is_a_data_error(folder):
    path, _ = folder
    with pytest.raises(DataError):
        list(open_dataset(path, SPEC).batches(11, exact=True))


def test_mmap_of_uncompressed_npz_matches_numpy(tmp_path):
    rng = np.random.default_rng(1)
    c_order = rng.standard_normal((5, 3, 2)).astype(np.float32)
    f_order = np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float64))
    np.savez(tmp_path / "plain.npz", a=c_order, b=f_order)
    mapped = mmap_npz(tmp_path / "plain.npz")
    assert mapped is not None and set(mapped) == {"a", "b"}
    np.testing.assert_array_equal(mapped["a"], c_order)
    np.testing.assert_array_equal(mapped["b"], f_order)
    np.savez_compressed(tmp_path / "packed.npz", a=c_order)
    assert mmap_npz(tmp_path / "packed.npz") is None  # compressed: read through numpy instead
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    assert mmap_npz(tmp_path / "junk.npz") is None


@pytest.mark.parametrize("saver", ["savez", "savez_compressed"])
def test_nan_is_found_in_any_sample(tmp_path, saver):
    x = np.zeros((40, 2, 4), np.float32)
    x[37, 1, 2] = np.nan  # beyond the first slices the check reads
    getattr(np, saver)(tmp_path / "d.npz", x=x, m=np.zeros((40, 3), np.int64))
    with pytest.raises(DataError) as info:
        open_dataset(tmp_path / "d.npz", SPEC)
    assert "NaN" in str(info.value) and "sample 37" in str(info.value)


def test_files_that_disagree_on_sample_count(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2, 4), np.float32), m=np.zeros((3, 3), np.int64))
    with pytest.raises(DataError) as info:
        open_dataset(tmp_path / "d.npz", SPEC)
    assert "axis 0" in str(info.value)


def test_empty_folder(tmp_path):
    with pytest.raises(DataError):
        open_dataset(tmp_path, SPEC)


def test_synthetic_data_follows_the_specs():
    ds = open_dataset(None, SPEC, synthetic_samples=3, seed=4)
    batches = list(ds.batches(1))
    assert len(batches) == 3 and ds.sha256() is None
    for b in batches:
        assert b["x"].shape == (1, 2, 4) and b["x"].dtype == np.float32
        assert b["m"].shape == (1, 3) and b["m"].dtype == np.int64
    again = list(open_dataset(None, SPEC, synthetic_samples=3, seed=4).batches(1))
    for a, b in zip(batches, again):  # seeded: reproducible
        np.testing.assert_array_equal(a["x"], b["x"])
