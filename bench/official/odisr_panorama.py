"""CAMixerOSR panoramas through ``camixer_fast.upscale``: the 0°/360° seam with and without the
wrap, and an 8K ERP output under an address-space limit. Rows go to bench/results.jsonl.

    python bench/official/odisr_panorama.py seam        # 128x256 LR, ~2 min on 2 cores
    python bench/official/odisr_panorama.py 8k --limit-gb 4     # 1024x2048 LR -> 4096x8192

No ERP image is in ../shared/data: the panorama is Urban100 img_002 resized to H×H beside its
mirror image (2:1, continuous across the seam). Weights: seeded official-layout ×4 (C = 60,
6×4 blocks, odisr_fixture.py), not the published ones (not reachable here). Seam step: mean
|SR[..., 0] − SR[..., -1]| against the mean step between neighbouring columns; seam error: mean
|SR − SR'| on the 32 output columns each side of the seam, SR' the panorama rolled by half its
width (seam inside) and rolled back, γ = 1 (no routing differences), beside the same error on
32 columns each side of a quarter of the width.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, SHARED, THREADS, append_rows, machine_stamp, row  # noqa: E402
from odisr_fixture import seeded_state_dict  # noqa: E402

import camixer_fast  # noqa: E402
from camixer_fast.inference import api, tiling  # noqa: E402


def panorama(height: int) -> np.ndarray:
    """(height, 2·height, 3) uint8: the image beside its mirror, periodic along the width."""
    image = Image.open(SHARED / "data" / "Urban100" / "HR" / "img_002.png").convert("RGB")
    half = np.asarray(image.resize((height, height), Image.BICUBIC))
    return np.ascontiguousarray(np.concatenate([half, half[:, ::-1]], axis=1))


def band_error(sr: torch.Tensor, ref: torch.Tensor, centre: int, half: int) -> float:
    columns = torch.arange(centre - half, centre + half) % sr.shape[-1]
    return float((sr - ref)[..., columns].abs().mean())


def seam(stamp: dict, weights: dict) -> list[dict]:
    x = torch.from_numpy(panorama(128)).permute(2, 0, 1)[None].float() / 255
    width, rows = x.shape[-1], []
    for tile in (None, 64):
        ref = camixer_fast.upscale(x.roll(width // 2, -1), 1.0, weights=weights, tile=tile,
                                   wrap=False).roll(-width // 2 * 4, -1)
        for wrap in (False, True):
            sr = camixer_fast.upscale(x, 1.0, weights=weights, tile=tile, wrap=wrap)
            values = {"seam_step": float((sr[..., 0] - sr[..., -1]).abs().mean()),
                      "interior_step": float((sr[..., 1:] - sr[..., :-1]).abs().mean()),
                      "seam_error": band_error(sr, ref, 0, 32),
                      "interior_error": band_error(sr, ref, width, 32)}
            case = (f"seam {'wrapped' if wrap else 'unwrapped'} "
                    f"{'whole' if tile is None else f'T{tile}'}")
            print(case, values)
            rows += [row("odisr-panorama", case, k, v, "", stamp, lr_size="128x256", gamma=1.0,
                         tile=tile, wrap=tiling.PANORAMA_MARGIN if wrap else 0,
                         weights="seeded published layout x4",
                         image="Urban100 img_002 + mirror") for k, v in values.items()]
    return rows


def eight_k(stamp: dict, weights: dict, limit_gb: float) -> list[dict]:
    limit = int(limit_gb * 1e9)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    chosen = []

    def recording(*args, **kwargs):
        chosen.append(api_auto_tile(*args, **kwargs))
        return chosen[-1]

    api_auto_tile, api.auto_tile = api.auto_tile, recording
    lr = panorama(1024)
    start = time.perf_counter()
    sr = camixer_fast.upscale(lr, 0.5, weights=weights, tile="auto")
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    values = {"wall": (seconds, "s"), "peak_rss": (peak, "MB"), "tile": (chosen[0] or 0, "px")}
    print(sr.shape, values)
    return [row("odisr-panorama", "8k ERP: LR 1024x2048 x4 tile=auto wrapped", k, v, unit, stamp,
                limit_as_gb=limit_gb, gamma=0.5, wrap=tiling.PANORAMA_MARGIN,
                weights="seeded published layout x4")
            for k, (v, unit) in values.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("seam", "8k"))
    parser.add_argument("--limit-gb", type=float, default=4.0, help="RLIMIT_AS of the 8k run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    weights = seeded_state_dict("published", 4)
    stamp = machine_stamp()
    rows = seam(stamp, weights) if args.what == "seam" else eight_k(stamp, weights, args.limit_gb)
    append_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
