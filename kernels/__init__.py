"""Fused Triton kernels for CAMixerSR's hot operations (routing, deformable warp, window
attention), with the signatures of their twins in ``camixer_fast.reference``.

Not built yet: ``camixer_fast.backends`` reports the Triton backend as unavailable until they are.
"""
