"""``camixer-fast upscale``: outputs, kept modes and bit depths, skipping, atomic writes, bad
files, bad arguments and exit statuses; and the 16-bit PNG codec behind it."""

from __future__ import annotations

import importlib
import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import camixer_fast
from camixer_fast.io import image as png16
from camixer_fast.cli import main
from camixer_fast.io.image import LoadedImage, fit_to_format, write_image

cmd = importlib.import_module("camixer_fast.commands.upscale")

H, W = 12, 17
RNG = np.random.default_rng(10)
RGBA8 = RNG.integers(0, 256, (H, W, 4), dtype=np.uint8)
RGB16 = RNG.integers(0, 65536, (H, W, 3), dtype=np.uint16)
GREY16 = (np.add.outer(np.arange(H), np.arange(W)) * 2000 + 123).astype(np.uint16)


pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args: object) -> int:
    """``camixer-fast upscale ARGS`` in this process; the exit status."""
    try:
        return main(["upscale", *map(str, args)])
    except SystemExit as exit_:
        return exit_.code


def save_png16(path: Path, pixels: np.ndarray) -> None:
    with open(path, "wb") as f:
        png16.write_png16(f, pixels)


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """A folder with an RGBA PNG, an RGB JPEG, a grey BMP, a 16-bit RGB PNG and a text file."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(RGBA8).save(folder / "a.png")
    Image.fromarray(RGBA8[..., :3]).save(folder / "b.jpg", quality=95)
    Image.fromarray(RGBA8[..., 0]).save(folder / "c.bmp")
    save_png16(folder / "d16.png", RGB16)
    (folder / "notes.txt").write_text("not an image")
    return folder


def names(folder: Path) -> list[str]:
    """Every entry of ``folder``, hidden ones (temporary files) included."""
    return sorted(p.name for p in folder.iterdir())


# --- outputs ---------------------------------------------------------------------------------

def test_folder_keeps_names_modes_and_16_bits(inputs, tmp_path, capsys):
    out = tmp_path / "out" / "nested"
    assert cli(inputs, "-o", out) == 0
    assert names(out) == ["a.png", "b.jpg", "c.bmp", "d16.png"]
    expected_modes = {"a.png": "RGBA", "b.jpg": "RGB", "c.bmp": "L"}
    for name, mode in expected_modes.items():
        with Image.open(out / name) as img:
            assert (img.mode, img.size) == (mode, (4 * W, 4 * H)), name
    pixels, _ = png16.read_png16(out / "d16.png")
    np.testing.assert_array_equal(pixels, camixer_fast.upscale(RGB16))
    with Image.open(out / "a.png") as img:
        np.testing.assert_array_equal(np.asarray(img), camixer_fast.upscale(RGBA8))
    assert "4 written, 0 skipped, 0 failed" in capsys.readouterr().err


def test_single_file_to_a_file(inputs, tmp_path, capsys):
    dest = tmp_path / "new" / "big.png"
    assert cli(inputs / "a.png", "-o", dest) == 0
    with Image.open(dest) as img:
        assert img.mode == "RGBA" and img.size == (4 * W, 4 * H)
    assert capsys.readouterr().err.startswith(f"camixer-fast upscale: 1 image upscaled -> {dest}")


def test_single_file_to_another_format_says_what_is_lost(inputs, tmp_path, capsys):
    assert cli(inputs / "a.png", "-o", tmp_path / "big.jpg") == 0
    with Image.open(tmp_path / "big.jpg") as img:
        assert img.format == "JPEG" and img.mode == "RGB"
    assert "alpha dropped" in capsys.readouterr().err


def test_single_file_into_a_folder(inputs, tmp_path):
    (tmp_path / "dest").mkdir()
    assert cli(inputs / "b.jpg", "-o", tmp_path / "dest") == 0
    assert names(tmp_path / "dest") == ["b.jpg"]


def test_scale_suffix_allows_writing_beside_the_inputs(inputs):
    assert cli(inputs / "a.png", inputs / "c.bmp", "-o", inputs, "--scale-suffix") == 0
    assert {"a_x4.png", "c_x4.bmp"} <= set(names(inputs))
    with Image.open(inputs / "a_x4.png") as img:
        assert img.size == (4 * W, 4 * H)


def make_grey16_png(path: Path) -> None:
    Image.fromarray(GREY16).save(path)


def make_grey_alpha16_png(path: Path) -> None:
    save_png16(path, np.dstack([GREY16, GREY16[::-1]]))


def make_palette_png(path: Path) -> None:
    img = Image.fromarray(RGBA8[..., :3]).quantize(colors=8)
    img.save(path, transparency=2)


def make_bilevel_png(path: Path) -> None:
    Image.fromarray(RGBA8[..., 0] > 127).save(path)


def make_cmyk_jpeg(path: Path) -> None:
    Image.fromarray(RGBA8).convert("CMYK").save(path)


def make_grey16_tiff(path: Path) -> None:
    Image.fromarray(GREY16).save(path)


def make_rgba_webp(path: Path) -> None:
    Image.fromarray(RGBA8).save(path, lossless=True)


KINDS = {
    "grey-16bit-png": ("g.png", make_grey16_png, "I;16"),
    "grey-alpha-16bit-png": ("ga.png", make_grey_alpha16_png, "LA16"),
    "palette-png-with-transparency": ("p.png", make_palette_png, "P"),
    "bilevel-png": ("b.png", make_bilevel_png, "L"),
    "cmyk-jpeg": ("k.jpg", make_cmyk_jpeg, "RGB"),
    "grey-16bit-tiff": ("g.tif", make_grey16_tiff, "I;16"),
    "rgba-webp": ("w.webp", make_rgba_webp, "RGBA"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_file_kinds_keep_grey_alpha_palette_and_depth(kind, tmp_path):
    name, make, expected = KINDS[kind]
    make(tmp_path / name)
    assert cli(tmp_path / name, "-o", tmp_path / "out") == 0
    result = tmp_path / "out" / name
    if expected == "LA16":
        pixels, _ = png16.read_png16(result)
        assert pixels.shape == (4 * H, 4 * W, 2) and pixels.dtype == np.uint16
        assert (pixels % 257 != 0).mean() > 0.5
        return
    with Image.open(result) as img:
        assert img.mode == expected and img.size == (4 * W, 4 * H)
        if expected == "I;16":
            values = np.asarray(img).astype(np.int64)
            assert values.max() > 255 and (values % 257 != 0).mean() > 0.5
        if expected == "P":
            assert img.info.get("transparency") == 2


def test_icc_profile_and_exif_are_kept(tmp_path):
    exif = Image.Exif()
    exif[0x0110] = "test camera"
    Image.fromarray(RGBA8[..., :3]).save(tmp_path / "e.jpg", exif=exif, icc_profile=b"fake icc")
    assert cli(tmp_path / "e.jpg", "-o", tmp_path / "out") == 0
    with Image.open(tmp_path / "out" / "e.jpg") as img:
        assert img.info.get("icc_profile") == b"fake icc"
        assert img.getexif().get(0x0110) == "test camera"


def _palette_with_transparency() -> Image.Image:
    img = Image.fromarray(RGBA8[..., :3]).quantize(colors=8)
    img.info["transparency"] = 2
    return img


FORMAT_FITS = {
    "rgba-as-jpeg": (lambda: Image.fromarray(RGBA8), "JPEG", "RGB", "alpha dropped"),
    "rgba-as-bmp": (lambda: Image.fromarray(RGBA8), "BMP", "RGB", "alpha dropped"),
    "la-as-jpeg": (lambda: Image.fromarray(RGBA8).convert("LA"), "JPEG", "L", "alpha dropped"),
    "grey16-as-jpeg": (lambda: Image.fromarray(GREY16), "JPEG", "L", "16 -> 8 bits"),
    "rgb16-array-as-tiff": (lambda: RGB16, "TIFF", "RGB", "16 -> 8 bits"),
    "palette-transparency-as-tiff": (_palette_with_transparency, "TIFF", "RGBA",
                                     "palette dropped"),
    "palette-transparency-as-png": (_palette_with_transparency, "PNG", "P", None),
    "rgb16-array-as-png": (lambda: RGB16, "PNG", None, None),
}


@pytest.mark.parametrize("case", list(FORMAT_FITS))
def test_results_are_fitted_to_the_output_format(case):
    make, fmt, mode, note = FORMAT_FITS[case]
    pixels, got = fit_to_format(make(), fmt)
    assert (pixels.mode if isinstance(pixels, Image.Image) else None) == mode
    assert got == note if note is None else note in got
    buf = io.BytesIO()
    write_image(LoadedImage(make()), buf, fmt)
    assert buf.tell() > 0


# --- skipping and overwriting ----------------------------------------------------------------

def test_existing_outputs_are_skipped_unless_overwrite(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(inputs / "a.png", inputs / "c.bmp", "-o", out) == 0
    (out / "a.png").write_bytes(b"sentinel")
    capsys.readouterr()
    assert cli(inputs / "a.png", inputs / "c.bmp", "-o", out) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and "a.png" in err and "0 written, 2 skipped" in err
    assert (out / "a.png").read_bytes() == b"sentinel"
    assert cli(inputs / "a.png", "-o", out, "--overwrite") == 0
    with Image.open(out / "a.png") as img:
        assert img.size == (4 * W, 4 * H)


# --- atomic writes ---------------------------------------------------------------------------

@pytest.mark.parametrize("error,status", [(OSError("disk full"), 1), (KeyboardInterrupt(), 130)],
                         ids=["write-error", "interrupted"])
def test_failed_write_leaves_no_partial_file(inputs, tmp_path, monkeypatch, error, status,
                                             capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "c.bmp").write_bytes(b"old output")

    def broken(image, dest, fmt):
        dest.write(b"half an image")
        raise error

    monkeypatch.setattr(cmd, "write_image", broken)
    assert cli(inputs / "a.png", inputs / "c.bmp", "-o", out, "--overwrite") == status
    assert names(out) == ["c.bmp"], "a temporary or truncated file was left behind"
    assert (out / "c.bmp").read_bytes() == b"old output"
    err = capsys.readouterr().err
    if status == 1:
        assert f"cannot write {out / 'a.png'}: disk full" in err and ".part" not in err


def test_unwritable_output_folder_is_refused_before_any_work(inputs, tmp_path, monkeypatch,
                                                              capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(cmd.os, "access", lambda path, mode: False if Path(path) == locked
                        else real_access(path, mode))   # root writes anywhere: pretend
    ran = []
    monkeypatch.setattr(camixer_fast.CAMixerSR, "forward", lambda *a, **k: ran.append(1))
    for out in (locked, locked / "new" / "deeper"):
        assert cli(inputs, "-o", out) == 2
        err = capsys.readouterr().err
        assert f"cannot write {out / 'a.png'}" in err and "not writable" in err, err
    assert cli(inputs / "a.png", "-o", locked / "big.png") == 2
    assert f"cannot write {locked / 'big.png'}" in capsys.readouterr().err
    assert ran == [] and names(locked) == []


def test_no_weights_and_no_network_is_one_line_and_exit_2(inputs, tmp_path, monkeypatch,
                                                          capsys):
    import urllib.error

    from camixer_fast.models import weights

    def offline(url, timeout):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.delenv("CAMIXER_FAST_WEIGHTS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(weights.urllib.request, "urlopen", offline)
    assert cli(inputs / "a.png", "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) <= 2, err
    assert "cannot download CAMixerSR_S.pth" in err and "$CAMIXER_FAST_WEIGHTS" in err
    assert str(tmp_path / "cache" / "camixer_fast" / "CAMixerSR_S.pth") in err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_outputs_get_ordinary_permissions(inputs, tmp_path):
    assert cli(inputs / "a.png", "-o", tmp_path / "a.png") == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "a.png").stat().st_mode & 0o777 == 0o666 & ~umask


# --- unreadable inputs -----------------------------------------------------------------------

def write_garbage(path: Path) -> None:
    path.write_bytes(b"this is not an image at all")


def write_empty(path: Path) -> None:
    path.write_bytes(b"")


def write_truncated_png(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


def write_truncated_png16(path: Path) -> None:
    buf = io.BytesIO()
    png16.write_png16(buf, RGB16)
    path.write_bytes(buf.getvalue()[:-40])


def write_truncated_jpeg(path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])


BAD_FILES = {
    "garbage-png": ("bad.png", write_garbage),
    "empty-png": ("empty.png", write_empty),
    "truncated-png": ("cut.png", write_truncated_png),
    "truncated-16bit-png": ("cut16.png", write_truncated_png16),
    "truncated-jpeg": ("cut.jpg", write_truncated_jpeg),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_unreadable_file_is_reported_and_skipped(kind, inputs, tmp_path, capsys):
    name, make = BAD_FILES[kind]
    make(inputs / name)
    out = tmp_path / "out"
    assert cli(inputs, "-o", out) == 1
    err = capsys.readouterr().err
    assert str(inputs / name) in err and "4 written, 0 skipped, 1 failed" in err
    assert name not in names(out)
    assert {"a.png", "b.jpg", "c.bmp", "d16.png"} <= set(names(out))


@pytest.mark.parametrize("how", ["chmod-000", "listing-fails"])
def test_unreadable_folder_is_reported_and_others_processed(how, inputs, tmp_path, capsys,
                                                            monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    Image.fromarray(RGBA8).save(locked / "x.png")
    if how == "chmod-000":
        if os.geteuid() == 0:
            pytest.skip("root reads any folder; 'listing-fails' covers this")
        locked.chmod(0)
    else:
        real = Path.iterdir

        def iterdir(self):
            if self == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self)

        monkeypatch.setattr(Path, "iterdir", iterdir)
    try:
        status = cli(locked, inputs / "a.png", "-o", tmp_path / "out")
    finally:
        locked.chmod(0o755)
    assert status == 1
    err = capsys.readouterr().err
    assert str(locked) in err and "cannot read folder" in err
    assert names(tmp_path / "out") == ["a.png"]


# --- bad arguments ---------------------------------------------------------------------------

def _two_inputs_same_name(inputs: Path, tmp: Path) -> list:
    other = tmp / "other"
    other.mkdir()
    Image.fromarray(RGBA8).save(other / "a.png")
    return [inputs / "a.png", other / "a.png", "-o", tmp / "out"]


def _hard_link_to_input(inputs: Path, tmp: Path) -> list:
    (tmp / "out").mkdir()
    os.link(inputs / "a.png", tmp / "out" / "a.png")
    return [inputs / "a.png", "-o", tmp / "out", "--overwrite"]


def _symlinked_output_folder(inputs: Path, tmp: Path) -> list:
    (tmp / "out").symlink_to(inputs)
    return [inputs, "-o", tmp / "out"]


def _output_file_for_folder(inputs: Path, tmp: Path) -> list:
    (tmp / "out").write_text("a file, not a folder")
    return [inputs, "-o", tmp / "out"]


BAD_ARGS = {
    "missing-input-file": lambda i, t: [t / "nope.png", "-o", t / "out"],
    "missing-input-folder": lambda i, t: [i / "a.png", t / "nope", "-o", t / "out"],
    "no-output": lambda i, t: [i / "a.png"],
    "gamma-above-1": lambda i, t: [i, "-o", t / "out", "--gamma", "1.5"],
    "gamma-negative": lambda i, t: [i, "-o", t / "out", "--gamma=-0.1"],
    "gamma-not-a-number": lambda i, t: [i, "-o", t / "out", "--gamma", "half"],
    "unknown-weights-name": lambda i, t: [i, "-o", t / "out", "--weights", "no-such-model"],
    "missing-weights-file": lambda i, t: [i, "-o", t / "out", "--weights", t / "none.pth"],
    "weights-not-a-checkpoint": lambda i, t: [i, "-o", t / "out", "--weights", i / "notes.txt"],
    "tile-zero": lambda i, t: [i, "-o", t / "out", "--tile", "0"],
    "tile-not-a-number": lambda i, t: [i, "-o", t / "out", "--tile", "big"],
    "unknown-dtype": lambda i, t: [i, "-o", t / "out", "--dtype", "fp8"],
    "bad-device": lambda i, t: [i, "-o", t / "out", "--device", "abacus"],
    "unsupported-input-extension": lambda i, t: [i / "notes.txt", "-o", t / "out"],
    "unsupported-output-extension": lambda i, t: [i / "a.png", "-o", t / "a.gif"],
    "output-equals-input-file": lambda i, t: [i / "a.png", "-o", i / "a.png"],
    "output-folder-is-input-folder": lambda i, t: [i, "-o", i],
    "output-in-input-folder-same-name": lambda i, t: [i / "a.png", i / "b.jpg", "-o", i],
    "output-hard-link-to-input": _hard_link_to_input,
    "output-folder-symlink-to-inputs": _symlinked_output_folder,
    "output-file-for-two-inputs": lambda i, t: [i / "a.png", i / "b.jpg", "-o", i / "c.bmp"],
    "output-file-for-a-folder-input": _output_file_for_folder,
    "two-inputs-same-output": _two_inputs_same_name,
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_exit_2_and_write_nothing(case, inputs, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    args = BAD_ARGS[case](inputs, tmp_path)
    setup = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert cli(*args) == 2
    err = capsys.readouterr().err
    print(err)
    assert "error" in err
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert after == setup, "something was written"
    assert set(before) <= set(after)


def test_no_arguments_is_a_usage_error(capsys):
    assert cli() == 2
    assert "usage" in capsys.readouterr().err


def test_folder_without_images_is_an_error_and_creates_nothing(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    assert cli(tmp_path / "empty", "-o", tmp_path / "out") == 1
    assert "no images found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [["--tile", "8"], ["--tile", "auto"], ["--dtype", "bf16"],
                                     ["--gamma", "0", "--device", "cpu"]],
                         ids=lambda o: " ".join(o))
def test_options_run(options, inputs, tmp_path):
    assert cli(inputs / "a.png", "-o", tmp_path / "a.png", *options) == 0
    with Image.open(tmp_path / "a.png") as img:
        assert img.mode == "RGBA" and img.size == (4 * W, 4 * H)


def test_progress_bar_only_on_a_terminal(inputs, tmp_path, capsys, monkeypatch):
    for terminal in (True, False):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
        assert cli(inputs / "a.png", inputs / "c.bmp", "-o", tmp_path / str(terminal)) == 0
        err = capsys.readouterr().err
        assert ("\r" in err and "/2 [" in err and "image/s" in err) == terminal
        assert "2 written, 0 skipped, 0 failed in " in err


def test_python_m_camixer_fast_upscale(inputs, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # from outside the checkout: ``-m`` puts the working directory first on sys.path, and the
    # checkout's camixer_fast/ folder would shadow a package installed without -e
    done = subprocess.run(
        [sys.executable, "-m", "camixer_fast", "upscale", str(inputs / "c.bmp"), "-o",
         str(tmp_path / "c.png"), "--tile", "8"],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr, "a progress bar was drawn on a pipe"
    with Image.open(tmp_path / "c.png") as img:
        assert img.mode == "L" and img.size == (4 * W, 4 * H)


@pytest.fixture()
def sigint_default():
    """Children start with SIGINT at its default: a runner started in the background (``&``
    without job control) ignores SIGINT, its children inherit that, and the CLI then rightly
    leaves Ctrl-C alone."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


