"""Work counters for the RL benchmarks: what every transformer trunk did in each iteration.

Framework-independent, like :class:`bench.harness.probes.WorkCounter`, but for online RL, where one
iteration runs several models in several modes. Each trunk (the backbone under an LM head or a value
head) is attached under a role name — ``policy``, ``reference``, ``value``, ``mask`` — and every call
to it is classified from its arguments alone:

* ``prefill``: a generation call that starts a KV cache (``use_cache=True`` or a cache object,
  nothing cached yet): its rows are the prompts, its token checksum is the prompts' ids;
* ``decode``: a generation call that extends a non-empty cache (one new token per row);
* ``full``: any other call (a teacher-forced pass over prompt + response), with or without grad.

So "generated tokens" per iteration = prefill rows + decode rows (each call yields one token per
row), identical for HF ``generate`` and our own sampling loop. Backward passes are counted with a
gradient hook on one parameter of each trainable trunk (the last one: never tied to an embedding),
parameter updates with torch's global optimizer-step hook, per trunk whose parameters the stepping
optimizer holds (TRL's PPO steps policy and value with one optimizer, ours with two: both count one
update per trunk). Hooks keep Python ints and 0-dim tensors only, read after the run, so no probe
synchronises inside a timed step; a decode call costs one tuple append.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

KINDS = ("prefill", "decode", "full")

COUNTS = (
    "prefill_rows",
    "prefill_tokens",
    "decode_calls",
    "decode_rows",
    "nograd_full_rows",
    "nograd_full_tokens",
    "grad_full_rows",
    "grad_full_tokens",
    "backward",
    "updates",
)
"""Per-trunk counters of one iteration (key ``<role>.<counter>``); all of them are equal-work checks."""


def classify(ids_width: int, use_cache: Any, past: Any) -> str:
    """``prefill`` / ``decode`` / ``full`` from a trunk call's arguments (see the module doc).

    ``past`` is the cache object or None; an empty cache (HF ``generate``'s first call) is a prefill.
    """
    cached = 0
    if past is not None:
        get = getattr(past, "get_seq_length", None)
        cached = int(get()) if callable(get) else 1
    if cached > 0:
        return "decode"
    if use_cache is True or past is not None:
        return "prefill"
    return "full"


@dataclass
class _Call:
    step: int
    role: str
    kind: str
    grad: bool
    rows: int
    tokens: Any  # int or 0-dim tensor: real (mask = 1) tokens among the call's input columns
    checksum: Any  # 0-dim tensor for prefill calls (Σ id·(id + 7) over real prompt tokens), else 0


@dataclass
class RLWorkCounter:
    """Counts the calls, backward passes and updates of named trunks, attributed to the current step.

    ``step`` is set by :class:`bench.harness.probes.StepProbe` (``counter=`` this object): the index of
    the running iteration, negative between iterations.
    """

    step: int = -1
    calls: list[_Call] = field(default_factory=list)
    backwards: list[tuple[int, str]] = field(default_factory=list)
    updates: list[tuple[int, str]] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)
    _marker: dict[str, int] = field(default_factory=dict)
    """role → id() of the trunk's last parameter (to see which trunks an optimizer steps)."""
    _optimizer_roles: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    """optimizer → roles it steps (weak: a freed optimizer's id may be reused by a new one)."""
    _global_hook: Any = None

    def attach(self, role: str, trunk: Any) -> RLWorkCounter:
        """Hook ``trunk`` (e.g. ``model.model`` of a Llama, our ``ValueModel.trunk``) under ``role``."""
        import torch

        if role in self.roles:
            raise ValueError(f"a trunk is already attached as {role!r}")
        self.roles.append(role)

        def on_forward(_module, args, kwargs):
            ids = kwargs.get("input_ids")
            if ids is None and args:
                ids = args[0]
            kind = classify(ids.shape[1] if ids is not None else 0, kwargs.get("use_cache"),
                            kwargs.get("past_key_values"))  # fmt: skip
            grad = torch.is_grad_enabled()
            if ids is None:  # inputs_embeds: rows only
                embeds = kwargs.get("inputs_embeds")
                rows = embeds.shape[0] if embeds is not None else 0
                self.calls.append(_Call(self.step, role, kind, grad, rows, 0, 0))
                return
            rows, width = ids.shape
            if kind == "decode":  # one new token per row; the mask's last column is the new token
                self.calls.append(_Call(self.step, role, kind, grad, rows, rows * width, 0))
                return
            mask = kwargs.get("attention_mask")
            with torch.no_grad():
                cols = torch.ones_like(ids) if mask is None else mask[:, -width:].to(ids.dtype)
                tokens = cols.sum()
                checksum = (ids * (ids + 7) * cols).sum() if kind == "prefill" else 0
            self.calls.append(_Call(self.step, role, kind, grad, rows, tokens, checksum))

        params = list(trunk.parameters())
        self._marker[role] = id(params[-1])
        self._handles.append(trunk.register_forward_pre_hook(on_forward, with_kwargs=True))
        if params[-1].requires_grad:

            def on_grad(grad):
                self.backwards.append((self.step, role))
                return grad

            self._handles.append(params[-1].register_hook(on_grad))
        if self._global_hook is None:
            from torch.optim.optimizer import register_optimizer_step_post_hook

            self._global_hook = register_optimizer_step_post_hook(self._on_optimizer_step)
        return self

    def _on_optimizer_step(self, optimizer, _args, _kwargs) -> None:
        roles = self._optimizer_roles.get(optimizer)
        if roles is None:
            held = {id(p) for group in optimizer.param_groups for p in group["params"]}
            roles = self._optimizer_roles[optimizer] = tuple(r for r, m in self._marker.items() if m in held)
        for role in roles:
            self.updates.append((self.step, role))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self._global_hook is not None:
            self._global_hook.remove()
        self._handles, self._global_hook = [], None

    def per_step(self, steps: range) -> list[dict[str, int]]:
        """``{"<role>.<counter>": n}`` for each step index in ``steps`` (call after the run)."""
        out = []
        for step in steps:
            row = {f"{role}.{name}": 0 for role in self.roles for name in COUNTS}
            for call in self.calls:
                if call.step != step:
                    continue
                tokens = int(call.tokens)
                if call.kind == "prefill":
                    row[f"{call.role}.prefill_rows"] += call.rows
                    row[f"{call.role}.prefill_tokens"] += tokens
                elif call.kind == "decode":
                    row[f"{call.role}.decode_calls"] += 1
                    row[f"{call.role}.decode_rows"] += call.rows
                else:
                    prefix = "grad" if call.grad else "nograd"
                    row[f"{call.role}.{prefix}_full_rows"] += call.rows
                    row[f"{call.role}.{prefix}_full_tokens"] += tokens
            for s, role in self.backwards:
                if s == step:
                    row[f"{role}.backward"] += 1
            for s, role in self.updates:
                if s == step:
                    row[f"{role}.updates"] += 1
            out.append(row)
        return out

    def prompt_checksum(self) -> int:
        """Σ over all prefill calls in any step of id·(id + 7) of the prompt tokens: the same prompts
        (as a multiset, with their repeats) give the same number whatever order they came in."""
        return int(sum(int(c.checksum) for c in self.calls if c.kind == "prefill" and c.step >= 0))

    def outside_steps(self) -> int:
        """Trunk calls made outside any iteration (setup, evaluation, saving)."""
        return sum(1 for c in self.calls if c.step < 0)


def generated_tokens(step_counts: dict[str, int], role: str = "policy") -> int:
    """Tokens the ``role`` trunk generated in one iteration: one per row of each prefill and decode call."""
    return step_counts.get(f"{role}.prefill_rows", 0) + step_counts.get(f"{role}.decode_rows", 0)
