"""The online-RL benchmark harness: its work counters and its equal-work checks, which must be able to fail.

Fast: a 2-layer Llama of hidden 8 built in memory (no checkpoint), hand-made result rows for the checks.
"""

from __future__ import annotations

import copy

import pytest
import torch

from bench.harness import rl_esrl, rl_nlpo
from bench.harness.rl_probes import COUNTS, RLWorkCounter, classify, generated_tokens
from bench.harness.rl_stats import declared_differences, expected_work, markdown, summarise, work_differences

# ----------------------------------------------------------------------------- counters


def test_classify_by_call_arguments() -> None:
    class Cache:
        def __init__(self, n: int) -> None:
            self.n = n

        def get_seq_length(self) -> int:
            return self.n

    assert classify(5, True, None) == "prefill"  # our rollout's first call
    assert classify(5, True, Cache(0)) == "prefill"  # HF generate passes an empty cache
    assert classify(1, True, Cache(7)) == "decode"
    assert classify(1, None, Cache(7)) == "decode"
    assert classify(9, False, None) == "full"  # teacher-forced, use_cache=False
    assert classify(9, None, None) == "full"  # TRL's training forward leaves use_cache unset


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1,
                         bos_token_id=2, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_counter_sees_the_same_work_in_hf_generate_and_our_rollout(tiny_llama) -> None:
    """Both samplers generate 3 rows × 5 tokens: one prefill of 3 × 4 prompt tokens, 4 decode calls."""
    from transformers import GenerationConfig

    from trainers.rollout import SamplingConfig, rollout

    ids = torch.randint(3, 32, (3, 4))
    mask = torch.ones_like(ids, dtype=torch.bool)
    counts = []
    for sampler in ("hf", "ours"):
        counter = RLWorkCounter().attach("policy", tiny_llama.model)
        counter.step = 0
        with torch.no_grad():
            if sampler == "hf":
                config = GenerationConfig(max_new_tokens=5, min_new_tokens=5, do_sample=True, suppress_tokens=[0, 1],
                                          pad_token_id=0, eos_token_id=1)  # fmt: skip
                out = tiny_llama.generate(input_ids=ids, attention_mask=mask.long(), generation_config=config)
                assert out.shape == (3, 9)
            else:
                r = rollout(tiny_llama, ids, mask, SamplingConfig(max_new_tokens=5, stop_at_eos=False),
                            eos_token_ids=[0, 1], pad_token_id=0)  # fmt: skip
                assert r.response_ids.shape == (3, 5)
        counter.detach()
        counts.append(counter.per_step(range(1))[0])
    hf, ours = counts
    assert hf == ours
    assert ours["policy.prefill_rows"] == 3 and ours["policy.prefill_tokens"] == 12
    assert ours["policy.decode_calls"] == 4 and generated_tokens(ours) == 15
    assert ours["policy.grad_full_rows"] == ours["policy.backward"] == 0


def test_counter_counts_grad_passes_backward_updates_and_prompt_checksum(tiny_llama) -> None:
    from trainers.teacher_forced import score_tokens

    model = copy.deepcopy(tiny_llama).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    counter = RLWorkCounter().attach("policy", model.model)
    prompt = torch.tensor([[5, 6, 7], [8, 9, 10]])
    response = torch.tensor([[11, 12], [13, 14]])
    for step in range(2):
        counter.step = step
        scores = score_tokens(model, prompt, torch.ones_like(prompt), response, torch.ones_like(response))
        scores.logprobs.sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        counter.step = 1
        model(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=True)  # a prefill
    counter.step = -2
    model(input_ids=prompt)  # between iterations: counted as outside
    counter.detach()
    first, second = counter.per_step(range(2))
    assert first["policy.grad_full_rows"] == 2 and first["policy.grad_full_tokens"] == 10
    assert first["policy.backward"] == 1 and first["policy.updates"] == 1
    assert second["policy.prefill_rows"] == 2 and second["policy.prefill_tokens"] == 6
    assert counter.prompt_checksum() == sum(i * (i + 7) for i in range(5, 11))
    assert counter.outside_steps() == 1
    with pytest.raises(ValueError, match="already attached"):
        counter.attach("policy", model.model)