SLOW_WRITES = """
import time
import camixer_fast.io.image as imageio

_write = imageio.write_image


def _slow_write(*args, **kwargs):
    time.sleep(0.3)
    return _write(*args, **kwargs)


imageio.write_image = _slow_write
"""
"""A sitecustomize that makes each write take 0.3 s longer, so that SIGINT surely comes
mid-run, however busy the machine."""


@pytest.mark.usefixtures("sigint_default")
def test_sigint_keeps_finished_files_and_exits_130(tmp_path):
    import signal
    import time

    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for k in range(30):
        Image.fromarray(RNG.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(
            folder / f"{k:02d}.png")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_WRITES)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{hook}{os.pathsep}{repo}")
    proc = subprocess.Popen([sys.executable, "-m", "camixer_fast", "upscale", str(folder), "-o",
                             str(out)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and any(p.suffix == ".png" for p in out.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "no output appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    written = names(out)
    assert "interrupted; " in err and f"{len(written)} written" in err
    assert 0 < len(written) < 30 and all(name.endswith(".png") for name in written), written
    for name in written:
        with Image.open(out / name) as img:
            img.load()
            assert img.size == (192, 192)


SLOW_FORWARD = """
import os
import time

import camixer_fast

_forward = camixer_fast.CAMixerSR.forward


def _slow_forward(self, x, **kwargs):
    os.write(2, b"forward\\n")
    time.sleep(float(os.environ["SLOW_FORWARD"]))
    out = _forward(self, x, **kwargs)
    os.write(2, b"forward done\\n")
    return out


camixer_fast.CAMixerSR.forward = _slow_forward
"""
"""A sitecustomize that says on stderr when each forward (here: each tile) starts and ends,
and makes it take $SLOW_FORWARD seconds longer."""


class _Stderr:
    """A child's stderr read on a thread: wait for a line with a deadline, then all of it."""

    def __init__(self, proc: subprocess.Popen) -> None:
        import queue
        import threading

        self.proc, self.lines, self.fresh = proc, [], queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)
            self.fresh.put(line)
        self.fresh.put(None)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        import queue
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.fresh.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"no {text!r} in time: {''.join(self.lines)}") from None
            if line is None:
                raise AssertionError(f"no {text!r} (exit {self.proc.wait()}): "
                                     f"{''.join(self.lines)}")
            if text in line:
                return

    def all(self, timeout: float = 120) -> str:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.reader.join(timeout=10)
        return "".join(self.lines)


def _tiled_run(tmp_path: Path, seconds: float) -> tuple[subprocess.Popen, _Stderr, Path]:
    """``upscale`` of a 64×64 image in 25 tiles of 16 (one per forward) under SLOW_FORWARD,
    once its first tile has started."""
    image, out = tmp_path / "big.png", tmp_path / "out.png"
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_FORWARD)
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=f"{hook}{os.pathsep}{repo}",
               SLOW_FORWARD=str(seconds))
    proc = subprocess.Popen([sys.executable, "-m", "camixer_fast", "upscale", str(image), "-o",
                             str(out), "--tile", "16", "--batch-size", "1"],
                            env=env, stderr=subprocess.PIPE, text=True)
    stderr = _Stderr(proc)
    stderr.wait_for("forward\n")
    return proc, stderr, out


