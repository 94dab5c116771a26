"""One model forward on the Triton backend (and, with ``--train``, one training step with
backward), on CUDA: the program ``tests/gpu_check.sh`` runs under compute-sanitizer's memcheck.

A model of the S width (C = 36, or ``--channels``) with two groups of one block -- every kernel
a block launches, each launch as in the full network -- random weights (seeded), an input of
``--size`` at γ = 0.5 (hard and simple windows both). Exit status 1 if an output is not finite.

    python tests/gates/gpu_forward.py --dtype float16 [--train] [--size 64x48]
"""

from __future__ import annotations

import argparse
import sys


def parse_size(text: str) -> tuple[int, int]:
    """"WxH" -> (W, H)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WxH, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"expected a positive WxH, got {text!r}")
    return w, h


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), required=True)
    parser.add_argument("--channels", type=int, default=36)
    parser.add_argument("--size", type=parse_size, default=(64, 48), help="input WxH")
    parser.add_argument("--train", action="store_true", help="a training step too")
    args = parser.parse_args(argv)
    import torch

    import camixer_fast

    if not torch.cuda.is_available():
        print("error: needs a CUDA device", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = camixer_fast.CAMixerSR(n_feats=args.channels, blocks_per_group=(1, 1))
    model = model.to("cuda", dtype).eval()
    model.backend = "triton"
    w, h = args.size
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(1, 3, h, w, device="cuda", dtype=dtype, generator=g)
    with torch.inference_mode():
        out = model(x)
    torch.cuda.synchronize()
    finite = {"forward": bool(torch.isfinite(out).all())}
    if args.train:
        model.train()
        sr, ratio_loss = model(torch.rand(2, 3, h, w, device="cuda", dtype=dtype,
                                                  generator=g))
        (sr.float().abs().mean() + ratio_loss.float()).backward()
        torch.cuda.synchronize()
        finite["train"] = all(bool(torch.isfinite(p.grad).all())
                              for p in model.parameters() if p.grad is not None)
    print(f"{args.dtype}: " + ", ".join(f"{k} {'finite' if v else 'NOT FINITE'}"
                                        for k, v in finite.items()))
    return 0 if all(finite.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
