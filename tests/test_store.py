"""The store: the deterministic validation split, its memory-mapped arrays, reduced dtypes, reads in bounded memory."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vs2ray.store import arrays_ready, as_float32, load_activations, to_stored_dtype


def test_validation_split_is_deterministic_and_disjoint():
    from vs2ray.store import train_val_split

    ids = np.arange(1000)
    train, val = train_val_split(ids, 0.1, seed=0)
    assert val.sum() == 100 and not (train & val).any() and (train | val).all()
    shuffled = np.random.default_rng(5).permutation(ids)
    _, val_shuffled = train_val_split(shuffled, 0.1, seed=0)
    assert set(shuffled[val_shuffled]) == set(ids[val])  # depends on the ids, not their order
    assert set(ids[train_val_split(ids, 0.1, seed=1)[1]]) != set(ids[val])


def _parts_table(store: Path) -> dict[str, np.ndarray]:
    """Every column of the store's part files read with pyarrow alone, rows sorted by id."""
    table = pa.concat_tables([pq.read_table(p) for p in sorted(store.glob("part-*.parquet"))])
    order = np.argsort(table["id"].to_numpy())
    out = {}
    for name in table.column_names:
        column = table[name].combine_chunks()
        values = column.to_numpy_ndarray() if isinstance(column.type, pa.FixedShapeTensorType) else column.to_numpy()
        out[name] = values[order]
    return out


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _small_store(directory: Path, images: int = 300, dtype: str = "float32", images_per_part: int = 64) -> Path:
    """A synthetic every-token store (17 tokens × 128, the bundled model's block 1) written by the store's own
    writer, ids spread over its part files: benchmarks/store_scale.py's."""
    import sys

    sys.path.insert(0, str(BENCHMARKS))
    from store_scale import write_synthetic_store

    return write_synthetic_store(directory, images, seed=3, dtype=dtype, images_per_part=images_per_part)


def test_arrays_are_the_parts_sorted_by_id_and_stale_or_unfinished_ones_are_rebuilt_not_read(tmp_path):
    store = _small_store(tmp_path / "store", 300)
    parts = _parts_table(store)
    files = sorted(store.glob("part-*.parquet"))
    first_ids = pq.read_table(files[0])["id"].to_numpy()
    assert len(files) == 5 and np.ptp(first_ids) >= len(first_ids)  # each part's ids spread over the store
    acts = load_activations(store, layers=[1], token_layers=[1])
    np.testing.assert_array_equal(acts.ids, np.arange(300))
    for name in ("cls_1", "tokens_1", "embedding"):
        assert isinstance(acts.stored(name), np.memmap)
        np.testing.assert_array_equal(acts[name], parts[name])
    np.testing.assert_array_equal(acts.labels, parts["label"])

    # a part file replaced after the arrays were built: they no longer match it and are rebuilt
    first = sorted(store.glob("part-*.parquet"))[0]
    table = pq.read_table(first)
    changed = table.set_column(
        table.column_names.index("embedding"), "embedding",
        pa.FixedShapeTensorArray.from_numpy_ndarray(np.zeros((table.num_rows, 64), np.float32) + 7),
    )  # fmt: skip
    pq.write_table(changed.replace_schema_metadata(table.schema.metadata), first)
    assert not arrays_ready(store)
    rebuilt = load_activations(store, layers=[1])
    assert (rebuilt["embedding"][np.isin(rebuilt.ids, table["id"].to_numpy())] == 7).all()

    # arrays whose index was never written (a builder killed mid-way) are not read: they are rebuilt
    (store / "arrays" / "index.json").unlink()
    np.save(store / "arrays" / "embedding.npy", np.zeros((3, 64), np.float32))  # a wrong, half-written array
    again = load_activations(store, layers=[1])
    assert again["embedding"].shape == (300, 64) and arrays_ready(store)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_dtypes_are_stored_small_and_read_back_as_torch_rounds_them(tmp_path, dtype):
    import torch

    values = np.random.default_rng(0).normal(scale=3, size=(64, 17, 128)).astype(np.float32)
    values[0, 0, :4] = [1.0, -2.5, 65504.0, 1e-8]
    stored = to_stored_dtype(values, dtype)
    expected = torch.from_numpy(values).to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(as_float32(stored), expected)  # round to nearest, ties to even, as torch does
    assert stored.nbytes == values.nbytes // 2

    store = _small_store(tmp_path / dtype, 300, dtype)
    reference = _small_store(tmp_path / "float32", 300)  # the same seed in float32
    schema = pq.read_schema(next(store.glob("part-*.parquet")))
    assert schema.field("tokens_1").type.value_type == (pa.float16() if dtype == "float16" else pa.uint16())
    assert schema.field("embedding").type.value_type == pa.float32()  # only block activations are reduced
    small, full = load_activations(store, layers=[1]), load_activations(reference, layers=[1])
    as_torch = torch.from_numpy(np.array(full["tokens_1"])).to(getattr(torch, dtype)).float().numpy()
    np.testing.assert_array_equal(small["tokens_1"], as_torch)
    assert small["tokens_1"].dtype == np.float32
    np.testing.assert_array_equal(small["embedding"], full["embedding"])


