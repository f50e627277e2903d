"""NLPO on the tiny random Llama (CPU): the mask invariants of algorithms.md §1.14.7–9, masked log-probs in the
ratio and raw ones in the KL, p ≥ 1 is exactly PPO, the mask model synced where rollouts read it, resume."""

from __future__ import annotations

import copy

import pytest
import torch
from ppo_helpers import as_kwargs, toy_config, toy_task, train_rows, weights_hash
from safetensors.torch import load_file, save_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from trainers.__main__ import recipe_schema
from trainers.checkpoint import read_studio_json, step_dir
from trainers.ppo_experience import minibatch, shape_experience
from trainers.recipes import nlpo, ppo
from trainers.recipes.nlpo import MASK_FILE, NLPOConfig, NLPOMasking, action_mask
from trainers.rollout import SamplingConfig, left_pad, positions, rollout
from trainers.teacher_forced import score_tokens

PROMPTS = ["The sea is", "Write one sentence about the weather.", "a"]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(ppo, "load_task", lambda cfg: toy_task())


@pytest.fixture(scope="module")
def lm_and_tokenizer(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def nlpo_config(tmp_path, tiny_model, **overrides) -> NLPOConfig:
    mask = {
        k: overrides.pop(k) for k in ("mask_top_p", "mask_sync_every", "mask_min_tokens") if k in overrides
    }
    base = as_kwargs(toy_config(tmp_path, tiny_model, **overrides))
    return NLPOConfig(**base, **{"mask_top_p": 0.3, "mask_sync_every": 2, "mask_min_tokens": 3, **mask})


def prompt_batch(tokenizer):
    return left_pad([tokenizer(p)["input_ids"] for p in PROMPTS], tokenizer.pad_token_id)


def next_logits(model, ids, mask) -> torch.Tensor:
    attention = mask.long()
    return (
        model(input_ids=ids, attention_mask=attention, position_ids=positions(attention))
        .logits[:, -1]
        .float()
    )


def test_action_mask_keeps_the_argmax_the_specials_min_tokens_and_mass_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=gen) * 3
    specials = [0, 7, 299]
    for p, min_tokens in ((0.05, 1), (0.5, 4), (0.9, 20)):
        allowed = action_mask(logits, p, min_tokens, specials)
        probs = logits.softmax(-1)
        assert allowed[torch.arange(64), logits.argmax(-1)].all()
        assert allowed[:, specials].all()
        assert (allowed.sum(-1) >= min_tokens).all()
        assert ((probs * allowed).sum(-1) >= p - 1e-6).all()
        # minimal: dropping the least likely allowed non-special token beyond min_tokens loses mass p
        kept = torch.where(allowed, probs, 2.0).index_fill(1, torch.tensor(specials), 2.0)
        smallest = kept.min(-1).values
        extra = (allowed.sum(-1) - len(specials)) > min_tokens
        free = (probs * allowed).index_fill(1, torch.tensor(specials), 0.0).sum(-1)
        assert ((free - smallest)[extra] < p + 1e-6).all()
    assert action_mask(logits, 1.0, 1, []).all()  # p ≥ 1 masks nothing


def test_rollout_acts_inside_the_mask_and_the_replayed_mask_gives_the_masked_logprobs(lm_and_tokenizer):
    lm, tok = lm_and_tokenizer
    masking = NLPOMasking(lm, tok, top_p=0.3, sync_every=2, min_tokens=3)
    ids, mask = prompt_batch(tok)
    recorder = masking.processor()
    batch = rollout(lm, ids, mask, SamplingConfig(max_new_tokens=10, stop_at_eos=False), eos_token_ids=[tok.eos_token_id],
                    pad_token_id=tok.pad_token_id, processors=[recorder], generator=torch.Generator().manual_seed(0),
                    return_raw_logprobs=True)  # fmt: skip
    masks = recorder.masks()
    assert masks.shape == (*batch.response_ids.shape, len(tok))
    assert masks.gather(-1, batch.response_ids[..., None]).all()  # every action lies in M
    assert (
        masks.sum(-1) < len(tok) // 2
    ).all()  # p = 0.3 really restricts the tiny model's flat distribution
    # the first step's mask is the mask model's nucleus of the prompt
    assert torch.equal(masks[:, 0], action_mask(next_logits(lm, ids, mask), 0.3, 3, masking.special_ids))
    # stage 2 with the replayed masks reproduces stage 1's (masked) log-probs; raw ones differ
    replayed = score_tokens(lm, ids, mask, batch.response_ids, batch.response_mask,
                            processors=[masking.replay(masks), *_eos_ban(tok)]).logprobs  # fmt: skip
    assert torch.allclose(replayed, batch.logprobs, atol=1e-5)
    assert (batch.logprobs - batch.raw_logprobs).min() > 0.1  # renormalised over M: larger
    # the masked distribution sums to 1 and is 0 outside M
    logits = next_logits(lm, ids, mask).masked_fill(~masks[:, 0], float("-inf"))
    probs = logits.softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(3)) and (probs[~masks[:, 0]] == 0).all()


