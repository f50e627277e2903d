"""Do human good/bad spans help the segment reward model? An ablation on held-out preferences.

Task: the built-in synthetic preference task (:mod:`trainers.synthetic`; true reward = mean VADER
valence of the words). "Human" spans are simulated on a separate set of responses: every positive
lexicon word is a good span, every negative one a bad span (code-point offsets, the studio's
segments-snapshot columns). The arms share data, backbone, steps and seeds and differ only in
``spans.weight`` λ (0 = the paper's recipe). A sequence RM (``reward_model`` recipe) on the same
data is reported as a reference line. The metric is accuracy on held-out preference pairs.

Backbone (default): a tiny Llama (hidden 64, 2 layers, BPE of 400 tokens trained on the task's
text, so words are split into pieces) pretrained for a few hundred LM steps on the training
responses — the stand-in for an SFT checkpoint, whose entropies then peak at word starts. ``--model``
takes any causal LM folder or default name instead (e.g. ``smollm2`` on a GPU).
The numbers are written as measured, whichever way they go.

    .venv/bin/python bench/segment_rm_ablation.py --out bench/results/segment_rm_span_ablation.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def build_task_model(folder: Path, texts: list[str], *, seed: int = 0, vocab: int = 400) -> Path:
    """A random tiny Llama (hidden 64, 2 layers) with a byte-level BPE trained on ``texts``.

    The small vocabulary splits most words into several tokens, so next-token entropy is low
    inside a word and high at word starts once the model has seen the text (:func:`pretrain_lm`).
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def pretrain_lm(
    folder: Path,
    texts: list[str],
    out: Path,
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
) -> Path:
    """Briefly train a causal LM on ``texts`` (each + EOS), so its entropies mean something; save to ``out``.

    The stand-in for the paper's SFT checkpoint: both the RM backbone and the frozen reference.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = [ids[i] for i in torch.randint(len(ids), (batch_size,), generator=generator).tolist()]
        T = max(len(r) for r in rows)
        x = torch.full((batch_size, T), tok.pad_token_id)
        mask = torch.zeros(batch_size, T, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        loss = model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def word_spans(text: str) -> list[dict]:
    """Good spans on positive VADER words, bad spans on negative ones (code points, half-open)."""
    from trainers.synthetic import vader_lexicon

    lexicon, spans, at = vader_lexicon(), [], 0
    for word in text.split(" "):
        valence = lexicon.get(word.strip(".,;:!?").lower(), 0.0)
        if valence:
            spans.append({"start": at, "end": at + len(word), "polarity": "good" if valence > 0 else "bad"})
        at += len(word) + 1
    return spans


def write_span_snapshot(path: Path, task, n_pairs: int) -> Path:
    """Both responses of ``n_pairs`` fresh pairs, with simulated spans, as a segments snapshot."""
    with path.open("w", encoding="utf-8") as handle:
        for row in task.pairs(n_pairs, "spans"):
            for text in (row["chosen"], row["rejected"]):
                handle.write(
                    json.dumps({"prompt": row["prompt"], "response": text, "spans": word_spans(text)}) + "\n"
                )
    return path


def run_regime(args: argparse.Namespace, n_train: int, root: Path) -> dict:
    """All arms × seeds on one training-set size; returns per-run rows, a summary and a verdict."""
    from trainers.config import OptimConfig
    from trainers.data import jsonl_lines
    from trainers.recipes.reward_model import RewardModelConfig
    from trainers.recipes.reward_model import train as train_sequence
    from trainers.recipes.segment_reward_model import SegmentationConfig, SegmentRewardModelConfig, SpanConfig
    from trainers.recipes.segment_reward_model import train as train_segment
    from trainers.synthetic import SyntheticTask, write_synthetic_snapshot

    threshold = None if args.threshold == "calibrated" else float(args.threshold)
    task = SyntheticTask()
    snap = write_synthetic_snapshot(root / "data", n_train=n_train, n_eval=args.eval_pairs, task=task)
    spans = write_span_snapshot(root / "data" / "spans.jsonl", task, args.span_pairs)
    rows = [json.loads(line) for line in jsonl_lines(snap.train.read_text(encoding="utf-8")) if line.strip()]
    texts = [r["prompt"] + r[side] for r in rows for side in ("chosen", "rejected")]
    arms: dict[str, list[dict]] = {}

    def record(arm: str, seed: int, metrics: dict, started: float, **extra: float) -> None:
        row = {
            "seed": seed,
            "eval_accuracy": metrics["eval/accuracy"],
            "eval_loss": metrics["eval/loss"],
            **extra,
        }
        arms.setdefault(arm, []).append(row | {"seconds": round(time.perf_counter() - started, 1)})
        print(f"pairs {n_train} seed {seed} {arm}: held-out accuracy {row['eval_accuracy']:.4f}", file=sys.stderr,
              flush=True)  # fmt: skip

    for seed in range(args.seeds):
        model = args.model
        if model is None:
            init = build_task_model(root / f"init-{seed}", texts, seed=seed)
            model = str(pretrain_lm(init, texts, root / f"model-{seed}", steps=args.lm_steps, seed=seed))
        common = dict(
            snapshot=str(snap.train), eval_snapshot=str(snap.eval), model=model, max_length=128,
            batch_size=args.batch_size, max_steps=args.steps, seed=seed, progress=False,
            optim=OptimConfig(lr=args.lr, schedule="constant"),
        )  # fmt: skip
        if not args.no_baselines:
            t = time.perf_counter()
            result = train_sequence(RewardModelConfig(output_dir=str(root / f"seq-{seed}"), **common))
            record("sequence_rm", seed, result.metrics, t)
            t = time.perf_counter()
            cfg = SegmentRewardModelConfig(output_dir=str(root / f"bandit-{seed}"),
                                           segmentation=SegmentationConfig(threshold=1000.0), **common)  # fmt: skip
            record("segment_rm_bandit", seed, train_segment(cfg).metrics, t)
        for weight in args.weights:
            t = time.perf_counter()
            cfg = SegmentRewardModelConfig(
                output_dir=str(root / f"seg-{seed}-{weight}"),
                segmentation=SegmentationConfig(threshold=threshold),
                spans=SpanConfig(snapshot=str(spans) if weight > 0 else None, weight=weight,
                                 batch_size=args.batch_size),
                **common,
            )  # fmt: skip
            result = train_segment(cfg)
            record(f"segment_rm_lambda_{weight:g}", seed, result.metrics, t, threshold=result.info.threshold,
                   mean_segment_length=result.info.mean_segment_length)  # fmt: skip

    summary = {
        name: {
            "mean_eval_accuracy": round(statistics.mean(r["eval_accuracy"] for r in runs), 4),
            "min_eval_accuracy": min(r["eval_accuracy"] for r in runs),
            "max_eval_accuracy": max(r["eval_accuracy"] for r in runs),
            "mean_eval_loss": round(statistics.mean(r["eval_loss"] for r in runs), 4),
        }
        for name, runs in arms.items()
    }
    verdict = None
    if "segment_rm_lambda_0" in arms:
        base = {r["seed"]: r["eval_accuracy"] for r in arms["segment_rm_lambda_0"]}
        verdict = {}
        for name, runs in arms.items():
            if not name.startswith("segment_rm_lambda_") or name == "segment_rm_lambda_0":
                continue
            diffs = [r["eval_accuracy"] - base[r["seed"]] for r in runs]
            verdict[name] = {
                "mean_accuracy_gain_over_no_spans": round(statistics.mean(diffs), 4),
                "seeds_better": sum(d > 0 for d in diffs),
                "seeds_worse": sum(d < 0 for d in diffs),
                "helps": statistics.mean(diffs) > 0,
            }
    return {"train_pairs": n_train, "arms": arms, "summary": summary, "verdict": verdict}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench/results/segment_rm_span_ablation.json"))
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds (backbone init and pretraining, head, batches)"
    )
    parser.add_argument("--train-pairs", type=int, nargs="+", default=[200], help="one regime per size")
    parser.add_argument("--span-pairs", type=int, default=100, help="pairs whose 2 responses carry spans")
    parser.add_argument("--eval-pairs", type=int, default=400)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--weights", type=float, nargs="+", default=[0.0, 0.5, 2.0], help="λ values (0: no spans)"
    )
    parser.add_argument(
        "--threshold", default="calibrated", help="τ_H: 'calibrated' (target 6 tokens) or a number"
    )
    parser.add_argument(
        "--model", default=None, help="backbone; default: a tiny Llama built and pretrained here"
    )
    parser.add_argument(
        "--lm-steps", type=int, default=300, help="LM pretraining steps of the default backbone"
    )
    parser.add_argument("--no-baselines", action="store_true", help="skip the sequence RM and bandit arms")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    regimes = []
    for n in args.train_pairs:
        with tempfile.TemporaryDirectory(prefix="segrm-ablation-") as tmp:
            regimes.append(run_regime(args, n, Path(tmp)))
    report = {
        "benchmark": "segment_rm_span_ablation",
        "metric": "accuracy on held-out preference pairs (synthetic task, true reward = mean VADER valence)",
        "config": vars(args) | {"task": "trainers.synthetic defaults (seed 0)", "span_responses": 2 * args.span_pairs,
                                "eval_accuracy_standard_error": round((0.25 / args.eval_pairs) ** 0.5, 4)},
        "regimes": regimes,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform(), "torch_threads": torch.get_num_threads()},
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps([{k: r[k] for k in ("train_pairs", "summary", "verdict")} for r in regimes], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