@pytest.mark.usefixtures("sigint_default")
def test_sigint_stops_a_tiled_image_between_tiles(tmp_path):
    import signal

    proc, stderr, out = _tiled_run(tmp_path, 0.3)
    proc.send_signal(signal.SIGINT)
    err = stderr.all()
    assert proc.returncode == 130, err
    assert err.count("forward done") <= 3, f"{err.count('forward done')} of 25 tiles ran"
    assert "interrupted; 0 written" in err and not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.usefixtures("sigint_default")
def test_second_sigint_exits_at_once_with_130(tmp_path):
    import signal

    proc, stderr, out = _tiled_run(tmp_path, 600)
    proc.send_signal(signal.SIGINT)
    stderr.wait_for("Ctrl-C again", timeout=60)
    proc.send_signal(signal.SIGINT)
    err = stderr.all(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted again, exiting now" in err and "terminate called" not in err
    assert "forward done" not in err and not out.exists()


# --- the 16-bit PNG codec --------------------------------------------------------------------

def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _filtered(raw: np.ndarray, bpp: int, filters: list[int]) -> bytes:
    """Rows of ``raw`` (h, stride) uint8 filtered with filters[y % len(filters)], framed."""
    out, prior = bytearray(), [0] * raw.shape[1]
    for y, row in enumerate(raw.tolist()):
        kind = filters[y % len(filters)]
        out.append(kind)
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b, c = prior[i], prior[i - bpp] if i >= bpp else 0
            pred = (0, a, b, (a + b) // 2, _paeth(a, b, c))[kind]
            out.append((x - pred) % 256)
        prior = row
    return bytes(out)


def _encode(pixels: np.ndarray, filters: list[int], interlace: bool = False,
            extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A 16-bit PNG written independently of camixer_fast.io.image (any filters, Adam7)."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    height, width, channels = pixels.shape
    bpp = 2 * channels
    big = pixels.astype(">u2").view(np.uint8).reshape(height, width, bpp)
    if interlace:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4),
                  (1, 0, 2, 2), (0, 1, 1, 2)]
        data = b"".join(_filtered(sub.reshape(sub.shape[0], -1), bpp, filters)
                        for x0, y0, dx, dy in passes
                        for sub in [big[y0::dy, x0::dx]] if sub.size)
    else:
        data = _filtered(big.reshape(height, -1), bpp, filters)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    return (png16.PNG_SIGNATURE
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0,
                                         int(interlace)))
            + b"".join(chunk(k, v) for k, v in extra)
            + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("interlace", [False, True], ids=["progressive", "adam7"])
