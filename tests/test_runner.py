"""The pipelined runner (:mod:`camixer_fast.inference.pipeline`): results equal to solo runs whatever the
batching and the workers, bad items failing alone, out-of-memory recovery, the memory budget
under ``ulimit -v``; and the commands' one RGB reader."""

from __future__ import annotations

import resource
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import camixer_fast
from camixer_fast.cli import main
from camixer_fast.io.image import read_rgb
from camixer_fast.inference.pipeline import Engine, upscale_batch, upscale_iter

from camixer_fast.inference import tiling

pytestmark = pytest.mark.usefixtures("one_thread")

RNG = np.random.default_rng(13)


def _images() -> list:
    """Mixed kinds and sizes; four of them 12×17 so that they batch together."""
    rng = np.random.default_rng(13)
    rgb = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (12, 17, 4), dtype=np.uint8)
    return [
        Image.fromarray(rgb),
        rgba,
        rng.integers(0, 65536, (9, 5), dtype=np.uint16),
        torch.rand(3, 12, 17, generator=torch.Generator().manual_seed(1)),
        Image.fromarray(rgb[:, :, 0]),
        torch.rand(2, 3, 12, 17, generator=torch.Generator().manual_seed(2)),
        np.float32(rgb[:1, :1] / 255.0),
    ]


def _equal(a, b) -> bool:
    if isinstance(a, Image.Image):
        return a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))
    if torch.is_tensor(a):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a.dtype == b.dtype and np.array_equal(a, b)


@pytest.fixture(scope="module")
def solo() -> list:
    torch.set_num_threads(1)
    return [camixer_fast.upscale(img) for img in _images()]


@pytest.mark.parametrize("batch_size,workers", [(1, 1), (3, 1), (2, 2), (None, 2)],
                         ids=["batch1-worker1", "batch3-worker1", "batch2-workers2",
                              "auto-workers2"])
def test_results_equal_solo_runs_whatever_the_batching(solo, batch_size, workers):
    out = upscale_batch(_images(), batch_size=batch_size, workers=workers, threads=1)
    assert len(out) == len(solo)
    for i, (got, ref) in enumerate(zip(out, solo, strict=True)):
        assert _equal(got, ref), f"image {i} differs from its solo run"


