"""Zarr replay buffer: diffusion_policy layout in zarr format 2 and 3, directory and zip stores, validation errors."""

from __future__ import annotations

import json
import os
import zipfile

import numcodecs
import numpy as np
import pytest
import zarr
from fm_policy.datasets.errors import DatasetError
from fm_policy.datasets.replay_buffer import ReplayBuffer

EPISODE_LENGTHS = (7, 12, 5)


def _episode(length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "action": rng.uniform(0, 512, (length, 2)).astype(np.float32),
        "state": rng.uniform(0, 512, (length, 5)).astype(np.float32),
        "img": rng.integers(0, 255, (length, 8, 8, 3), dtype=np.uint8),
    }


def _write_buffer(path: str, zarr_format: int = 2) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    episodes = [_episode(n, rng) for n in EPISODE_LENGTHS]
    buffer = ReplayBuffer.create(path, zarr_format=zarr_format, attrs={"env_id": "test"})
    for i, ep in enumerate(episodes):
        buffer.add_episode(ep, episode_meta={"env_seed": i})
    return episodes


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_round_trip(tmp_path, zarr_format):
    path = str(tmp_path / "demo.zarr")
    episodes = _write_buffer(path, zarr_format)
    with ReplayBuffer.open(path) as buffer:
        assert buffer.zarr_format == zarr_format
        assert buffer.n_episodes == 3 and buffer.n_steps == sum(EPISODE_LENGTHS)
        assert buffer.episode_ends.dtype == np.int64
        np.testing.assert_array_equal(buffer.episode_ends, np.cumsum(EPISODE_LENGTHS))
        assert buffer.keys == ["action", "img", "state"]
        assert buffer.attrs["env_id"] == "test"
        for i, ep in enumerate(episodes):
            got = buffer.get_episode(i)
            for key in ep:
                np.testing.assert_array_equal(got[key], ep[key])
        np.testing.assert_array_equal(buffer.meta["env_seed"][:], [0, 1, 2])
        # chunks are split along time only
        for key in buffer.keys:
            assert buffer.array(key).chunks[1:] == buffer.array(key).shape[1:]
        loaded = buffer.load(["action"])
        np.testing.assert_array_equal(loaded["action"], np.concatenate([e["action"] for e in episodes]))


def test_format2_files_and_blosc_lz4(tmp_path):
    """What we write by default is plain zarr v2 on disk: diffusion_policy's zarr-2 loader reads it."""
    path = tmp_path / "demo.zarr"
    _write_buffer(str(path))
    zarray = json.loads((path / "data" / "action" / ".zarray").read_text())
    assert zarray["zarr_format"] == 2
    assert zarray["compressor"]["id"] == "blosc" and zarray["compressor"]["cname"] == "lz4"
    assert json.loads((path / "meta" / "episode_ends" / ".zarray").read_text())["compressor"] is None
    assert (path / ".zgroup").exists()


def _write_raw_v2_array(folder, array: np.ndarray, chunk_steps: int, compressor) -> None:
    """Write a zarr v2 array byte-for-byte as zarr 2.x does (spec v2: .zarray JSON + one file per chunk)."""
    os.makedirs(folder)
    meta = {
        "zarr_format": 2,
        "shape": list(array.shape),
        "chunks": [chunk_steps, *array.shape[1:]],
        "dtype": array.dtype.str,
        "compressor": compressor.get_config() if compressor else None,
        "fill_value": 0,
        "filters": None,
        "order": "C",
    }
    with open(os.path.join(folder, ".zarray"), "w") as f:
        json.dump(meta, f)
    for c, start in enumerate(range(0, len(array), chunk_steps)):
        chunk = np.zeros((chunk_steps, *array.shape[1:]), array.dtype)
        part = array[start : start + chunk_steps]
        chunk[: len(part)] = part
        raw = chunk.tobytes()
        name = ".".join([str(c)] + ["0"] * (array.ndim - 1))
        with open(os.path.join(folder, name), "wb") as f:
            f.write(compressor.encode(raw) if compressor else raw)


def _pusht_cchi_like(root) -> dict[str, np.ndarray]:
    """Arrays shaped like diffusion_policy's pusht_cchi_v7_replay.zarr (a few short episodes)."""
    rng = np.random.default_rng(1)
    n = 40
    return {
        "img": rng.integers(0, 255, (n, 96, 96, 3), dtype=np.uint8),
        "state": rng.uniform(0, 512, (n, 5)).astype(np.float32),
        "keypoint": rng.uniform(0, 512, (n, 9, 2)).astype(np.float32),
        "action": rng.uniform(0, 512, (n, 2)).astype(np.float32),
        "n_contacts": rng.integers(0, 3, (n, 1)).astype(np.float32),
    }


