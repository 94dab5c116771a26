"""Parity of the fused GPU block with the network's own module code: the max error of each
stage over the 20 blocks of the S model, and of the whole network, in fp32 / fp16 / bf16.

    python bench/block_parity.py [--image PATH] [--size 64] [--gamma 0.5] [--json PATH]

Without a GPU the kernels run in Triton's interpreter (set here): minutes, not seconds. Each
stage is fed the module's own inputs for it (errors do not compound): the input of every
block is taken from a reference forward of the S model on a crop of a real photo. fp16 / bf16
stages and networks are compared with the fp32 module on the same rounded weights and inputs;
the module itself run in that dtype is printed beside them. Under the interpreter, bf16 runs
with no hard windows (the window-attention kernel's bf16 products do not run there).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CAMIXER_FAST_SHARED", REPO.parent / "shared"))


def _err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (out.detach().float().cpu() - ref.detach().float().cpu()).abs().max().item()


def block_inputs(model, x: torch.Tensor) -> list[tuple]:
    """(block, its input, condition) of every block in a reference forward."""
    seen = []
    hooks = [b.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(
        (m, args[0].detach().clone(), args[1].detach().clone())))
        for g in model.body for b in g.body]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def stage_errors(block, x: torch.Tensor, cond: torch.Tensor, gamma: float,
                 dtype: torch.dtype) -> dict[str, float]:
    from camixer_fast.backends import REGISTRY
    from camixer_fast.kernels.block import block_inference
    from camixer_fast.kernels.depthwise import depthwise_conv3x3
    from camixer_fast.kernels.ffn import ffn_tail
    from camixer_fast.kernels.mixer_tail import mixer_tail
    from camixer_fast.kernels.predictor import predictor
    from camixer_fast.reference.model import MixerSettings, nchw, nhwc, pointwise, spatial

    low = copy.deepcopy(block).to(dtype)
    ref = copy.deepcopy(low).float()
    xl, cl = x.to(dtype), cond.to(dtype)
    xr, cr = xl.float(), cl.float()
    settings = MixerSettings(gamma, "expected", "index", None, False, REGISTRY["reference"].ops)
    w, m = low.weights(), ref.mixer
    out: dict[str, float] = {}
    with torch.no_grad():
        m.capture = {}
        want, routing = ref(xr, cr, settings)
        cap, m.capture = m.capture, None
        v = pointwise(xr, m.project_v)
        route = m.route(v, cr)
        got = predictor(xl, cl, w.v_w, w.v_b, w.route_w, w.route_b, w.route_norm_w,
                        w.route_norm_b, w.off1_w, w.off1_b, w.off2_w, w.off2_b, w.ca_w, w.ca_b,
                        w.sa_w, w.sa_b)
        for name, a, b in (("predictor.v", v, got.v), ("predictor.hidden", route.hidden,
                                                         got.hidden),
                           ("predictor.offsets", route.offsets, nchw(got.offsets)),
                           ("predictor.sa", route.sa, got.sa), ("predictor.ca", route.ca, got.ca)):
            out[name] = _err(a, b)
        attn = nhwc(cap["attn_out"])
        z = spatial(attn, m.conv_sptial[0])
        out["depthwise3x3"] = _err(z, depthwise_conv3x3(attn.to(dtype), w.dw_w, w.dw_b))
        y = spatial(z, m.conv_sptial[1])
        mixed = pointwise(torch.addcmul(attn, F.gelu(y), route.ca.view(-1, 1, 1, y.shape[-1])),
                          m.project_out)
        x1 = ref.norm1(mixed + xr)
        tail = mixer_tail(z.to(dtype), attn.to(dtype), xl, route.ca, w.dil_w, w.dil_b, w.out_w,
                          w.out_b, w.norm1_w, w.norm1_b, w.ffn_in_w)
        out["mixer_tail.x1"] = _err(x1, tail.x1)
        u = pointwise(x1, ref.ffn.project_in)
        out["mixer_tail.u"] = _err(u, tail.u)
        out["ffn_tail"] = _err(ref.norm2(ref.ffn(x1) + x1),
                               ffn_tail(u.to(dtype), x1.to(dtype), w.ffn_dw_w, w.ffn_out_w,
                                        w.norm2_w, w.norm2_b))
        whole, whole_routing = block_inference(w, xl, cl, settings)
        if torch.equal(whole_routing.num_hard, routing.num_hard):
            out["block"] = _err(want, whole)
    return out


def network_errors(weights: Path, x: torch.Tensor, gamma: float,
                   dtype: torch.dtype) -> dict[str, float]:
    import camixer_fast

    ref = camixer_fast.load_model(weights, backend="reference", gamma=gamma)
    fused = camixer_fast.load_model(weights, backend="triton", gamma=gamma, dtype=dtype)
    with torch.no_grad():
        rounded = x.to(dtype)
        if dtype != torch.float32:
            # the fp32 reference on the same rounded weights and input
            ref.load_state_dict({k: v.to(dtype).float() for k, v in ref.state_dict().items()})
        want = ref(rounded.float())
        out = {"network": _err(want, fused(rounded))}
        if dtype != torch.float32:
            module = copy.deepcopy(ref).to(dtype)
            out["network, the module in this dtype"] = _err(want, module(rounded))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(SHARED / "data" / "Urban100"),
                        help="a PNG, or a folder whose first PNG is used")
    parser.add_argument("--size", type=int, default=64, help="side of the centre crop")
    parser.add_argument("--gamma", type=float, default=0.5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO / "tests"))
    import camixer_fast
    from conftest import load_rgb

    path = Path(args.image)
    if path.is_dir():
        path = sorted(path.rglob("*.png"))[0]
    img = load_rgb(path)
    h, w = img.shape[-2:]
    s = min(args.size, h, w)
    img = img[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s].contiguous()
    weights = SHARED / "weights" / "CAMixerSR_S.pth"
    model = camixer_fast.load_model(weights, backend="reference", gamma=args.gamma)
    blocks = block_inputs(model, img)
    results: dict[str, dict[str, float]] = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        gamma = 0.0 if dtype == torch.bfloat16 else args.gamma
        worst: dict[str, float] = {}
        for block, x, cond in blocks:
            for k, v in stage_errors(block, x, cond, gamma, dtype).items():
                worst[k] = max(worst.get(k, 0.0), v)
        worst.update(network_errors(weights, img, gamma, dtype))
        label = f"{str(dtype)[6:]}, gamma={gamma}"
        results[label] = worst
        print(f"\n{label} ({path.name}, {s}x{s} crop): max abs error over the 20 blocks")
        for k, v in worst.items():
            print(f"  {k:38s} {v:.3e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