def test_tiles_batched_per_call_equal_one_by_one():
    model = camixer_fast.load_model("CAMixerSR-S")
    x = torch.rand(1, 3, 40, 33, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        one = tiling.tiled_forward(model, x, 16, batch=1)
        many = tiling.tiled_forward(model, x, 16, batch=5)
    assert torch.equal(one, many)


def test_a_bad_image_fails_alone_in_its_turn():
    good = RNG.integers(0, 256, (8, 9, 3), dtype=np.uint8)
    bad = np.full((8, 9, 3), 2.0, dtype=np.float32)  # floats outside [0, 1]
    results = upscale_iter([good, bad, good], threads=1, workers=2)
    first = next(results)
    assert first.shape == (32, 36, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        next(results)


def test_closing_the_iterator_early_stops_its_threads():
    before = threading.active_count()
    images = (RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(50))
    results = upscale_iter(images, threads=1, workers=2, batch_size=2)
    next(results)
    results.close()
    assert threading.active_count() == before


def test_bad_settings_are_refused():
    for name, value in (("batch_size", 0), ("workers", -1), ("threads", 1.5)):
        with pytest.raises(ValueError, match=name):
            Engine(**{name: value})


# --- out-of-memory recovery ------------------------------------------------------------------

ALLOCATION_ERROR = ("DefaultCPUAllocator: can't allocate memory: you tried to allocate "
                    "123456789 bytes. Error code 12 (Cannot allocate memory)")


@pytest.mark.parametrize("error,expected", [
    (MemoryError(), True),
    (RuntimeError(ALLOCATION_ERROR), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False),
], ids=["MemoryError", "cpu-allocator", "cuda-oom", "other-runtime-error", "not-runtime"])
def test_allocation_failures_are_recognised(error, expected):
    assert tiling.is_allocation_failure(error) == expected


@pytest.mark.parametrize("tile,size,expected", [
    (None, (64, 48), 32), (None, (40, 200), 96), (64, (64, 48), 32), (96, (200, 300), 48),
    (32, (64, 64), 16), (16, (64, 64), None), (None, (20, 20), None), (64, (1, 500), 32)],
    ids=["whole-64x48", "whole-40x200", "tile64-on-64x48", "tile96", "tile32", "floor",
         "small-image", "tile64-on-1x500"])
def test_tile_is_halved_to_a_multiple_of_16_down_to_the_floor(tile, size, expected):
    assert tiling.halved_tile(tile, *size) == expected


@pytest.fixture()
def fail_whole_images(monkeypatch):
    """The network fails to allocate on any input of 64×48 or larger (whole images), so only
    the tiles of the retry go through."""
    real = camixer_fast.CAMixerSR.forward
    calls = []

    def forward(self, x, **kwargs):
        calls.append(tuple(x.shape[-2:]))
        if x.shape[-2] * x.shape[-1] >= 64 * 48:
            raise RuntimeError(ALLOCATION_ERROR)
        return real(self, x, **kwargs)

    monkeypatch.setattr(camixer_fast.CAMixerSR, "forward", forward)
    return calls


LARGE = RNG.integers(0, 256, (64, 48, 3), dtype=np.uint8)


def test_upscale_retries_in_halved_tiles_with_a_warning(fail_whole_images):
    with pytest.warns(RuntimeWarning, match="out of memory .* retried in 32x32 tiles"):
        out = camixer_fast.upscale(LARGE)
    fail_whole_images.clear()
    expected = camixer_fast.upscale(LARGE, tile=32)
    assert np.array_equal(out, expected)
    assert set(fail_whole_images) == {(32, 32)}


def test_command_writes_the_image_from_smaller_tiles(fail_whole_images, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(LARGE).save(folder / "large.png")
    Image.fromarray(LARGE[:8, :8]).save(folder / "small.png")
    assert main(["upscale", str(folder), "-o", str(tmp_path / "out"), "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "large.png: out of memory with the whole image of 64x48; retried in 32x32 tiles" in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = camixer_fast.upscale(LARGE, tile=32)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "large.png")), expected)
    assert (tmp_path / "out" / "small.png").is_file()


def test_failure_below_the_floor_fails_that_image_only(monkeypatch, tmp_path, capsys):
    real = camixer_fast.CAMixerSR.forward

    def forward(self, x, **kwargs):
        if x.shape[-1] == 48 or x.shape[-1] <= 32:
            raise MemoryError()
        return real(self, x, **kwargs)

    monkeypatch.setattr(camixer_fast.CAMixerSR, "forward", forward)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(LARGE).save(folder / "large.png")
    Image.fromarray(LARGE[:8, :40]).save(folder / "wide.png")
    assert main(["upscale", str(folder), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "large.png: failed: out of memory on a 64x48 input even with 16-pixel tiles: needs " \
           "about " in err and " MiB available" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["wide.png"]


def test_memory_budget_takes_the_address_space_limit(monkeypatch):
    room = 200 << 20
    used = tiling.address_space_room()
    assert used is None or used >= 0
    with open("/proc/self/status") as f:
        size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    monkeypatch.setattr(resource, "getrlimit", lambda which: (size + room, resource.RLIM_INFINITY)
                        if which == resource.RLIMIT_AS else (-1, -1))
    # a command run in this process may have kept freed heap (camixer_fast.backends.memory), which
    # available_memory adds to the room: this checks the limit alone
    monkeypatch.setattr(tiling, "retained_bytes", lambda: 0)
    available = tiling.available_memory(torch.device("cpu"))
    assert 0.5 * room < available <= room + (64 << 20)
    assert tiling.auto_tile(1024, 1024) is not None  # 6 GB would not fit in 200 MB


# --- the one RGB reader ----------------------------------------------------------------------

def test_read_rgb_gives_8_bit_rgb_for_every_kind(tmp_path):
    grey16 = (np.arange(12 * 7).reshape(12, 7) * 700).astype(np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray(RNG.integers(0, 256, (5, 6, 4), dtype=np.uint8)).save(tmp_path / "a.png")
    out = read_rgb(tmp_path / "g16.png")
    assert out.shape == (12, 7, 3) and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], np.rint(grey16 / 257).astype(np.uint8))
    assert read_rgb(tmp_path / "a.png").shape == (5, 6, 3)


@pytest.mark.parametrize("share,together", [(0.3, True), (0.6, False)],
                         ids=["small-side-by-side", "large-one-at-a-time"])
def test_workers_share_the_memory_budget(share, together):
    from camixer_fast.inference.pipeline import Room

    room, inside, most = Room(1000), [], []
    lock = threading.Lock()
    both_in = threading.Barrier(2, timeout=0.5)

    def work():
        with room.taking(int(share * 1000)):
            with lock:
                inside.append(1)
                most.append(len(inside))
            try:
                both_in.wait()
            except threading.BrokenBarrierError:
                pass
            with lock:
                inside.pop()

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (max(most) == 2) == together


def test_a_threads_count_survives_another_thread_setting_one() -> None:
    """A model worker sets its count before its first parallel operation; a finisher then sets
    1 (PyTorch's global last value). The worker must keep its own count: PyTorch's lazy
    per-thread initialisation would otherwise reset it to the global (and round differently)."""
    from camixer_fast.inference.pipeline import set_thread_count

    before = torch.get_num_threads()
    counts: dict[str, int] = {}
    finisher_done = threading.Event()

    def worker() -> None:
        set_thread_count(2)
        finisher_done.wait(timeout=30)
        (torch.rand(1_000_000) * 2).sum()          # the first parallel operation
        counts["worker"] = torch.get_num_threads()

    def finisher() -> None:
        set_thread_count(1)
        finisher_done.set()

    threads = [threading.Thread(target=worker), threading.Thread(target=finisher)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    set_thread_count(before)
    assert counts["worker"] == 2


def test_allocation_failure_outside_the_network_is_one_line(monkeypatch, tmp_path, capsys):
    """An allocation that fails after the network (e.g. on the result) says what it needed."""
    real = torch.Tensor.clamp_

    def clamp_(self, *args):
        if self.shape[-2:] == (4 * 64, 4 * 48):
            raise RuntimeError(ALLOCATION_ERROR)
        return real(self, *args)

    monkeypatch.setattr(torch.Tensor, "clamp_", clamp_)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(LARGE).save(folder / "large.png")
    assert main(["upscale", str(folder), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "large.png: failed: out of memory on a 64x48 input: needs about " in err, err
    assert " MiB available" in err and "DefaultCPUAllocator" not in err
