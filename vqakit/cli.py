"""``vqakit`` command line: one typed function per subcommand; the signatures are the interface.

    vqakit prepare  --data.dataset easy-vqa
    vqakit train    --config configs/easy-vqa.yaml --train.epochs 3 --model.fusion gated
    vqakit evaluate --checkpoint runs/easy-vqa/checkpoint --data.eval_split test
    vqakit predict  --checkpoint runs/easy-vqa/checkpoint --image img.png --question "what shape is it?"
    vqakit export   --checkpoint runs/easy-vqa/checkpoint          # ONNX for fast CPU serving
    vqakit compare  --config configs/easy-vqa.yaml --data.limit 4000 --strategies frozen,lora,full,two-stage

Every subcommand takes ``--config FILE.yaml`` (a preset from ``configs/``) and dotted overrides
(jsonargparse, as litgpt and LightningCLI do); ``--print_config`` shows the resolved configuration.
"""

from __future__ import annotations

import json
import logging
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from vqakit.data.config import DataConfig
from vqakit.models.gru_decoder import GRUDecoderConfig
from vqakit.models.llm_prefix import LLMPrefixConfig
from vqakit.models.two_tower import TwoTowerConfig
from vqakit.models.vlm import VLMConfig
from vqakit.train.config import TrainConfig  # a plain dataclass: no training code is imported


def _setup_logging() -> None:
    log = logging.getLogger("vqakit")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def prepare(data: DataConfig = DataConfig(), out_dir: str = "data/prepared") -> dict:
    """Load and validate a dataset, check every image, build the answer vocabulary, print statistics.

    Writes ``{out_dir}/{dataset}/``: ``{split}.jsonl`` (one example per line), ``answer_vocab.json``,
    ``stats.json`` and, for a sampled VQA v2 training split, ``sample.json`` (the sampled image ids).

    Args:
        data: which dataset and splits.
        out_dir: where the prepared files go.
    """
    from vqakit.data.answers import AnswerVocab
    from vqakit.data.config import load_split
    from vqakit.data.images import filter_examples, scan_images

    target = Path(out_dir) / data.dataset
    target.mkdir(parents=True, exist_ok=True)
    stats = {"dataset": data.dataset, "splits": {}}
    for split in dict.fromkeys([data.train_split, data.eval_split]):
        examples = load_split(data, split)
        report = scan_images({e.image_id: e.image for e in examples})
        examples = filter_examples(examples, report)
        with open(target / f"{split}.jsonl", "w") as f:
            for e in examples:
                f.write(json.dumps(e.to_dict()) + "\n")
        stats["splits"][split] = {
            "questions": len(examples),
            "images": len({e.image_id for e in examples}),
            "bad_images": len(report.bad),
            "answer_types": dict(Counter(e.answer_type for e in examples)),
        }
        print(f"{split}: {len(examples):,} questions, {stats['splits'][split]['images']:,} images; {report.summary()}")
        if split == data.train_split:
            vocab = AnswerVocab.build([e.answers for e in examples], top_k=data.top_k_answers)
            vocab.to_json(target / "answer_vocab.json")
            coverage = vocab.coverage([e.answers for e in examples])
            stats["answer_vocab"] = {"size": len(vocab), "coverage": round(100 * coverage, 2)}
            print(f"answer vocabulary: {len(vocab)} answers cover {100 * coverage:.2f}% of {split} questions")
    (target / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"wrote {target}")
    return stats


def train(
    model: TwoTowerConfig = TwoTowerConfig(),
    data: DataConfig = DataConfig(),
    train: TrainConfig = TrainConfig(),
    evaluate: bool = True,
    gru: GRUDecoderConfig | None = None,
    llm: LLMPrefixConfig | None = None,
    vlm: VLMConfig | None = None,
) -> dict:
    """Train a VQA model, save an HF-style checkpoint directory, then evaluate it on ``data.eval_split``.

    Args:
        model: model architecture (the answer classifier).
        data: training and evaluation data.
        train: strategies and optimisation.
        evaluate: evaluate the checkpoint on the evaluation split after training.
        gru: train a generative GRU-decoder model instead of the classifier (``configs/easy-vqa-gru.yaml``).
        llm: train a vision-prefixed causal LLM instead (``configs/easy-vqa-llm-stage1.yaml``, then stage 2).
        vlm: fine-tune a pretrained BLIP / ViLT model instead (``--vlm.model`` id or directory, LoRA by default).
    """
    from vqakit.eval.evaluate import format_metrics

    generative = [cfg for cfg in (gru, llm, vlm) if cfg is not None]
    if len(generative) > 1:
        raise ValueError("give one generative family (--gru, --llm, --vlm), not several")
    if generative:
        from vqakit.train.generative import fit_generative

        summary = fit_generative(generative[0], data, train, evaluate=evaluate)
    else:
        from vqakit.train.run import fit

        summary = fit(model, data, train, evaluate=evaluate)
    if "checkpoint" not in summary:  # a DDP rank other than 0
        return summary
    print(f"\ncheckpoint: {summary['checkpoint']}")
    print(f"time to train: {summary['time_to_train_s']:.1f} s ({summary['epochs']} epochs, {summary['steps']} steps); "
          f"trainable parameters {summary['parameters']['trainable']:,} of {summary['parameters']['total']:,}")
    if "metrics" in summary:
        m = summary["metrics"]
        print(f"\n{data.dataset} {m['split']} ({m['out_dir']}):\n{format_metrics(m)}")
    return summary


