"""Compute accounting (trainers/compute.py): N by hand, the ledger's arithmetic, and the counts every
policy recipe records (DPO, PPO, NLPO, REINFORCE) checked against their own token counts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from trainers.compute import Compute, Shape, matmul_params, non_embedding_params, ratio, text_tokens
from trainers.data import read_preferences
from trainers.metrics import read_metrics
from trainers.policy_data import encode_policy_pairs
from trainers.synthetic import write_synthetic_snapshot

N_TINY = 82240
"""The conftest Llama: hidden 64, MLP 128, 2 layers. Per layer q, k, v, o 4·64·64 = 16384, gate/up/down
3·64·128 = 24576, two RMSNorms 2·64 = 128 → 41088; × 2 layers + the final norm 64 = 82240."""


def test_non_embedding_params_by_hand(tiny_model):
    lm = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert non_embedding_params(lm) == N_TINY
    assert sum(p.numel() for p in lm.parameters()) == N_TINY + lm.config.vocab_size * 64  # one tied matrix
    # the matmul weights from config.json alone (no torch), as the benchmark harness counts them: N minus norms
    assert (
        matmul_params(Shape.from_config(json.loads((Path(tiny_model) / "config.json").read_text())))
        == N_TINY - 320
    )
    untied = LlamaForCausalLM(LlamaConfig(**{**lm.config.to_dict(), "tie_word_embeddings": False}))
    assert non_embedding_params(untied) == N_TINY  # the separate LM head is not counted either
    # GPT-2 (biases, position embeddings): per layer ln_1 16 + c_attn 8·24+24 + c_proj 8·8+8 + ln_2 16
    # + c_fc 8·32+32 + c_proj 32·8+8 = 872; + ln_f 16 = 888 (wte and wpe excluded)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=10, n_positions=16, n_embd=8, n_layer=1, n_head=2))
    assert non_embedding_params(gpt2) == 888


def test_the_ledger_by_hand():
    ledger = Compute(10)
    ledger.train(3, 2)  # 5 tokens forward (2·10·5 = 100) and backward (4·10·5 = 200)
    ledger.generate(4, 6, 2)  # prefill 4 + 6 generated − 2 last tokens never fed back = 8 forwards: 160
    ledger.forward(7, params=100)  # a reward model with N = 100: 1400
    assert ledger.totals["forward_flops"] == 0  # nothing settled yet
    ledger.settle()
    assert ledger.as_dict() == {"prompt_tokens": 3, "response_tokens": 2, "trained_tokens": 5, "generated_tokens": 6,
                                "forward_tokens": 5 + 8 + 7, "forward_flops": 100 + 160 + 1400, "backward_flops": 200,
                                "total_flops": 1860, "params": 10}  # fmt: skip
    assert ledger.metrics()["compute/total_flops"] == 1860.0
    again = Compute.from_state(ledger.state(), 10)
    again.merge({"generated_tokens": 1, "forward_flops": 40})
    again.settle()
    assert again.totals["generated_tokens"] == 7 and again.totals["forward_flops"] == 1700
    assert (
        ratio({"total_flops": 30.0}, {"total_flops": 120.0}) == 0.25 and ratio({}, {"total_flops": 1}) is None
    )
    with pytest.raises(ValueError, match="cannot have generated"):
        ledger.generate(1, 1, 2)


def test_settle_sums_the_processes():
    class TwoProcesses:  # every process counted the same: the all-reduce doubles it
        num_processes, device = 2, "cpu"

        def reduce(self, tensor, reduction):
            assert reduction == "sum" and tensor.dtype == torch.int64
            return tensor * 2

    ledger = Compute(1)
    ledger.train(1, 2)
    ledger.settle(TwoProcesses())
    assert ledger.totals["trained_tokens"] == 6 and ledger.totals["backward_flops"] == 24
    assert ledger.pending == dict.fromkeys(ledger.pending, 0)


def test_text_tokens_splits_prompt_and_response():
    texts = [SimpleNamespace(ids=[1, 2, 3, 4, 5, 6, 7], response_mask=[False] * 4 + [True] * 3),
             SimpleNamespace(ids=[1, 2], response_mask=[False, True])]  # fmt: skip
    assert text_tokens(texts) == (5, 4)


def compute_rows(out: Path) -> list[dict]:
    return [r for r in read_metrics(Path(out) / "metrics.jsonl") if "compute/total_flops" in r]


def test_dpo_counts_the_reference_pass_and_both_sides_of_every_pair_and_resumes_them(tmp_path, tiny_model):
    from trainers.recipes.dpo import DPOConfig, DPOOptimConfig, train

    snapshot = write_synthetic_snapshot(tmp_path / "data", n_train=16, n_eval=8)
    cfg = DPOConfig(snapshot=str(snapshot.train), eval_snapshot=str(snapshot.eval), output_dir=str(tmp_path / "run"),
                    model=str(tiny_model), max_length=80, batch_size=4, max_steps=3, checkpoint_every=1,
                    optim=DPOOptimConfig(lr=1e-3), progress=False, cpu=True)  # fmt: skip
    train(cfg)
    pairs = encode_policy_pairs(
        AutoTokenizer.from_pretrained(tiny_model), read_preferences(snapshot.train), 80
    )
    reference = sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)  # once, training pairs only
    rows = compute_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        trained = r["train/tokens"]  # DPO's own count: prompt + chosen + rejected of the pairs so far
        assert (
            r["compute/trained_tokens"]
            == trained
            == r["compute/prompt_tokens"] + r["compute/response_tokens"]
        )
        assert r["compute/forward_tokens"] == reference + trained
        assert r["compute/forward_flops"] == 2 * N_TINY * (reference + trained)
        assert r["compute/backward_flops"] == 4 * N_TINY * trained and r["compute/generated_tokens"] == 0
    # a resumed run continues the ledger from its checkpoint (the reference pass is not counted twice)
    resumed_cfg = dataclasses.replace(cfg, output_dir=str(tmp_path / "resumed"))
    train(resumed_cfg, should_stop=lambda step: step == 1)
    train(resumed_cfg)
    assert compute_rows(tmp_path / "resumed")[-1] == {
        **rows[-1],
        "time": compute_rows(tmp_path / "resumed")[-1]["time"],
    }


def test_ppo_and_nlpo_count_rollout_reference_critic_and_every_epoch(tmp_path, tiny_model, monkeypatch):
    from ppo_helpers import as_kwargs, toy_config, toy_task

    from trainers.recipes import nlpo, ppo

    monkeypatch.setattr(ppo, "load_task", lambda cfg: toy_task())
    cfg = toy_config(tmp_path / "ppo", tiny_model, iterations=1)
    ppo.train(cfg)
    ppo_row = compute_rows(tmp_path / "ppo")[-1]
    nlpo.train(nlpo.NLPOConfig(**{**as_kwargs(cfg), "output_dir": str(tmp_path / "nlpo")}, mask_top_p=0.5))
    nlpo_row = compute_rows(tmp_path / "nlpo")[-1]
    rows = cfg.prompts_per_iteration * cfg.samples_per_prompt
    for r, generators in ((ppo_row, 1), (nlpo_row, 2)):
        tokens = r["train/tokens"]  # PPO's own count: prompt + response tokens of the rollout
        prompt, response = (
            r["compute/prompt_tokens"] / cfg.ppo_epochs,
            r["compute/response_tokens"] / cfg.ppo_epochs,
        )
        assert prompt + response == tokens and r["compute/generated_tokens"] == response
        # sampling (NLPO: the mask model follows it), reference, and per epoch the actor's update (N);
        # the separate critic (trunk + a 64-weight head: N + 64) scores the rollout once and trains per epoch
        policy_fwd = generators * (tokens - rows) + tokens + cfg.ppo_epochs * tokens
        critic_fwd = tokens + cfg.ppo_epochs * tokens
        assert r["compute/forward_tokens"] == policy_fwd + critic_fwd
        assert r["compute/forward_flops"] == 2 * N_TINY * policy_fwd + 2 * (N_TINY + 64) * critic_fwd
        assert r["compute/backward_flops"] == 4 * (N_TINY + N_TINY + 64) * cfg.ppo_epochs * tokens
    shared = toy_config(tmp_path / "shared", tiny_model, iterations=1, critic="shared")
    ppo.train(shared)
    r = compute_rows(tmp_path / "shared")[-1]
    tokens = r[
        "train/tokens"
    ]  # the value head reads a second trunk pass over the rollout, then rides the update
    assert r["compute/forward_tokens"] == (tokens - rows) + 2 * tokens + cfg.ppo_epochs * tokens
    assert r["compute/backward_flops"] == 4 * N_TINY * cfg.ppo_epochs * tokens


def test_reinforce_counts_sampling_reference_and_stage_two(tmp_path, tiny_model, monkeypatch):
    from trainers.config import config_from_dict
    from trainers.recipes import reinforce
    from trainers.reinforce_config import ReinforceConfig
    from trainers.rewards import CallableReward
    from trainers.tasks import Task

    prompts = [f"The sea is {w}" for w in ("vast", "calm", "blue", "warm")]
    task = Task(
        "toy", prompts, prompts[:1], task_reward=lambda tok, eos: CallableReward(lambda p, r: len(r), tok)
    )
    monkeypatch.setattr(reinforce, "get_task", lambda name, **kw: task)
    cfg = config_from_dict(ReinforceConfig, {"output_dir": str(tmp_path), "model": str(tiny_model), "batch_size": 2,
                                             "group_size": 3, "max_steps": 2, "n_eval": 0, "progress": False,
                                             "cpu": True, "sampling": {"max_new_tokens": 5}})  # fmt: skip
    reinforce.train(cfg)
    r = compute_rows(tmp_path)[-1]
    sequences = r["compute/prompt_tokens"] + r["compute/response_tokens"]
    assert (
        r["compute/generated_tokens"] == r["compute/response_tokens"] == r["train/tokens"]
    )  # every sample trained
    assert (
        r["compute/forward_tokens"] == (sequences - 2 * 6) + sequences + sequences
    )  # sample, reference, stage 2
    assert r["compute/backward_flops"] == 4 * N_TINY * sequences