def _eos_ban(tok):
    from trainers.rollout import sampling_processors

    return sampling_processors(SamplingConfig(max_new_tokens=10, stop_at_eos=False), [tok.eos_token_id])


def test_sync_reaches_the_generation_time_mask_and_the_mask_model_is_otherwise_frozen(
    lm_and_tokenizer, make_tiny_model, tmp_path
):
    lm, tok = lm_and_tokenizer
    policy = copy.deepcopy(lm)
    masking = NLPOMasking(policy, tok, top_p=0.3, sync_every=2, min_tokens=3)
    mask_model = masking.mask_model
    assert not any(p.requires_grad for p in mask_model.parameters())
    ids, mask = prompt_batch(tok)
    initial = action_mask(next_logits(lm, ids, mask), 0.3, 3, masking.special_ids)
    held = masking.processor()  # built before the sync, as RL4LMs' processor was
    # the policy learns (here: becomes another model); iteration 1 is no sync iteration
    policy.load_state_dict(AutoModelForCausalLM.from_pretrained(make_tiny_model(1)).state_dict())
    assert masking.after_rollout(1, policy)["mask_synced"] == 0
    assert all(torch.equal(a, b) for a, b in zip(mask_model.parameters(), lm.parameters(), strict=True))
    assert masking.after_rollout(2, policy)["mask_synced"] == 1
    assert masking.mask_model is mask_model  # synced in place: whoever holds it sees the new weights
    assert all(torch.equal(a, b) for a, b in zip(mask_model.parameters(), policy.parameters(), strict=True))
    synced = action_mask(next_logits(policy, ids, mask), 0.3, 3, masking.special_ids)
    assert not torch.equal(synced, initial)
    for recorder in (held, masking.processor()):
        recorder.begin(ids, mask)
        recorder(0, torch.zeros(3, len(tok)))
        assert torch.equal(recorder.masks()[:, 0], synced)  # the generation-time mask is the synced model's
    # saved and restored with a checkpoint
    save_model(mask_model, str(tmp_path / MASK_FILE))
    other = NLPOMasking(lm, tok, top_p=0.3, sync_every=2, min_tokens=3)
    other.load(tmp_path)
    assert all(
        torch.equal(a, b) for a, b in zip(other.mask_model.parameters(), policy.parameters(), strict=True)
    )


