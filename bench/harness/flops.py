"""Matmul work of one reward-model training step, counted from the model shape (no torch needed).

Why: on the CPU both frameworks spend most of a step in the same GEMM kernels, so the speedup one
implementation can have over another at equal work is bounded by how much matmul work it avoids and
by how long the unavoidable GEMMs take on the machine. ``linear_shapes`` lists every linear layer's
(rows, in, out) for one forward pass; ``step_flops`` counts forward + backward FLOPs; the ceiling
script (``bench/rm_ceiling.py``) times exactly those GEMMs.

The counting lives in :mod:`trainers.compute` (the trainers' compute accounting uses the same
convention); this module re-exports it so the benchmarks keep one import path.
"""

from __future__ import annotations

from trainers.compute import Shape, attention_flops, layer_linears, linear_shapes, step_flops

__all__ = ["Shape", "attention_flops", "layer_linears", "linear_shapes", "step_flops"]