def test_reads_store_written_by_zarr2(tmp_path):
    """A pusht_cchi_v7-shaped store in zarr 2.x's on-disk form (hand-written to the v2 spec) loads unchanged."""
    root = tmp_path / "pusht_cchi_v7_replay.zarr"
    arrays = _pusht_cchi_like(root)
    ends = np.array([15, 28, 40], dtype=np.int64)
    os.makedirs(root)
    for folder in (root, root / "data", root / "meta"):
        os.makedirs(folder, exist_ok=True)
        (folder / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    blosc = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.NOSHUFFLE)
    for key, value in arrays.items():
        _write_raw_v2_array(root / "data" / key, value, chunk_steps=16, compressor=blosc)
    _write_raw_v2_array(root / "meta" / "episode_ends", ends, chunk_steps=3, compressor=None)
    before = sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*"))

    with ReplayBuffer.open(root, required_keys=["img", "keypoint", "state", "action"]) as buffer:
        assert buffer.zarr_format == 2
        np.testing.assert_array_equal(buffer.episode_ends, ends)
        for key, value in arrays.items():
            np.testing.assert_array_equal(buffer.load([key])[key], value)
        np.testing.assert_array_equal(buffer.get_episode(1)["keypoint"], arrays["keypoint"][15:28])
    assert sorted((p, p.stat().st_mtime_ns) for p in root.rglob("*")) == before, "reading modified the store"


def test_dp_layout_with_zarr_format2_api_and_zip(tmp_path):
    """The same layout built through zarr's format-2 API, read from a directory and from a .zarr.zip."""
    path = tmp_path / "pusht.zarr"
    arrays = _pusht_cchi_like(path)
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    data = root.require_group("data")
    for key, value in arrays.items():
        data.create_array(key, data=value, chunks=(16, *value.shape[1:]),
                          compressors=numcodecs.Blosc(cname="lz4", clevel=5, shuffle=0))
    root.require_group("meta").create_array("episode_ends", data=np.array([10, 40], np.int64), compressors=None)
    zip_path = tmp_path / "pusht.zarr.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for file in path.rglob("*"):
            if file.is_file():
                zf.write(file, file.relative_to(path).as_posix())
    for source in (path, zip_path):
        with ReplayBuffer.open(source) as buffer:
            assert buffer.n_episodes == 2
            np.testing.assert_array_equal(buffer.load(["img"])["img"], arrays["img"])


def _store_with(tmp_path, mutate) -> str:
    path = str(tmp_path / "bad.zarr")
    _write_buffer(path)
    root = zarr.open_group(path, mode="a")
    mutate(root)
    return path


@pytest.mark.parametrize(
    "mutate, key, message",
    [
        (lambda r: r["data/action"].resize((30, 2)), "data/action", "has 30 steps but meta/episode_ends[-1] is 24"),
        (lambda r: r["meta/episode_ends"].__setitem__(1, 3), "meta/episode_ends", "is not strictly increasing"),
        (lambda r: r["meta/episode_ends"].resize((0,)), "meta/episode_ends", "is empty"),
        (lambda r: r["data/state"].__setitem__((4, 2), np.nan), "data/state", "NaN or inf (first at step 4)"),
        (lambda r: r["data/action"].__setitem__((20, 0), np.inf), "data/action", "NaN or inf (first at step 20)"),
        (lambda r: r["meta"].create_array("episode_ends", data=np.array([7.0, 19, 24]), overwrite=True),
         "meta/episode_ends", "must hold integers"),
        (lambda r: r["data"].create_array("label", data=np.array(["x"] * 24), overwrite=True),
         "data/label", "only bool, integer and float data load"),
        (lambda r: r.__delitem__("meta/episode_ends"), "meta/episode_ends", "missing"),
    ],
)
def test_validation_errors_name_store_key_and_problem(tmp_path, mutate, key, message):
    path = _store_with(tmp_path, mutate)
    with pytest.raises(DatasetError) as info:
        ReplayBuffer.open(path)
    assert str(info.value).startswith(f"{path}, key '{key}': ")
    assert message in str(info.value)


def test_large_float_arrays_are_checked_when_read_not_at_open(tmp_path, monkeypatch):
    """A float image array too large to scan at open (threshold lowered here) opens at once; a NaN in it is still
    reported, naming store, key and step, by the read that would have used it; low-dim keys still read."""
    from fm_policy.datasets import validation

    path = _store_with(tmp_path, lambda r: r["data"].create_array(
        "img_f", data=np.where(np.arange(24)[:, None, None] == 13, np.nan, 0.5) * np.ones((24, 4, 4), np.float32)))
    monkeypatch.setattr(validation, "FINITE_CHECK_AT_OPEN_BYTES", 1024)
    with ReplayBuffer.open(path) as buffer:
        assert buffer.load(["state"])["state"].shape == (24, 5)
        assert buffer.get_episode(0, ["img_f"])["img_f"].shape == (7, 4, 4)
        with pytest.raises(DatasetError, match=r"key 'data/img_f': contains NaN or inf \(first at step 13\)"):
            buffer.load(["img_f"])
        with pytest.raises(DatasetError, match=r"first at step 13"):
            buffer.get_episode(1, ["img_f"])  # rows 7..18
    monkeypatch.setattr(validation, "FINITE_CHECK_AT_OPEN_BYTES", 2**30)
    with pytest.raises(DatasetError, match="first at step 13"):
        ReplayBuffer.open(path)


