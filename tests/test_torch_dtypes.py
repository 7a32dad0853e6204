"""The torch dtype table of csrc/core/torch_dtypes.c (mlutils._core.torch_dtypes) against its peers:
torch itself, NumPy, ml_dtypes and the safetensors library."""
import numpy as np
import pytest

from mlutils import _core, _ptload

torch = pytest.importorskip("torch")


def rows():
    return _core.torch_dtypes()


def test_rows_are_named_and_unique():
    table = rows()
    assert isinstance(table, tuple) and len(table) == 27
    assert all(isinstance(r, _core.TorchDtype) for r in table)
    r = table[0]
    assert (r.name, r.storage_class, r.itemsize) == tuple(r)[:3]
    assert len({r.name for r in table}) == len(table)
    classes = [r.storage_class for r in table if r.storage_class is not None]
    assert len(set(classes)) == len(classes) == 12


@pytest.mark.parametrize("row", rows(), ids=lambda r: r.name)
def test_row_matches_torch(row):
    dt = getattr(torch, row.name, None)
    if dt is None:
        pytest.skip(f"torch {torch.__version__} has no {row.name}")
    assert torch.empty(0, dtype=dt).element_size() == row.itemsize
    if row.storage_class is not None:
        # the legacy storage class is typed with this dtype
        assert getattr(torch, row.storage_class)(0).dtype == dt


@pytest.mark.parametrize("row", rows(), ids=lambda r: r.name)
def test_row_matches_numpy(row):
    if row.numpy is not None:
        assert np.dtype(row.numpy).itemsize == row.itemsize
        dt = getattr(torch, row.name, None)
        if dt is not None:
            assert torch.empty(2, dtype=dt).numpy().dtype == np.dtype(row.numpy)
    if row.ml_dtypes is not None:
        ml_dtypes = pytest.importorskip("ml_dtypes")
        assert np.dtype(getattr(ml_dtypes, row.ml_dtypes)).itemsize == row.itemsize
        assert _ptload.numpy_dtype(row.name) == np.dtype(getattr(ml_dtypes, row.ml_dtypes))
    if row.numpy is None and row.ml_dtypes is None:
        # a raw view of the same size
        assert _ptload.numpy_dtype(row.name).itemsize == row.itemsize


def test_safetensors_names_match_the_library():
    st_torch = pytest.importorskip("safetensors.torch")
    ours = {r.safetensors: r.name for r in rows() if r.safetensors is not None}
    theirs = {code: str(dt)[len("torch."):] for code, dt in st_torch._TYPES.items()}
    for code, name in theirs.items():
        assert ours.get(code) == name, code
    # codes newer than this safetensors' torch table: as mlutils' safetensors reader names them
    from mlutils import _safetensors

    for code, name in ours.items():
        assert _safetensors._TORCH_NAMES[code] == name, code
