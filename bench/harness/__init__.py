"""Benchmark harness: offline models, equal-work probes, isolated worker processes, statistics.

Import it as ``bench.harness`` with the repository root on ``sys.path`` (``python -m bench.rm_vs_trl``
from the root does that; ``python bench/rm_vs_trl.py`` inserts the root itself). Heavy imports
(torch, transformers, trl) happen inside functions, so importing this package is cheap.

Modules:
    assets   -- word-level tokenizer + random-init Llama shapes, built once into a cache dir
    pairs    -- preference pairs of exactly L words per side (chosen: k positive lexicon words)
    probes   -- work counters (hooks), per-step timers, RSS readings
    stats    -- medians, IQR, validity checks, Markdown table
    profiling -- torch.profiler op-time breakdown of the timed steps (``--profile``)
    runner   -- one fresh subprocess per (framework, workload, seed), ABAB order
    worker   -- the subprocess entry point (``python -m bench.harness.worker``)
    rm_trl / rm_ours -- the two reward-model training sides
"""