def test_updates_are_counted_per_trunk_an_optimizer_holds(tiny_llama) -> None:
    """TRL PPO steps policy and value with one optimizer, ours with two: both are one update per trunk."""
    policy, value = copy.deepcopy(tiny_llama), copy.deepcopy(tiny_llama)
    counter = RLWorkCounter().attach("policy", policy.model).attach("value", value.model)
    counter.step = 0
    params = [*policy.parameters(), *value.parameters()]
    for p in params:
        p.grad = torch.zeros_like(p)
    torch.optim.SGD(params, lr=0.1).step()  # one optimizer over both
    counter.step = 1
    torch.optim.SGD(policy.parameters(), lr=0.1).step()
    torch.optim.SGD(value.parameters(), lr=0.1).step()
    counter.detach()
    one, two = counter.per_step(range(2))
    assert one["policy.updates"] == one["value.updates"] == 1
    assert two["policy.updates"] == two["value.updates"] == 1


# ----------------------------------------------------------------------------- equal-work checks

WORKLOAD = {"name": "C-x", "algo": "grpo", "backbone": "tiny-128", "prompts": 2, "group": 2, "prompt_len": 3,
            "completion_len": 4, "beta": 0.04, "warmup": 1, "timed": 2, "epochs": 1, "lr": 1e-5}  # fmt: skip


def step_counts(workload: dict, *, extra_policy_nograd: bool = False) -> dict[str, int]:
    rows, lp, lc = workload["prompts"] * workload["group"], workload["prompt_len"], workload["completion_len"]
    counts = {f"{role}.{name}": 0 for role in ("policy", "reference") for name in COUNTS}
    counts.update({"policy.prefill_rows": rows, "policy.prefill_tokens": rows * lp, "policy.decode_calls": lc - 1,
                   "policy.decode_rows": rows * (lc - 1), "policy.grad_full_rows": rows,
                   "policy.grad_full_tokens": rows * (lp + lc), "policy.backward": 1, "policy.updates": 1,
                   "reference.nograd_full_rows": rows, "reference.nograd_full_tokens": rows * (lp + lc)})  # fmt: skip
    if extra_policy_nograd:
        counts.update({"policy.nograd_full_rows": rows, "policy.nograd_full_tokens": rows * (lp + lc)})
    return counts


def row(framework: str, seed: int, workload: dict = WORKLOAD, **kwargs) -> dict:
    steps = [step_counts(workload, **kwargs) for _ in range(workload["timed"])]
    return {"framework": framework, "seed": seed, "ok": True, "workload": workload, "workload_key": "x",
            "implementation": "impl", "framework_version": "v", "steps_run": workload["warmup"] + workload["timed"],
            "timed_steps": [workload["warmup"], workload["warmup"] + workload["timed"]], "work_per_step": steps,
            "prompt_checksum": 1234 + seed, "cycle_s": [9.0, 1.0, 1.2], "cpu_s": [9.0, 1.0, 1.1],
            "preempted": [0, 0, 0], "peak_rss_mb": 500.0, "peak_minus_first_step_mb": 100.0,
            "rss_before_first_step_mb": 400.0, "reward_per_step": [0.0, 0.1, 0.2]}  # fmt: skip


def test_equal_work_passes_and_the_expected_work_is_the_workloads() -> None:
    assert work_differences([row("ours", 0)], [row("trl", 0)]) == []
    assert expected_work(WORKLOAD)["policy.generated_tokens"] == 4 * 4
    assert expected_work({**WORKLOAD, "algo": "ppo", "epochs": 3})["policy.updates"] == 3


def test_mismatched_completion_lengths_are_detected() -> None:
    """A side whose completions ended early (an EOS not suppressed) generated fewer tokens than B·Lc."""
    short = row("trl", 0)
    for step in short["work_per_step"]:
        step["policy.decode_calls"] -= 1
        step["policy.decode_rows"] -= 4
        step["policy.grad_full_tokens"] -= 4
    reasons = work_differences([row("ours", 0)], [short])
    assert any("policy.generated_tokens per iteration [12], expected 16" in r for r in reasons)
    assert any(r.startswith("policy.decode_rows per iteration") for r in reasons)


def test_the_same_wrong_length_on_both_sides_is_still_detected() -> None:
    sides = [row("ours", 0), row("trl", 0)]
    for r in sides:
        for step in r["work_per_step"]:
            step["policy.decode_rows"] -= 4
    reasons = work_differences(sides[:1], sides[1:])
    assert len([r for r in reasons if "generated_tokens" in r]) == 2