@pytest.mark.parametrize("filters", [[0], [1], [2], [3], [4], [0, 1, 2, 3, 4]],
                         ids=["none", "sub", "up", "average", "paeth", "mixed"])
@pytest.mark.parametrize("channels", [1, 2, 3, 4], ids=["grey", "grey-alpha", "rgb", "rgba"])
def test_png16_decodes_every_filter_and_interlace(channels, filters, interlace):
    rng = np.random.default_rng(channels)
    pixels = rng.integers(0, 65536, (11, 9, channels), dtype=np.uint16)
    pixels[3:6] = pixels[3:6] // 64  # small values: carries through the filters differ
    expected = pixels[..., 0] if channels == 1 else pixels
    decoded, chunks = png16.read_png16(_encode(pixels, filters, interlace))
    np.testing.assert_array_equal(decoded, expected)
    assert chunks == []


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (7, 5, 1), (7, 5, 2), (7, 5, 3), (3, 4, 4)],
                         ids=str)
def test_png16_round_trip(shape):
    pixels = np.random.default_rng(1).integers(0, 65536, shape, dtype=np.uint16)
    buf = io.BytesIO()
    png16.write_png16(buf, pixels, [(b"gAMA", struct.pack(">I", 45455))])
    decoded, chunks = png16.read_png16(buf.getvalue())
    np.testing.assert_array_equal(decoded, pixels[..., 0] if shape[2:] == (1,) else pixels)
    assert chunks == [(b"gAMA", struct.pack(">I", 45455))]


def test_png16_written_grey_is_read_by_pillow_as_16_bit():
    buf = io.BytesIO()
    png16.write_png16(buf, GREY16)
    with Image.open(buf) as img:
        assert img.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(img), GREY16)


def test_png16_colour_key_becomes_alpha():
    pixels = RGB16.copy()
    pixels[2, 3] = (1, 2, 3)
    data = _encode(pixels, [0], extra=((b"tRNS", struct.pack(">HHH", 1, 2, 3)),))
    decoded, _ = png16.read_png16(data)
    assert decoded.shape == (H, W, 4)
    assert decoded[2, 3, 3] == 0 and (decoded[..., 3] == 0).sum() == 1


@pytest.mark.parametrize("damage", ["crc", "truncated", "signature", "8-bit"])
def test_png16_rejects_damaged_files(damage):
    data = bytearray(_encode(RGB16, [4]))
    if damage == "crc":
        data[40] ^= 0xFF
    elif damage == "truncated":
        data = data[:60]
    elif damage == "signature":
        data[1] = ord("X")
    else:
        buf = io.BytesIO()
        Image.fromarray(RGBA8).save(buf, "PNG")
        data = buf.getvalue()
    with pytest.raises(png16.PNGError):
        png16.read_png16(bytes(data))
