"""Checkpoint loading: formats, hyperparameter inference, registry resolution, refusals."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch

import camixer_fast
from camixer_fast.models import loading, weights
from camixer_fast.models.loading import CheckpointError, infer_config
from camixer_fast.models.weights import RegisteredWeights


@pytest.fixture(scope="module")
def official(weights_path: Path) -> dict:
    return torch.load(weights_path, weights_only=True)


def test_infer_config_official(official: dict) -> None:
    assert infer_config(official["params_ema"]) == {
        "n_feats": 36, "scale": 4, "blocks_per_group": (4, 4, 6, 6), "window_size": 16}


def test_prefers_params_ema(official: dict) -> None:
    model = camixer_fast.load_model(official)
    assert torch.equal(model.head.weight, official["params_ema"]["head.weight"])
    assert not torch.equal(model.head.weight, official["params"]["head.weight"])


@pytest.mark.parametrize("wrap", ["params", "bare", "module-prefix"])
def test_other_layouts(official: dict, wrap: str, tmp_path: Path) -> None:
    sd = official["params"] if wrap == "params" else official["params_ema"]
    obj = {"params": sd} if wrap == "params" else sd
    if wrap == "module-prefix":
        obj = {f"module.{k}": v for k, v in sd.items()}
    torch.save(obj, tmp_path / "w.pth")
    model = camixer_fast.load_model(tmp_path / "w.pth", gamma=0.25)
    assert torch.equal(model.tail[0].weight, sd["tail.0.weight"])
    assert model.gamma == 0.25 and not model.training and model.backend == "cpu"


@pytest.mark.parametrize("config", [
    dict(n_feats=12, scale=2, blocks_per_group=(1, 2), window_size=8),
    dict(n_feats=20, scale=3, blocks_per_group=(2,), window_size=4),
], ids=["C12-x2-8px", "C20-x3-4px"])
def test_other_model_sizes_round_trip(config: dict) -> None:
    torch.manual_seed(0)
    source = camixer_fast.CAMixerSR(**config).eval()
    model = camixer_fast.load_model(source.state_dict(), backend="reference")
    assert infer_config(source.state_dict()) == config
    x = torch.rand(2, 3, 11, 13)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    assert model(x).shape == (2, 3, 11 * config["scale"], 13 * config["scale"])


def test_missing_and_unexpected_keys_are_named(official: dict) -> None:
    sd = dict(official["params_ema"])
    del sd["body.1.body.2.mixer.project_q.bias"]
    sd["body.0.body.0.mixer.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        camixer_fast.load_model(sd)
    assert "missing: body.1.body.2.mixer.project_q.bias" in str(err.value)
    assert "unexpected: body.0.body.0.mixer.extra.weight" in str(err.value)


def test_wrong_shape_is_named(official: dict) -> None:
    sd = dict(official["params_ema"])
    sd["body.2.body.0.ffn.dwconv.weight"] = torch.zeros(72, 1, 5, 5)
    with pytest.raises(CheckpointError, match=r"wrong shape: body.2.body.0.ffn.dwconv.weight"):
        camixer_fast.load_model(sd)


@pytest.mark.parametrize("obj, message", [
    ({"head.weight": torch.zeros(3)}, "missing 'tail.0.weight'"),
    ({"state": 3}, "not named tensors"),
    ({"head.weight": torch.zeros(8, 3, 3, 3), "tail.0.weight": torch.zeros(10, 8, 3, 3)},
     "not 3·s²"),
    ({"head.weight": torch.zeros(8, 3, 3, 3), "tail.0.weight": torch.zeros(12, 8, 3, 3)},
     "no 'body"),
], ids=["no-tail", "not-tensors", "bad-scale", "no-body"])
def test_not_a_camixer_state_dict(obj: dict, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        camixer_fast.load_model(obj)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        camixer_fast.load_model(junk)
    with pytest.raises(FileNotFoundError):
        camixer_fast.load_model(tmp_path / "nothing.pth")
    with pytest.raises(CheckpointError, match="neither a weights file nor a registered name"):
        camixer_fast.load_model("CAMixerSR-XXL")


def test_bad_load_arguments(weights_path: Path, monkeypatch) -> None:
    with pytest.raises(ValueError, match="gamma"):
        camixer_fast.load_model(weights_path, gamma=2.0)
    with pytest.raises(ValueError, match="routing"):
        camixer_fast.load_model(weights_path, routing="top-k")
    with pytest.raises(ValueError, match="backend"):
        camixer_fast.load_model(weights_path, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)       # the test session sets it
    ok, reason = camixer_fast.can_use_triton("cpu")
    assert not ok and "CUDA" in reason
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here"):
        camixer_fast.load_model(weights_path, backend="triton", device="cpu")


def test_dtype_and_device(weights_path: Path) -> None:
    model = camixer_fast.load_model(weights_path, dtype=torch.float64, device="cpu")
    assert model.head.weight.dtype == torch.float64
    with torch.no_grad():
        assert model(torch.rand(1, 3, 5, 6, dtype=torch.float64)).dtype == torch.float64


def test_registered_name_from_environment(weights_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CAMIXER_FAST_WEIGHTS", str(weights_path.parent))
    assert weights.resolve_weights("CAMixerSR-S") == weights_path
    monkeypatch.setenv("CAMIXER_FAST_WEIGHTS", str(weights_path))
    assert weights.resolve_weights("CAMixerSR-S") == weights_path
    model = camixer_fast.load_model("CAMixerSR-S")
    assert model.n_feats == 36


class FakeDownload:
    """Stands in for urlopen: serves ``payload`` and counts the calls."""

    def __init__(self, payload: bytes) -> None:
        self.payload, self.calls = payload, 0

    def __call__(self, url: str, timeout: float) -> io.BytesIO:
        self.calls += 1
        return io.BytesIO(self.payload)


@pytest.fixture()
def fake_registry(tmp_path: Path, monkeypatch, weights_path: Path):
    """An empty cache, no environment variable, and a registry entry for the real file."""
    payload = weights_path.read_bytes()
    monkeypatch.delenv("CAMIXER_FAST_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    entry = RegisteredWeights("CAMixerSR_S.pth", "https://example.invalid/CAMixerSR_S.pth",
                              hashlib.sha256(payload).hexdigest(), len(payload))
    monkeypatch.setitem(weights.REGISTRY, "CAMixerSR-S", entry)
    return payload, tmp_path / "cache" / "camixer_fast" / "CAMixerSR_S.pth"


def test_download_is_verified_then_cached(fake_registry, monkeypatch) -> None:
    payload, cached = fake_registry
    fake = FakeDownload(payload)
    monkeypatch.setattr(weights.urllib.request, "urlopen", fake)
    assert weights.resolve_weights("CAMixerSR-S") == cached
    assert weights.resolve_weights("CAMixerSR-S") == cached
    assert fake.calls == 1 and cached.read_bytes() == payload
    cached.write_bytes(b"corrupted")                  # a damaged cache is fetched again
    assert weights.resolve_weights("CAMixerSR-S") == cached and fake.calls == 2


def test_download_with_wrong_digest_leaves_nothing(fake_registry, monkeypatch) -> None:
    payload, cached = fake_registry
    monkeypatch.setattr(weights.urllib.request, "urlopen", FakeDownload(payload[:-10]))
    with pytest.raises(CheckpointError, match="sha256"):
        weights.resolve_weights("CAMixerSR-S")
    assert not cached.parent.exists(), "the cache folder it created was left behind"


def test_no_network_is_one_line_saying_where_to_put_the_file(fake_registry, monkeypatch):
    import urllib.error

    _, cached = fake_registry

    def offline(url, timeout):
        raise urllib.error.URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(weights.urllib.request, "urlopen", offline)
    with pytest.raises(CheckpointError) as info:
        weights.resolve_weights("CAMixerSR-S")
    message = str(info.value)
    print(message)
    assert "\n" not in message
    for part in ("cannot download CAMixerSR_S.pth", str(cached), "$CAMIXER_FAST_WEIGHTS",
                 "https://example.invalid/CAMixerSR_S.pth"):
        assert part in message
    assert not (cached.parents[1]).exists(), "an empty cache folder was left behind"


def _missing(tmp: Path) -> str:
    return str(tmp / "nowhere" / "CAMixerSR_S.pth")


def _empty_folder(tmp: Path) -> str:
    (tmp / "empty").mkdir()
    return str(tmp / "empty")



def test_a_weights_file_in_the_environment_serves_its_own_name_only(weights_path: Path,
                                                                   tmp_path: Path,
                                                                   monkeypatch) -> None:
    renamed = tmp_path / "my_s.pth"
    renamed.write_bytes(weights_path.read_bytes())
    monkeypatch.setenv("CAMIXER_FAST_WEIGHTS", str(renamed))
    assert weights.resolve_weights("CAMixerSR-S") == renamed          # its sha256 is S's
    monkeypatch.setattr(weights, "download", pytest.fail)
    with pytest.raises(CheckpointError, match="is a file, but not CAMixerSR_M.pth"):
        weights.resolve_weights("CAMixerSR-M")

def _relative_from_elsewhere(tmp: Path) -> str:
    return "weights/CAMixerSR_S.pth"


@pytest.mark.parametrize("make", [_missing, _empty_folder, _relative_from_elsewhere],
                         ids=["missing-path", "empty-folder", "relative-path"])
def test_environment_pointing_nowhere_is_an_error(make, tmp_path, monkeypatch):
    value = make(tmp_path)
    monkeypatch.setenv("CAMIXER_FAST_WEIGHTS", value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(weights, "download", pytest.fail)
    with pytest.raises(CheckpointError) as info:
        weights.resolve_weights("CAMixerSR-S")
    assert f"$CAMIXER_FAST_WEIGHTS={value}" in str(info.value)


@pytest.mark.parametrize("content", [b"hello, I am a text file\n", b"",
                                     b"\x80\x02garbage pickle"],
                         ids=["text", "empty", "broken-pickle"])
def test_a_non_checkpoint_never_suggests_weights_only_false(content, tmp_path):
    path = tmp_path / "weights.txt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        loading.load_model(path)
    print(info.value)
    assert "weights_only" not in str(info.value) and str(path) in str(info.value)
    assert "checkpoint" in str(info.value)


def test_a_pickle_of_other_objects_is_refused_by_what_it_holds(tmp_path):
    import fractions

    path = tmp_path / "objects.pth"
    torch.save({"ratio": fractions.Fraction(1, 3)}, path)
    with pytest.raises(CheckpointError, match="holds a fractions.Fraction object") as info:
        loading.load_model(path)
    assert "weights_only" not in str(info.value)


def test_registry_digest_is_the_official_one(weights_path: Path) -> None:
    entry = weights.REGISTRY["CAMixerSR-S"]
    assert hashlib.sha256(weights_path.read_bytes()).hexdigest() == entry.sha256
    assert weights_path.stat().st_size == entry.size