def test_pickled_activations_map_their_columns_again_instead_of_carrying_them(tmp_path):
    store = _small_store(tmp_path / "store", 300)
    acts = load_activations(store, layers=[1], token_layers=[1])
    tokens = acts["tokens_1"]  # touched: mapped, and so not pickled
    payload = pickle.dumps(acts)
    assert len(payload) < tokens.nbytes / 20
    unpickled = pickle.loads(payload)
    np.testing.assert_array_equal(unpickled["tokens_1"], tokens)


@pytest.mark.parametrize("read", ["mapped", "pread"])
def test_an_sae_streamed_from_the_store_is_the_sae_trained_in_memory(tmp_path, monkeypatch, read):
    import torch

    from vs2ray.sae import ActivationRows, SAETrainParams, train_sae

    if read == "pread":  # a column larger than a release of mapped pages: scattered rows are read with pread
        monkeypatch.setattr(ActivationRows, "RELEASE_BYTES", 2**20)
    store = _small_store(tmp_path / "store", 300)
    tokens = load_activations(store, layers=[1]).stored("tokens_1").reshape(-1, 128)  # mapped, 5,100 rows
    rows = np.random.default_rng(1).choice(len(tokens), 4000, replace=False)
    params = SAETrainParams(k=8, expansion=2, steps=30, batch_size=256, warmup_steps=5, seed=4)
    in_memory = train_sae(torch.from_numpy(np.array(tokens[rows])), params, log=lambda _: None)
    assert ActivationRows(tokens, rows)._read_scattered == (read == "pread")
    streamed = train_sae(ActivationRows(tokens, rows), params, log=lambda _: None)
    for name, weight in in_memory.sae.state_dict().items():
        assert torch.equal(weight, streamed.sae.state_dict()[name]), name
    assert in_memory.metrics["fvu"] == streamed.metrics["fvu"]
    assert in_memory.losses == streamed.losses
    # every token of chosen images, selected by image (one index per image, not per token)
    images = np.sort(np.random.default_rng(2).choice(300, 200, replace=False))
    by_image = ActivationRows(tokens, images, group=17)
    assert len(by_image) == 200 * 17
    np.testing.assert_array_equal(
        by_image.take(np.array([0, 16, 17, 3399])).numpy(),
        tokens[[images[0] * 17, images[0] * 17 + 16, images[1] * 17, images[199] * 17 + 16]],
    )
    in_memory = train_sae(
        torch.from_numpy(np.array(tokens.reshape(300, 17, 128)[images])).reshape(-1, 128), params, log=lambda _: None
    )
    streamed = train_sae(by_image, params, log=lambda _: None)
    assert in_memory.losses == streamed.losses