def test_missing_required_key_and_missing_store(tmp_path):
    path = str(tmp_path / "demo.zarr")
    _write_buffer(path)
    with pytest.raises(DatasetError, match=r"needs data keys \['keypoint'\].*has only \['action', 'img', 'state'\]"):
        ReplayBuffer.open(path, required_keys=["action", "keypoint"])
    with pytest.raises(DatasetError, match="no such file"):
        ReplayBuffer.open(tmp_path / "nope.zarr")
    (tmp_path / "junk.zarr").mkdir()
    with pytest.raises(DatasetError, match="not a readable zarr group"):
        ReplayBuffer.open(tmp_path / "junk.zarr")


def test_read_only_open_cannot_write(tmp_path):
    path = str(tmp_path / "demo.zarr")
    _write_buffer(path)
    with ReplayBuffer.open(path) as buffer:
        with pytest.raises(Exception):
            buffer.array("action")[0] = 0.0


def test_add_episode_rejects_bad_episodes_without_writing(tmp_path):
    path = str(tmp_path / "demo.zarr")
    _write_buffer(path)
    buffer = ReplayBuffer.open(path, mode="a")
    ep = _episode(4, np.random.default_rng(3))
    bad = dict(ep, action=ep["action"].copy())
    bad["action"][2, 1] = np.nan
    with pytest.raises(DatasetError, match=r"key 'action': non-finite value .* at episode step 2"):
        buffer.add_episode(bad)
    with pytest.raises(DatasetError, match="share one non-zero length"):
        buffer.add_episode(dict(ep, state=ep["state"][:3]))
    with pytest.raises(DatasetError, match="differ from the store's keys"):
        buffer.add_episode({"action": ep["action"]})
    with pytest.raises(DatasetError, match="shape"):
        buffer.add_episode(dict(ep, state=np.zeros((4, 6), np.float32)))
    assert buffer.n_steps == sum(EPISODE_LENGTHS)
    ReplayBuffer.open(path)  # still valid


def test_resume_cuts_an_interrupted_append(tmp_path):
    """Data written after the last commit (episode_ends) is dropped on resume; committed episodes are kept."""
    path = str(tmp_path / "partial.zarr")
    episodes = _write_buffer(path)
    root = zarr.open_group(path, mode="a")
    root["data/action"].resize((30, 2))  # as if killed after writing 'action' of a 4th episode
    with pytest.raises(DatasetError):
        ReplayBuffer.open(path)
    buffer = ReplayBuffer.resume(path)
    assert buffer.n_steps == sum(EPISODE_LENGTHS)
    np.testing.assert_array_equal(buffer.get_episode(2)["action"], episodes[2]["action"])
    buffer.add_episode(_episode(3, np.random.default_rng(5)), episode_meta={"env_seed": 3})
    assert ReplayBuffer.open(path).n_episodes == 4


def test_create_refuses_to_overwrite(tmp_path):
    path = str(tmp_path / "demo.zarr")
    _write_buffer(path)
    with pytest.raises(FileExistsError):
        ReplayBuffer.create(path)


def test_corrupt_chunk_is_reported_with_store_key_and_chunk(tmp_path, capsys):
    """A truncated chunk file (an interrupted download) is a user error naming the store, the key and the chunk,
    from the library, from `dataset validate` and from training; never a codec traceback."""
    from fm_policy.cli import main

    path = tmp_path / "broken.zarr"
    buffer = ReplayBuffer.create(str(path))
    rng = np.random.default_rng(0)
    for _ in range(3):
        buffer.add_episode({"state": rng.normal(size=(50, 5)).astype(np.float32),
                            "action": rng.normal(size=(50, 2)).astype(np.float32)})
    buffer.close()
    chunk = next(p for p in sorted((path / "data" / "action").iterdir()) if not p.name.startswith("."))
    chunk.write_bytes(chunk.read_bytes()[: len(chunk.read_bytes()) // 2])
    with ReplayBuffer.open(str(path), check_finite=False) as opened:
        with pytest.raises(DatasetError, match=r"data/action.*chunk 0 \(rows 0-") as info:
            opened.load(["action"])
    assert str(path) in str(info.value) and "corrupt" in str(info.value)
    assert main(["dataset", "validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data/action" in err[0] and "chunk 0" in err[0], err
