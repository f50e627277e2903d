"""Training recipes: one loop per file, each with a config dataclass, ``setup``, ``train`` and ``main``.

Registered by name in :data:`trainers.__main__.RECIPES`; nothing is imported here.
"""