def evaluate(
    checkpoint: str,
    data: DataConfig = DataConfig(),
    split: str | None = None,
    out_dir: str | None = None,
    batch_size: int = 256,
    use_cache: bool = True,
) -> dict:
    """Evaluate a checkpoint: official VQA accuracy (overall, per answer type, per question type), exact match,
    top-5, macro/weighted precision, recall and F1. Writes metrics.json, predictions.csv and failures.json.

    Args:
        checkpoint: checkpoint directory (``<run>/checkpoint``).
        data: dataset to evaluate on.
        split: split name (default ``data.eval_split``).
        out_dir: output directory (default ``<checkpoint>/eval-<dataset>-<split>``).
        batch_size: questions per forward pass.
        use_cache: reuse / fill the feature cache for the towers' outputs.
    """
    from vqakit.eval.evaluate import evaluate_checkpoint, format_metrics

    metrics = evaluate_checkpoint(checkpoint, data, split, out_dir, batch_size, use_cache)
    print(format_metrics(metrics))
    print(f"wrote {metrics['out_dir']}")
    return metrics


def predict(checkpoint: str, image: str, question: str | list[str], top_k: int = 5, backend: str = "auto"
            ) -> list[dict]:
    """Answer questions about one image; prints the top-k answers with their scores.

    Args:
        checkpoint: checkpoint directory.
        image: image file.
        question: a question; for several, repeat ``--question+ "..."`` or pass a JSON list.
        top_k: how many answers to show per question.
        backend: ``torch``, ``onnx`` (ONNX Runtime; exports on first use) or ``auto`` (``onnx`` when exported).
    """
    from vqakit.generate import load_predictor

    predictor = load_predictor(checkpoint, backend=backend)
    results = predictor.predict(image, question, top_k=top_k)
    for r in results:
        print(f"Q: {r.question}")
        for rank, (answer, score) in enumerate(r.top_k, 1):
            print(f"  {rank}. {answer:<20} {score:.4f}")
    return [{"question": r.question, "answer": r.answer, "score": r.score, "top_k": r.top_k} for r in results]


def compare(
    model: TwoTowerConfig = TwoTowerConfig(),
    data: DataConfig = DataConfig(),
    train: TrainConfig = TrainConfig(),
    strategies: str = "frozen,lora,full,two-stage",
    lora_ranks: str | None = None,
    stage1_epochs: int = 1,
    out_dir: str = "runs/compare",
) -> list[dict]:
    """Train the same model under several strategies (same data split and seed) and compare time to train,
    trainable parameters, peak memory, throughput and accuracy/precision/recall/F1. Writes
    comparison.csv/json/md and plots into ``out_dir``; rerunning continues unfinished strategies.

    Args:
        model: model architecture (shared by every strategy).
        data: data (use ``--data.limit`` for a quick subset).
        train: training settings; ``train.epochs`` is each strategy's total, ``train.unfreeze_last_n``
            is two-stage's stage 2, ``train.vision``/``train.text``/``train.out_dir`` are set per strategy.
        strategies: comma-separated: frozen, lora, full, two-stage, lora-r<rank>.
        lora_ranks: a LoRA rank sweep, e.g. ``2,4,8,16`` (adds lora-r2, lora-r4, ...).
        stage1_epochs: epochs of two-stage's frozen stage 1.
        out_dir: where the runs, tables and plots go.
    """
    import yaml

    from vqakit.compare import markdown_table, parse_strategies, run_strategy, write_outputs

    names = parse_strategies(strategies, lora_ranks)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base.yaml"
    base.write_text(yaml.safe_dump({"model": asdict(model), "data": asdict(data), "train": asdict(train)},
                                   sort_keys=False))
    rows = []
    for name in names:
        print(f"== {name}", flush=True)
        rows.append(run_strategy(name, ["--config", str(base)], out, stage1_epochs, train.unfreeze_last_n,
                                 train.epochs))
    write_outputs(rows, out)
    print(markdown_table(rows))
    print(f"wrote {out}/comparison.csv, comparison.json, comparison.md, curves.png, accuracy_vs_time.png, "
          f"per_answer_type.png")
    return rows


def export(checkpoint: str, out_dir: str | None = None) -> None:
    """Export a checkpoint to ONNX (vision tower, text tower, fusion + head) for fast CPU serving, verified
    against PyTorch on fresh inputs. ``predict`` then uses it automatically (``--backend auto``).

    Args:
        checkpoint: checkpoint directory.
        out_dir: where the .onnx files go (default ``<checkpoint>/onnx``).
    """
    from vqakit.export import export_onnx

    out = export_onnx(checkpoint, out_dir)
    info = json.loads((out / "export.json").read_text())
    print(f"wrote {out}: max |onnx - torch| = {info['max_abs_diff']}")


def list_models() -> list[str]:
    """List the presets: YAML files under configs/, used as ``vqakit train --config configs/NAME.yaml``."""
    names = sorted(p.stem for p in (Path(__file__).parent.parent / "configs").glob("*.yaml"))
    print("\n".join(names))
    return names


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vqakit`` console script (results are printed, not returned to the shell)."""
    from jsonargparse import CLI

    _setup_logging()
    try:
        CLI([prepare, train, evaluate, predict, export, compare, list_models], args=argv, as_positional=False)
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as err:  # bad input: say what, not a traceback
        print(f"vqakit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main(sys.argv[1:])