def test_an_undeclared_extra_forward_is_flagged_and_rloo_s_declared_one_is_accepted() -> None:
    extra = row("trl", 0, extra_policy_nograd=True)
    assert any(r.startswith("policy.nograd_full_rows") for r in work_differences([row("ours", 0)], [extra]))
    rloo = {**WORKLOAD, "algo": "rloo"}
    assert declared_differences(rloo) == {"policy.nograd_full_rows": 4, "policy.nograd_full_tokens": 28}
    assert work_differences([row("ours", 0, rloo)], [row("trl", 0, rloo, extra_policy_nograd=True)]) == []
    # the declared difference must actually be there: RLOO without its extra pass is different work
    assert work_differences([row("ours", 0, rloo)], [row("trl", 0, rloo)])


def test_different_prompts_or_missing_iterations_are_flagged() -> None:
    other = row("trl", 0)
    other["prompt_checksum"] += 1
    assert any("different prompts" in r for r in work_differences([row("ours", 0)], [other]))
    short = row("ours", 0)
    short["steps_run"] = 2
    assert any("ran 2 iterations, expected 3" in r for r in work_differences([short], [row("trl", 0)]))


def test_summary_gives_a_verdict_only_with_three_seeds_and_equal_work() -> None:
    rows = []
    for seed in range(3):
        ours, trl = row("ours", seed), row("trl", seed)
        trl["cycle_s"], trl["cpu_s"] = [9.0, 2.0, 2.2], [9.0, 2.0, 2.1]
        trl["peak_rss_mb"] = 1000.0
        trl["prompt_checksum"] = ours["prompt_checksum"]
        rows += [ours, trl]
    cell = summarise(rows)["cells"]["x"]
    assert cell["valid"] and cell["enough_processes"] and cell["faster"]
    assert cell["speedup"] == pytest.approx(2.1 / 1.1)
    assert cell["peak_rss_ratio_max"] == pytest.approx(0.5) and cell["target_met"]
    assert "target met" in markdown(summarise(rows), title="t")
    rows[-1]["work_per_step"][0]["reference.nograd_full_rows"] += 1
    broken = summarise(rows)["cells"]["x"]
    assert not broken["valid"] and not broken["target_met"]
    assert "invalid: different work" in markdown(summarise(rows), title="t")
    assert not summarise(rows[:2])["cells"]["x"]["enough_processes"]


# ----------------------------------------------------------------------------- ESRL and NLPO checks


def esrl_row(variant: str, seed: int, checksum: int = 7, grad: float = 2.0) -> dict:
    full = 4 if variant == "two_stage" else 0
    step = {"policy.prefill_rows": 4, "policy.decode_rows": 12, "policy.grad_full_rows": full, "policy.backward": 1,
            "policy.updates": 1}  # fmt: skip
    return {"variant": variant, "seed": seed, "work_per_step": [step], "sample_checksums": [checksum],
            "grad_norms": [grad]}  # fmt: skip


def test_esrl_checks_need_the_same_samples_and_gradient() -> None:
    workload = {"prompts": 2, "group": 2, "prompt_len": 3, "completion_len": 4}
    good = {"two_stage": [esrl_row("two_stage", 0)], "naive": [esrl_row("naive", 0, grad=2.0 + 1e-6)]}
    assert rl_esrl.checks(good, workload) == []
    other = {"two_stage": [esrl_row("two_stage", 0)], "naive": [esrl_row("naive", 0, checksum=8, grad=2.5)]}
    reasons = rl_esrl.checks(other, workload)
    assert any("different tokens" in r for r in reasons) and any(
        "gradient norms differ" in r for r in reasons
    )
    short = esrl_row("naive", 0)
    short["work_per_step"][0]["policy.decode_rows"] = 8
    assert any("tokens generated" in r for r in rl_esrl.checks({"naive": [short]}, workload))


def test_nlpo_work_check_allows_only_the_mask_model() -> None:
    workload = {**WORKLOAD, "algo": "ppo"}
    ppo = {"seed": 0, "workload": workload, "work_per_step": [step_counts(workload)]}
    nlpo = copy.deepcopy(ppo)
    nlpo["work_per_step"][0].update({"mask.prefill_rows": 4, "mask.decode_rows": 12})
    assert rl_nlpo.work_check([ppo], [nlpo]) == []
    nlpo["work_per_step"][0]["mask.decode_rows"] = 8
    assert any("mask model saw 12" in r for r in rl_nlpo.work_check([ppo], [nlpo]))
    nlpo["work_per_step"][0]["policy.backward"] = 2
    assert any(r.startswith("policy.backward") for r in rl_nlpo.work_check([ppo], [nlpo]))