def test_masked_logprobs_in_the_ratio_raw_logprobs_in_the_kl(tmp_path, tiny_model, toy):
    cfg = nlpo_config(tmp_path / "run", tiny_model)
    run = ppo.setup(cfg, recipe="nlpo", make_masking=lambda lm, tok: NLPOMasking(lm, tok, top_p=0.3, sync_every=2,
                                                                               min_tokens=3))  # fmt: skip
    exp = ppo.collect(run, 0)
    m = exp.mask
    assert exp.action_masks is not None and exp.action_masks.shape[:2] == m.shape
    assert ((exp.old_logprobs - exp.raw_logprobs)[m] > 0.05).all()  # π_old is the masked distribution
    # before any update the raw policy is the reference: the reward's KL (raw) vanishes, the masked one would not
    exp = shape_experience(
        exp, beta=0.1, estimator="k1", gamma=1.0, lam=0.95, reward_clip=None, whiten="batch"
    )
    assert exp.kl.abs().max() < 1e-5 and (exp.old_logprobs - exp.ref_logprobs)[m].min() > 0.05
    # the update's π_new is masked by the replayed masks: ρ starts at 1
    mb = minibatch(exp, torch.arange(cfg.minibatch_size))
    with torch.no_grad():
        _, stats = ppo.minibatch_loss(run, mb, mb.advantages)
        unmasked, _, _ = run.actor(mb.prompt_ids, mb.prompt_mask, mb.response_ids, mb.mask,
                                   run.stage2_processors(None))  # fmt: skip
    assert abs(float(stats["ratio_max"]) - 1) < 1e-5 and float(stats["approx_kl"]) < 1e-9
    assert torch.allclose(unmasked, mb.raw_logprobs, atol=1e-5)
    entropy_masked = float(stats["entropy"])
    assert entropy_masked < 0.9 * torch.log(torch.tensor(float(len(run.tokenizer))))  # entropy over M only
    run.metrics.close()


def test_top_p_one_is_exactly_ppo(tmp_path, tiny_model, toy):
    base = toy_config(tmp_path / "ppo", tiny_model, iterations=2)
    a = ppo.train(base)
    b = nlpo.train(
        nlpo_config(tmp_path / "nlpo", tiny_model, iterations=2, mask_top_p=1.0, mask_sync_every=1)
    )
    assert weights_hash(a.final_checkpoint) == weights_hash(b.final_checkpoint)
    rows_a, rows_b = train_rows(a.output_dir), train_rows(b.output_dir)
    for step in (1, 2):
        assert rows_b[step].pop("train/mask_tokens") == len(AutoTokenizer.from_pretrained(tiny_model))
        assert rows_b[step].pop("train/mask_synced") == 1
        assert rows_a[step] == rows_b[step]  # same samples, losses, gradients, clip fractions: bit for bit
    assert read_studio_json(b.final_checkpoint)["recipe"] == "nlpo"


def test_checkpoints_hold_the_synced_mask_model_and_resume_equals_uninterrupted(tmp_path, tiny_model, toy):
    def cfg(name):
        return nlpo_config(tmp_path / name, tiny_model, iterations=4, checkpoint_every=1, keep_checkpoints=0)

    whole = nlpo.train(cfg("whole"))
    folder = whole.output_dir / "checkpoints"
    start = load_file(tiny_model / "model.safetensors")

    def masks(step):
        return load_file(step_dir(folder, step) / MASK_FILE)

    def policy(step):
        return load_file(step_dir(folder, step) / "model.safetensors")

    def same(a, b):  # every tensor both files hold (a tied embedding is stored once, under either name)
        shared = set(a) & set(b)
        assert len(shared) >= 9
        return all(torch.equal(a[k], b[k]) for k in shared)

    assert same(masks(1), start)  # μ = 2: no sync after rollout 1
    assert same(masks(2), policy(1))  # synced after rollout 2, before update 2
    assert same(masks(3), policy(1))  # unchanged between syncs
    assert same(masks(4), policy(3))
    assert not same(policy(1), start) and not same(policy(3), policy(1))
    rows = train_rows(whole.output_dir)
    assert [rows[s]["train/mask_synced"] for s in (1, 2, 3, 4)] == [0, 1, 0, 1]
    stopped = nlpo.train(cfg("split"), should_stop=lambda step: step == 3)
    assert stopped.stopped
    resumed = nlpo.train(cfg("split"))
    assert resumed.resumed_from.name == "step-000003"
    assert weights_hash(whole.final_checkpoint) == weights_hash(resumed.final_checkpoint)
    assert train_rows(resumed.output_dir)[4] == rows[4]


def test_schema_lists_nlpo_with_the_ppo_fields():
    schema = recipe_schema("nlpo")
    fields = {f["name"]: f for f in schema["fields"]}
    assert fields["mask_top_p"]["default"] == 0.9 and fields["mask_sync_every"]["default"] == 5
    assert fields["kl.target"]["help"] and fields["clip_eps"]["help"]  # inherited fields keep their docs
    assert schema["checkpoint_kind"] == "policy"