def test_an_epoch_larger_than_the_shuffle_window_visits_every_row_once_a_window_at_a_time(monkeypatch):
    import torch

    from vs2ray.sae import BatchOrder

    def epoch(n: int, group: int, batch: int, seed: int = 0) -> list[np.ndarray]:
        order = BatchOrder(n, group, torch.Generator().manual_seed(seed))
        return [order.next(batch).numpy() for _ in range(n // batch)]

    # within the window: exactly the seeded permutation train_sae always drew
    np.testing.assert_array_equal(
        np.concatenate(epoch(1000, 10, 100)), torch.randperm(1000, generator=torch.Generator().manual_seed(0)).numpy()
    )
    monkeypatch.setattr(BatchOrder, "SHUFFLE_ROWS", 300)  # 30 groups of 10 rows a window
    batches = epoch(1200, 10, 100)
    rows = np.concatenate(batches)
    assert sorted(rows) == list(range(1200))  # every row once in the epoch
    windows = [set(np.concatenate(batches[i : i + 3]) // 10) for i in range(0, 12, 3)]
    assert all(len(w) == 30 for w in windows) and set().union(*windows) == set(range(120))  # whole groups a window
    assert not np.array_equal(rows[:300] // 10, np.sort(rows[:300] // 10))  # rows mixed within a window
    np.testing.assert_array_equal(rows, np.concatenate(epoch(1200, 10, 100)))  # seeded
    assert not np.array_equal(rows, np.concatenate(epoch(1200, 10, 100, seed=1)))
    # the positions an int64 draw gives (a window is held as int32), handed out as int64
    generator = torch.Generator().manual_seed(0)
    expected = []
    for chosen in torch.randperm(120, generator=generator).split(30):
        window = (chosen[:, None] * 10 + torch.arange(10)).reshape(-1)
        expected.append(window[torch.randperm(300, generator=generator)])
    np.testing.assert_array_equal(rows, torch.cat(expected).numpy())
    assert all(batch.dtype == np.int64 for batch in batches)


def test_a_trial_trains_and_evaluates_on_a_store_larger_than_the_memory_it_may_add(tmp_path):
    """The process may add 400 MB of private memory (RLIMIT_DATA) above what torch and the model take; the
    token column is 581 MB, and the whole of it does not fit. Its mapped pages do not count: they belong to
    the page cache, which the kernel reclaims as it needs. (What the trial adds is about 130 MB to train and
    400 MB to evaluate, most of it the forward through the blocks after the steering one, part by part.)"""
    import json
    import subprocess
    import sys

    store = _small_store(tmp_path / "train", 70000, images_per_part=4096)
    test = _small_store(tmp_path / "test", 500)
    column_mb = np.load(store / "arrays" / "tokens_1.npy", mmap_mode="r").nbytes / 2**20
    command = [sys.executable, str(BENCHMARKS / "store_scale.py"), "trial", "--train", str(store), "--test", str(test)]
    command += ["--root", str(tmp_path / "root"), "--steps", "30", "--evaluate", "--limit-private-mb", "400"]
    output = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert output.returncode == 0, output.stderr[-3000:]
    result = json.loads(output.stdout.strip().splitlines()[-1])
    assert column_mb > 1.4 * 400 and result["whole_column_fits"] is False  # the limit binds
    assert 0 < result["fvu"] < 1 and 0 < result["val_fvu"] < 1
    assert {"test_top1_zero_shot", "test_top1_vs2", "test_top1_vs2_gated"} <= set(result)


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint16"])
def test_read_rows_reads_the_rows_of_mapped_views_from_their_file(tmp_path, dtype):
    from vs2ray.store import read_rows, row_file

    values = np.random.default_rng(0).normal(size=(40, 5, 6)).astype(np.float32)
    values = values.view(np.uint16)[..., ::2].copy() if dtype == "uint16" else values.astype(dtype)
    np.save(tmp_path / "a.npy", values)
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    index = np.array([7, 0, 199, 3, 3, 150])
    flat = mapped.reshape(-1, 6)  # an all-token column read as rows
    np.testing.assert_array_equal(read_rows(flat, index), np.asarray(flat)[index])
    tail = flat[50:]  # a view that starts inside the file
    np.testing.assert_array_equal(read_rows(tail, np.array([7, 0, 149])), np.asarray(tail)[[7, 0, 149]])
    narrow = mapped[:, :, :3].reshape(-1, 3)  # a view whose rows are 3 of every 6 values: strided rows
    np.testing.assert_array_equal(read_rows(narrow, index), np.asarray(narrow)[index])
    assert row_file(np.asarray(flat).copy()) is None and row_file(mapped[:, :, ::2].reshape(-1, 3)) is None
    with open(tmp_path / "a.npy", "r+b") as file:
        file.truncate(file.seek(0, 2) - 10)  # the file cut short after it was mapped
    with pytest.raises(OSError, match="cut short"):
        read_rows(flat, np.array([199]))
