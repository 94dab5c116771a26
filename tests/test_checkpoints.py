"""safetensors in and out, ``camixer-fast convert``, and every published checkpoint by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import camixer_fast
from camixer_fast.models import weights
from camixer_fast.cli import main
from camixer_fast.models.convert import convert_checkpoint
from camixer_fast.models.loading import CheckpointError
from camixer_fast.models.weights import REGISTRY, RegisteredWeights, git_blob_id


@pytest.fixture(scope="module")
def official(weights_path: Path) -> dict:
    return torch.load(weights_path, weights_only=True)


@pytest.fixture(scope="module")
def s_safetensors(weights_path: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("st") / "CAMixerSR_S.safetensors"
    convert_checkpoint(weights_path, out)
    return out


def _forward(model: camixer_fast.CAMixerSR) -> torch.Tensor:
    x = torch.rand(1, 3, 17, 33, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


def test_safetensors_round_trip(s_safetensors: Path, official: dict, weights_path: Path,
                                tmp_path: Path, one_thread) -> None:
    tensors = load_file(s_safetensors)
    assert tensors.keys() == official["params_ema"].keys()
    assert all(torch.equal(tensors[k], v) for k, v in official["params_ema"].items())
    back = tmp_path / "back.pth"
    assert main(["convert", str(s_safetensors), str(back)]) == 0
    layout = torch.load(back, weights_only=True)
    assert set(layout) == {"params", "params_ema"}
    for key in ("params", "params_ema"):
        assert all(torch.equal(layout[key][k], v) for k, v in official["params_ema"].items())
    # the two keys share their tensors: one copy on disk
    assert back.stat().st_size < 1.2 * s_safetensors.stat().st_size
    ref = _forward(camixer_fast.load_model(weights_path, backend="reference"))
    for path in (s_safetensors, back):
        assert torch.equal(_forward(camixer_fast.load_model(path, backend="reference")), ref)


def test_safetensors_metadata(s_safetensors: Path, weights_path: Path) -> None:
    from safetensors import safe_open

    with safe_open(s_safetensors, framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["camixer_fast.config"]) == {
        "n_feats": 36, "scale": 4, "blocks_per_group": [4, 4, 6, 6], "window_size": 16}
    assert meta["camixer_fast.parameters"] == "351238"
    assert meta["camixer_fast.source"] == "CAMixerSR_S.pth"
    assert meta["camixer_fast.source_key"] == "params_ema"
    assert meta["camixer_fast.source_sha256"] == REGISTRY["CAMixerSR-S"].sha256
    assert meta["camixer_fast.dtype"] == "float32" and meta["format"] == "pt"


def test_convert_key_and_dtype(official: dict, tmp_path: Path) -> None:
    out = tmp_path / "s_raw_fp16.safetensors"
    meta = convert_checkpoint("CAMixerSR-S", out, key="params", dtype=torch.float16)
    assert meta["camixer_fast.source_key"] == "params" and meta["camixer_fast.dtype"] == "float16"
    tensors = load_file(out)
    assert tensors["head.weight"].dtype == torch.float16
    assert torch.equal(tensors["head.weight"], official["params"]["head.weight"].half())
    model = camixer_fast.load_model(out, backend="reference")   # cast to fp32 by load_model
    assert model.head.weight.dtype == torch.float32


def _save(tmp_path: Path, state_dict: dict, metadata: dict | None = None,
          name: str = "w.safetensors") -> Path:
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path, metadata=metadata)
    return path


def test_safetensors_missing_and_unexpected_keys_are_named(official: dict,
                                                           tmp_path: Path) -> None:
    sd = dict(official["params_ema"])
    del sd["body.1.body.2.mixer.project_q.bias"]
    sd["body.0.body.0.mixer.extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        camixer_fast.load_model(_save(tmp_path, sd))
    assert "missing: body.1.body.2.mixer.project_q.bias" in str(err.value)
    assert "unexpected: body.0.body.0.mixer.extra.weight" in str(err.value)


def test_safetensors_wrong_shape_and_not_camixer(official: dict, tmp_path: Path) -> None:
    sd = dict(official["params_ema"])
    sd["body.2.body.0.ffn.dwconv.weight"] = torch.zeros(72, 1, 5, 5)
    with pytest.raises(CheckpointError, match=r"wrong shape: body.2.body.0.ffn.dwconv.weight"):
        camixer_fast.load_model(_save(tmp_path, sd))
    with pytest.raises(CheckpointError, match="missing 'tail.0.weight'"):
        camixer_fast.load_model(_save(tmp_path, {"head.weight": torch.zeros(3)}, name="x.st"))


def test_safetensors_metadata_must_agree_with_shapes(official: dict, tmp_path: Path) -> None:
    config = {"n_feats": 36, "scale": 2, "blocks_per_group": [4, 4, 6, 6], "window_size": 16}
    path = _save(tmp_path, official["params_ema"], {"camixer_fast.config": json.dumps(config)})
    with pytest.raises(CheckpointError, match="the config in its metadata"):
        camixer_fast.load_model(path)


def test_damaged_safetensors(s_safetensors: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(s_safetensors.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        camixer_fast.load_model(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        camixer_fast.load_model(junk)


@pytest.mark.parametrize("kind, suffix", [("pth", ".safetensors"), ("safetensors", ".pth"),
                                          ("pth", ".bin")],
                         ids=["pth-named-safetensors", "safetensors-named-pth", "pth-named-bin"])
def test_format_is_told_by_content_not_suffix(kind: str, suffix: str, weights_path: Path,
                                              s_safetensors: Path, official: dict,
                                              tmp_path: Path) -> None:
    renamed = tmp_path / f"weights{suffix}"
    renamed.write_bytes((weights_path if kind == "pth" else s_safetensors).read_bytes())
    expected = official["params_ema"]["head.weight"]
    assert torch.equal(camixer_fast.load_model(renamed).head.weight, expected)
    convert_checkpoint(renamed, tmp_path / "out.safetensors")
    assert torch.equal(load_file(tmp_path / "out.safetensors")["head.weight"], expected)


def test_convert_refusals_leave_nothing(official: dict, weights_path: Path, tmp_path: Path,
                                        capsys) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    assert main(["convert", str(weights_path), str(out)]) == 2           # exists
    assert out.read_bytes() == b"keep me"
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert", str(weights_path), str(tmp_path / "out.onnx")]) == 2
    assert main(["convert", str(weights_path), str(tmp_path / "no" / "x.pth")]) == 2
    bad = tmp_path / "bad.pth"
    torch.save({"params_ema": {"conv.weight": torch.zeros(3)}}, bad)
    assert main(["convert", str(bad), str(tmp_path / "bad.safetensors")]) == 1
    assert "missing 'head.weight'" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nothing.pth"), str(tmp_path / "n.pth")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth", "out.safetensors"]
    assert main(["convert", str(weights_path), str(out), "--overwrite"]) == 0
    assert "351,238 parameters" in capsys.readouterr().out


def test_registry_names_every_published_checkpoint() -> None:
    folders = {name: entry.url.split("/")[-2] for name, entry in REGISTRY.items()}
    assert sorted(n for n, f in folders.items() if f == "LargeSR") == [
        "CAMixerSR-B", "CAMixerSR-ClassSR", "CAMixerSR-M", "CAMixerSR-S"]
    assert sorted(n for n, f in folders.items() if f == "LightSR") == [
        "CAMixerSR-LightSR-x2", "CAMixerSR-LightSR-x2-DF2K", "CAMixerSR-LightSR-x3",
        "CAMixerSR-LightSR-x4", "CAMixerSR-LightSR-x4-DF2K"]
    assert sorted(n for n, f in folders.items() if f == "ODISR") == [
        "CAMixerSR-ODISR-x2", "CAMixerSR-ODISR-x4"]
    for name, entry in REGISTRY.items():
        assert entry.url.endswith(f"/{entry.filename}") and len(entry.git_blob) == 40, name
    blobs: dict[str, set[str]] = {}
    for entry in REGISTRY.values():
        blobs.setdefault(entry.stored_name, set()).add(entry.git_blob)
    assert all(len(b) == 1 for b in blobs.values()), blobs   # one local name, one file
    assert REGISTRY["CAMixerSR-B"].git_blob == REGISTRY["CAMixerSR-LightSR-x4"].git_blob


def test_git_blob_of_the_official_file(weights_path: Path) -> None:
    assert git_blob_id(weights_path) == REGISTRY["CAMixerSR-S"].git_blob


@pytest.mark.parametrize("name", ["CAMixerSR-ODISR-x2", "CAMixerSR-ODISR-x4"])
def test_odisr_names_resolve_apart_from_lightsr(name: str, empty_cache: Path) -> None:
    entry = REGISTRY[name]
    assert entry.stored_name != REGISTRY["CAMixerSR-LightSR-x2"].stored_name
    with pytest.raises(CheckpointError, match=f"put it at {empty_cache / entry.stored_name}"):
        camixer_fast.load_model(name)


@pytest.fixture()
def empty_cache(tmp_path: Path, monkeypatch) -> Path:
    """No environment variable, an empty cache, and no network (any download attempt fails)."""
    monkeypatch.delenv("CAMIXER_FAST_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def no_network(*args, **kwargs):
        raise AssertionError("tried to download")

    monkeypatch.setattr(weights.urllib.request, "urlopen", no_network)
    return tmp_path / "cache" / "camixer_fast"


@pytest.mark.parametrize("name", sorted(n for n, e in REGISTRY.items()
                                        if e.sha256 is None))
def test_unverified_names_are_never_downloaded(name: str, empty_cache: Path) -> None:
    entry = REGISTRY[name]
    with pytest.raises(CheckpointError) as err:
        weights.resolve_weights(name)
    message = str(err.value)
    assert "no sha256 is published" in message and entry.url in message
    assert str(empty_cache / entry.stored_name) in message and "CAMIXER_FAST_WEIGHTS" in message
    assert not empty_cache.exists() or not any(empty_cache.iterdir())


def test_unverified_name_from_cache_or_environment(weights_path: Path, empty_cache: Path,
                                                   monkeypatch, tmp_path: Path) -> None:
    # a stand-in entry for the S file without its sha256: only its git object id is known
    entry = RegisteredWeights("CAMixerSR_S.pth", "https://example.invalid/CAMixerSR_S.pth",
                              git_blob=git_blob_id(weights_path))
    monkeypatch.setitem(REGISTRY, "CAMixerSR-M", entry)
    cached = empty_cache / "CAMixerSR_S.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights_path.read_bytes())
    assert weights.resolve_weights("CAMixerSR-M") == cached
    assert camixer_fast.load_model("CAMixerSR-M").n_feats == 36
    damaged = bytearray(weights_path.read_bytes())
    damaged[-1] ^= 0xFF                                               # not the official file
    cached.write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match="is not the official CAMixerSR_S.pth"):
        weights.resolve_weights("CAMixerSR-M")
    monkeypatch.setenv("CAMIXER_FAST_WEIGHTS", str(weights_path.parent))
    assert weights.resolve_weights("CAMixerSR-M") == weights_path


def test_light_sr_configs_are_inferred() -> None:
    # the official LightSR options: CAMixerSR(ratio=0.5, scale=s) with the class defaults,
    # C = 60, blocks (4, 4, 6, 6), window 16
    for scale in (2, 3, 4):
        sd = camixer_fast.CAMixerSR(n_feats=60, scale=scale).state_dict()
        assert camixer_fast.infer_config(sd) == {
            "n_feats": 60, "scale": scale, "blocks_per_group": (4, 4, 6, 6), "window_size": 16}


def test_classsr_and_odisr_state_dicts_are_refused(official: dict) -> None:
    sd = official["params_ema"]
    classsr = {"classifier.lastOut.weight": torch.zeros(3, 32)}
    for branch in ("net1", "net2", "net3"):
        classsr.update({f"{branch}.{k}": v for k, v in sd.items()})
    with pytest.raises(CheckpointError, match="ClassSR state dict.*removeprefix"):
        camixer_fast.load_model(classsr)
    branch = {k.removeprefix("net3."): v for k, v in classsr.items() if k.startswith("net3.")}
    assert camixer_fast.load_model(branch).n_feats == 36
    osr = {"head.weight": sd["head.weight"], "dcn.weight": torch.zeros(36, 36, 3, 3),
           "offset_conv.0.weight": torch.zeros(36, 1, 1, 1)}
    with pytest.raises(CheckpointError, match="ODISR state dict of CAMixerOSR"):
        camixer_fast.infer_config(osr)
    with pytest.raises(CheckpointError, match="'tail.0.weight' has 0 output channels"):
        camixer_fast.load_model(osr)                 # loaded as CAMixerOSR: it is incomplete

