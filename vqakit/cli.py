"""``vqakit`` command line: one typed function per subcommand; the signatures are the interface.

    vqakit prepare  --data.dataset easy-vqa
    vqakit train    --config easy-vqa --train.epochs 3 --model.fusion gated
    vqakit evaluate --checkpoint runs/easy-vqa/checkpoint --data.eval_split test
    vqakit score    --questions Q.json --annotations A.json --results results.json --out scores.json
    vqakit predict  --checkpoint runs/easy-vqa/checkpoint --image img.png --question "what shape is it?"
    vqakit predict  --checkpoint runs/easy-vqa/checkpoint --image img.png --question "what shape?" --output result.png
    vqakit visualize --checkpoint runs/easy-vqa/checkpoint --split test --num 16 --output grid.png
    vqakit export   --checkpoint runs/easy-vqa/checkpoint          # ONNX for fast CPU serving
    vqakit serve    --checkpoint runs/easy-vqa/checkpoint --host 127.0.0.1 --port 8000   # REST API + /ui
    vqakit demo     --checkpoint runs/easy-vqa/checkpoint          # the web UI
    vqakit compare  --config easy-vqa --data.limit 4000 --strategies frozen,lora,full,two-stage
    vqakit tune     --config shapes-rel --budget_minutes 30   # Optuna search -> best_config.yaml
    vqakit report   runs/compare   # IEEE paper (LaTeX -> PDF), HTML and markdown of compare/train runs

Every subcommand takes ``--config NAME`` (a packaged preset: ``vqakit list_models``) or ``--config FILE.yaml``, and
dotted overrides (jsonargparse, as litgpt and LightningCLI do); ``--print_config`` shows the resolved configuration.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from vqakit.data.config import DataConfig
from vqakit.eval.endpoint import EndpointOptions  # a plain dataclass: httpx is imported when used
from vqakit.models.gru_decoder import GRUDecoderConfig
from vqakit.models.llm_prefix import LLMPrefixConfig
from vqakit.models.two_tower import TwoTowerConfig
from vqakit.serve.config import ServeConfig  # a plain dataclass: FastAPI is imported by `serve` only
from vqakit.models.vlm import VLMConfig
from vqakit.models.chat_vlm import ChatVLMConfig
from vqakit.train.config import TrainConfig  # a plain dataclass: no training code is imported


_COMMAND: list[str] | None = None  # the command line of this process, recorded by `train` in the model card


def _setup_logging() -> None:
    log = logging.getLogger("vqakit")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def prepare(data: DataConfig = DataConfig(), out_dir: str = "data/prepared", model: TwoTowerConfig = TwoTowerConfig(),
            train: TrainConfig = TrainConfig(), cache_features: bool = False, workers: int = 4) -> dict:
    """Load and validate a dataset, check every image, build the answer vocabulary, print statistics and,
    with ``--cache_features true``, fill the feature cache of ``model``'s frozen towers for training.

    Writes ``{out_dir}/{dataset}/``: ``{split}.jsonl`` (one example per line), ``answer_vocab.json``,
    ``stats.json`` and, for a sampled VQA v2 training split, ``sample.json`` (the sampled image ids).

    Args:
        data: which dataset and splits.
        out_dir: where the prepared files go.
        model: the model whose (frozen) towers' features are cached (pass the training recipe's ``--config``).
        train: the training settings: only towers that ``train.vision`` / ``train.text`` freeze are cached.
        cache_features: encode every image and question once into the feature cache (resumable: rerun a
            killed ``prepare`` and it continues from the last finished shard).
        workers: threads that check and decode images.
    """
    from vqakit.data.prepare import prepare_dataset

    return prepare_dataset(data, out_dir, model, train, cache_features=cache_features, workers=workers)


def convert(
    data: DataConfig = DataConfig(),
    to: str = "jsonl",
    out_dir: str = "data/converted",
    splits: str | None = None,
    copy_images: bool = True,
) -> dict:
    """Convert a dataset (any ``--data.dataset``: easy-vqa, vqa-v2, shapes-rel, jsonl, csv, image-json) to
    ``jsonl``, ``csv``, ``image-json`` (one JSON file per image) or ``vqa-v2`` (the official layout).

    For ``vqa-v2``, ``train`` is written as ``train2014`` and any other split with answers as ``val2014``.

    Args:
        data: the dataset to read (``--data.limit`` converts a seeded subset).
        to: output format.
        out_dir: output folder.
        splits: comma-separated splits (default: ``data.train_split`` and ``data.eval_split``).
        copy_images: copy the images under ``out_dir/images`` (always done for ``vqa-v2``); else reference them.
    """
    from vqakit.data.config import load_split
    from vqakit.data.formats import WRITERS, write_examples

    if to not in WRITERS:
        raise ValueError(f"--to={to!r} is not a writable format; choose one of {list(WRITERS)}")
    names = splits.split(",") if splits else list(dict.fromkeys([data.train_split, data.eval_split]))
    written, targets = {}, {}
    for split in names:
        target = split
        if to == "vqa-v2" and not split.endswith(("2014", "2015")):
            target = "train2014" if split == "train" else "val2014"
        if target in targets:
            raise ValueError(f"splits {targets[target]!r} and {split!r} would both be written as {target!r}; "
                             "convert them one at a time with --splits")
        targets[target] = split
        examples = load_split(data, split)
        path = write_examples(examples, to, out_dir, target, copy_images=copy_images or to == "vqa-v2")
        written[split] = {"as": target, "questions": len(examples), "path": str(path)}
        print(f"{data.dataset} {split} -> {to} {target}: {len(examples):,} questions ({path})")
    return written


def generate(
    out_dir: str = "data/shapes-rel",
    num_train_images: int = 2000,
    num_val_images: int = 500,
    questions_per_image: int = 10,
    occlusion: float = 0.15,
    seed: int = 0,
) -> str:
    """Generate the ``shapes-rel`` procedural benchmark (scenes of 2-5 objects; attribute, existence, counting,
    comparison and relational questions; 10 noisy human answers each) in the official VQA v2 layout.
    Train on it with ``--data.dataset shapes-rel --data.root OUT_DIR --data.eval_split val``.

    Args:
        out_dir: output folder.
        num_train_images: images of ``train2014``.
        num_val_images: images of ``val2014``.
        questions_per_image: questions per image (families balanced).
        occlusion: probability that a scene has one object partly hiding another.
        seed: the same seed writes the same files.
    """
    import time

    from vqakit.data.procedural import write_shapes_rel

    start = time.perf_counter()
    root = write_shapes_rel(out_dir, num_train_images=num_train_images, num_val_images=num_val_images,
                            questions_per_image=questions_per_image, occlusion=occlusion, seed=seed)
    n = num_train_images + num_val_images
    print(f"wrote {root}: {n:,} images, {n * questions_per_image:,} questions in "
          f"{time.perf_counter() - start:.1f} s")
    return str(root)


def mini_vqa(
    root: str,
    out_dir: str = "data/mini-vqa-v2",
    split: str = "train",
    num_images: int = 1000,
    seed: int = 0,
    max_answer_words: int = 3,
    min_agreement: float = 0.5,
    image_size: int = 224,
    formats: str = "jsonl,csv",
) -> dict:
    """Build a compact mini VQA v2 (seed 003): a seeded sample of images, the majority human answer as the
    target, short and unambiguous answers only, images shrunk to ``image_size``; load it back with
    ``--data.dataset jsonl --data.root OUT_DIR``.

    Args:
        root: folder with the official VQA v2 files.
        out_dir: output folder.
        split: VQA v2 split to sample.
        num_images: images to sample.
        seed: seed of the sample.
        max_answer_words: drop questions whose majority answer is longer.
        min_agreement: drop questions where fewer than this fraction of humans gave the majority answer.
        image_size: longest image side in pixels.
        formats: comma-separated: jsonl, csv, image-json.
    """
    from vqakit.data.formats import build_mini_vqa

    stats = build_mini_vqa(root, out_dir, split, num_images, seed, max_answer_words, min_agreement, image_size,
                           formats.split(","))
    print(json.dumps(stats, indent=1))
    return stats


def stats(data: DataConfig = DataConfig(), splits: str | None = None, out_dir: str = "runs/stats",
          top_k: int = 20) -> dict:
    """How hard is a dataset? Prints and plots (PNG) the answer distribution, answer types, question lengths,
    top question types, and the official accuracy of blind baselines (most common answer; most common answer
    per question type / per question), fit on ``data.train_split`` and scored on each split.

    Args:
        data: the dataset.
        splits: comma-separated splits to describe (default: ``data.train_split`` and ``data.eval_split``).
        out_dir: where ``{dataset}-{split}.json`` / ``.png`` go.
        top_k: how many answers / question types to list.
    """
    from vqakit.data.config import load_split
    from vqakit.data.stats import dataset_stats, format_stats, write_stats

    names = splits.split(",") if splits else list(dict.fromkeys([data.train_split, data.eval_split]))
    fit = load_split(data, data.train_split)
    out = {}
    for split in names:
        examples = fit if split == data.train_split else load_split(data, split)
        s = dataset_stats(examples, fit_examples=fit, top_k=top_k)
        name = f"{data.dataset}-{split}"
        json_path, png_path = write_stats(s, out_dir, name)
        print(format_stats(s, name) + f"\nwrote {json_path}, {png_path}\n")
        out[split] = s
    return out


def bench(suite: str = "benchmarks/suite.yaml", out_dir: str = "runs/bench", quick: bool = False,
          only: str | None = None, extra_args: list[str] | None = None, reuse: bool = False,
          results_dir: str | None = "benchmarks/results") -> dict:
    """Run the benchmark suite (datasets x model recipes): train, evaluate and time each entry; write
    ``bench.json`` and ``bench.md`` (accuracy per dataset and answer type, time to train, predict latency
    p50/p95, throughput, peak memory).

    Args:
        suite: YAML file with ``entries: [{name, config, args}]``.
        out_dir: where the runs, their logs, bench.json and bench.md go.
        quick: a few hundred questions and a few steps per entry (a smoke test, not a measurement).
        only: comma-separated entry names to run.
        extra_args: more ``vqakit train`` flags for every entry, e.g. ``["--model.vision.image_size", "32"]``.
        reuse: take entries already trained and evaluated in ``out_dir`` as they are (prediction is still timed).
        results_dir: also copy bench.json and bench.md here (not in ``--quick`` mode).
    """
    from vqakit.experiments.bench import markdown_table, run_suite

    result = run_suite(suite, out_dir, quick=quick, extra_args=extra_args, only=only.split(",") if only else None,
                       reuse=reuse, results_dir=None if quick else results_dir)
    if result["rows"]:
        print(markdown_table(result["rows"]))
    stem = "bench" if result["rows"] or "transfer" not in result else "transfer"
    print(f"wrote {out_dir}/{stem}.json, {out_dir}/{stem}.md" + ("" if quick or not results_dir else
                                                                f" and {results_dir}/{stem}.json, {stem}.md"))
    return result


def train(
    model: TwoTowerConfig = TwoTowerConfig(),
    data: DataConfig = DataConfig(),
    train: TrainConfig = TrainConfig(),
    evaluate: bool = True,
    gru: GRUDecoderConfig | None = None,
    llm: LLMPrefixConfig | None = None,
    vlm: VLMConfig | None = None,
    chat_vlm: ChatVLMConfig | None = None,
) -> dict:
    """Train a VQA model, save an HF-style checkpoint directory, then evaluate it on ``data.eval_split``.

    Args:
        model: model architecture (the answer classifier).
        data: training and evaluation data.
        train: strategies and optimisation.
        evaluate: evaluate the checkpoint on the evaluation split after training.
        gru: train a generative GRU-decoder model instead of the classifier (preset ``easy-vqa-gru``).
        llm: train a vision-prefixed causal LLM instead (preset ``easy-vqa-llm-stage1``, then stage 2).
        vlm: fine-tune a pretrained BLIP / ViLT model instead (``--vlm.model`` id or directory, LoRA by default).
        chat_vlm: fine-tune a chat VLM (SmolVLM, Qwen2-VL, PaliGemma, LLaVA; ``--chat_vlm.model`` id or directory)
            on answer tokens only; ``--train.text lora|qlora|full|frozen`` is the LM's strategy (docs/chat-vlm.md).
    """
    from vqakit.eval.evaluate import format_metrics

    from vqakit.models.registry import MODEL_FAMILIES

    given = {key: cfg for key, cfg in (("gru", gru), ("llm", llm), ("vlm", vlm), ("chat_vlm", chat_vlm))
             if cfg is not None}
    if len(given) > 1:
        raise ValueError("give one generative family (--gru, --llm, --vlm, --chat_vlm), not several")
    key, config = next(iter(given.items()), ("model", model))
    family = next(f for f in MODEL_FAMILIES.values() if f.train_key == key)  # its config's `vqakit train` argument
    summary = family.fit_function()(config, data, train, evaluate=evaluate, command=_command())
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
    checkpoint: str | None = None,
    data: DataConfig = DataConfig(),
    split: str | None = None,
    out_dir: str | None = None,
    batch_size: int = 256,
    use_cache: bool = True,
    quantize: str | None = None,
    endpoint: str | None = None,
    endpoint_model: str | None = None,
    prompt_template: str = "{question}",
    system_prompt: str | None = None,
    endpoint_options: EndpointOptions = EndpointOptions(),
    resume: bool = True,
    per_image: bool | None = None,
) -> dict:
    """Evaluate a checkpoint, or any OpenAI-compatible VQA server: official VQA accuracy (overall, per answer type,
    per question type), exact match, top-5, macro/weighted precision, recall and F1. Writes metrics.json,
    predictions.csv and failures.json.

    Args:
        checkpoint: checkpoint directory (``<run>/checkpoint``); or give ``endpoint`` instead.
        data: dataset to evaluate on.
        split: split name (default ``data.eval_split``).
        out_dir: output directory (default ``<checkpoint>/eval-<dataset>-<split>``, or
            ``eval-<endpoint_model>-<dataset>-<split>`` for an endpoint; its ``answers.jsonl`` resumes a run).
        batch_size: questions per forward pass (checkpoint).
        use_cache: reuse / fill the feature cache for the towers' outputs (checkpoint).
        quantize: ``int8``: evaluate as served with dynamic INT8 quantization of the Linear layers (CPU).
        endpoint: an OpenAI-compatible server's base URL (``http://127.0.0.1:8000/v1``: ``vqakit serve``, vLLM,
            ...), asked one chat completion per question with the image as a data: URL.
        endpoint_model: the model id the endpoint serves (its ``GET /v1/models``).
        prompt_template: the user text sent for each question; ``{question}`` is replaced by it (e.g.
            ``"{question}\\nAnswer the question using a single word or phrase."`` for a general VLM).
        system_prompt: a system message sent before each question (none by default).
        endpoint_options: concurrency, retries and backoff, request timeout, max_tokens, logprobs, API key.
        resume: continue a killed evaluation from its ``predictions.partial.jsonl`` in ``out_dir`` (same
            checkpoint, split and settings); ``false`` predicts every question again.
        per_image: answer each image's questions in one call, as ``vqakit serve`` and ``VQAPredictor.predict`` do,
            not in batches of ``batch_size`` questions (checkpoint). Default: on with ``--quantize`` (dynamic INT8
            scales activations per call, so batches of padded questions answer differently from requests), off
            otherwise.
    """
    from vqakit.eval.evaluate import evaluate_checkpoint, format_metrics

    if (checkpoint is None) == (endpoint is None):
        raise ValueError("give exactly one of --checkpoint DIR or --endpoint URL (with --endpoint_model NAME)")
    if endpoint is not None:
        from vqakit.eval.endpoint import evaluate_endpoint

        if not endpoint_model:
            raise ValueError(f"--endpoint {endpoint} needs --endpoint_model: the model id it serves (GET /v1/models)")
        if quantize:
            raise ValueError("--quantize applies to a local checkpoint; an endpoint is evaluated as it serves")
        metrics = evaluate_endpoint(endpoint, endpoint_model, data, split, out_dir, prompt_template, system_prompt,
                                    endpoint_options)
    else:
        from vqakit.inference.generative import load_predictor

        predictor = load_predictor(checkpoint, quantize=quantize) if quantize else None
        per_image = bool(quantize) if per_image is None else per_image
        metrics = evaluate_checkpoint(checkpoint, data, split, out_dir, batch_size, use_cache, predictor=predictor,
                                      resume=resume, per_image=per_image)
    print(format_metrics(metrics))
    print(f"wrote {metrics['out_dir']}")
    return metrics


def score(questions: str, annotations: str, results: str, out: str | None = None) -> dict:
    """Score an official results file (from any model) with the official VQA accuracy, exactly as the official
    evaluator does (Python 2 rounding included). Prints (or writes) its JSON: overall, perAnswerType,
    perQuestionType and per-question evalQA.

    Args:
        questions: official questions file, e.g. ``v2_OpenEnded_mscoco_val2014_questions.json`` (``.gz`` too).
        annotations: official annotations file, e.g. ``v2_mscoco_val2014_annotations.json`` (``.gz`` too).
        results: ``[{"question_id": int, "answer": str}, ...]`` with one entry per question (``evaluate`` writes it).
        out: write the full JSON here and print the aggregates only (default: print the full JSON).
    """
    from vqakit.eval.score import score_results

    scores = score_results(questions, annotations, results)
    text = json.dumps(scores, indent=2)
    if out is None:
        print(text)
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")
        print(json.dumps({k: scores[k] for k in ("overall", "perAnswerType", "num_questions")}))
        print(f"wrote {out}")
    return scores


def predict(checkpoint: str, image: str, question: str | list[str], top_k: int = 5, backend: str = "auto",
            output: str | None = None, quantize: str | None = "auto") -> list[dict]:
    """Answer questions about one image; prints the top-k answers with their scores.

    Args:
        checkpoint: checkpoint directory.
        image: image file.
        question: a question; for several, repeat ``--question+ "..."`` or pass a JSON list.
        top_k: how many answers to show per question.
        backend: ``torch``, ``onnx`` (ONNX Runtime; exports on first use) or ``auto`` (``onnx`` when exported).
        output: write a PNG here: the image with the question->image attention heatmap of the fusion layers and
            the top-k answers drawn beside it, one row per question.
        quantize: ``auto`` (default): INT8 where the checkpoint's INT8 check found it keeps accuracy (ONNX Runtime,
            CPU), else float32; ``int8``: dynamic INT8 quantization of the Linear layers (CPU); ``null``: float32.
    """
    from vqakit.inference.generative import load_predictor

    predictor = load_predictor(checkpoint, backend=backend, quantize=quantize)
    if output is not None and getattr(predictor, "generative", False):
        raise ValueError(f"--output draws a classifier's attention heatmap; {checkpoint} is a generative checkpoint")
    extra = {"output_attentions": True} if output is not None else {}
    results = predictor.predict(image, question, top_k=top_k, **extra)
    for r in results:
        print(f"Q: {r.question}")
        for rank, (answer, score) in enumerate(r.top_k, 1):
            print(f"  {rank}. {answer:<20} {score:.4f}")
    if output is not None:
        from vqakit.inference.visualize import render_predictions

        print(f"wrote {render_predictions(image, results, output, title=Path(image).name)}")
    return [{"question": r.question, "answer": r.answer, "score": r.score, "top_k": r.top_k} for r in results]


def visualize(
    checkpoint: str,
    data: DataConfig = DataConfig(),
    split: str | None = None,
    num: int = 16,
    columns: int = 4,
    errors_only: bool = False,
    heatmap: bool = True,
    seed: int = 0,
    output: str = "predictions.png",
    backend: str = "auto",
) -> dict:
    """Write a PNG grid of predictions vs ground truth for questions of a split (green: the prediction scores in
    the official VQA metric; red: it does not), each image with its attention heatmap.

    Args:
        checkpoint: checkpoint directory.
        data: dataset to draw from.
        split: split name (default ``data.eval_split``).
        num: how many questions to show.
        columns: grid columns.
        errors_only: show only questions the model gets wrong (the whole split is predicted to find them).
        heatmap: overlay the question->image attention of the fusion layers.
        seed: which questions are drawn (seeded random sample).
        output: the PNG file to write.
        backend: ``torch``, ``onnx`` or ``auto``, as for ``predict``.
    """
    import random

    from vqakit.data.config import load_split
    from vqakit.eval.vqa_accuracy import vqa_accuracy
    from vqakit.inference.predict import VQAPredictor
    from vqakit.inference.visualize import render_grid

    if num < 1:
        raise ValueError(f"--num={num} must be at least 1")
    split = split or data.eval_split
    examples = load_split(data, split)
    if not examples:
        raise ValueError(f"split {split!r} of {data.dataset} has no questions")
    predictor = VQAPredictor.from_pretrained(checkpoint, backend=backend)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    pool = [examples[i] for i in order]

    def answer(batch, with_maps):
        return [p[0] for p in predictor.predict_batch([e.image for e in batch], [e.question for e in batch],
                                                      output_attentions=with_maps)]

    if errors_only:
        chosen, step = [], 256
        for start in range(0, len(pool), step):
            batch = pool[start:start + step]
            chosen += [e for e, p in zip(batch, answer(batch, False)) if vqa_accuracy(p.answer, e.answers) == 0]
            if len(chosen) >= num:
                break
        if not chosen:
            raise ValueError(f"the model answers every question of {data.dataset} {split} correctly: no errors to show")
        pool = chosen
    shown = pool[:num]
    predictions = answer(shown, heatmap)
    out = render_grid(shown, predictions, output, columns=columns,
                      title=f"{data.dataset} {split}" + (" (errors)" if errors_only else ""))
    correct = sum(vqa_accuracy(p.answer, e.answers) > 0 for e, p in zip(shown, predictions))
    print(f"wrote {out}: {len(shown)} questions of {data.dataset} {split}, {correct} answered correctly")
    return {"output": str(out), "questions": len(shown), "correct": correct}


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
    comparison.csv/json/md and plots into ``out_dir``. Rerunning skips the strategies that finished and
    resumes an interrupted one from its last checkpoint (the settings must be the same).

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

    from vqakit.experiments.compare import (check_settings, markdown_table, parse_strategies, run_strategy, strategy_settings,
                                write_outputs)

    names = parse_strategies(strategies, lora_ranks)
    out = Path(out_dir)
    config = {"model": asdict(model), "data": asdict(data), "train": asdict(train)}
    check_settings(out, names, config, stage1_epochs)  # before anything is overwritten
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base.yaml"
    base.write_text(yaml.safe_dump(config, sort_keys=False))
    rows = []
    for name in names:
        print(f"== {name}", flush=True)
        rows.append(run_strategy(name, ["--config", str(base)], out, stage1_epochs, train.unfreeze_last_n,
                                 train.epochs, settings=strategy_settings(name, config, stage1_epochs)))
    write_outputs(rows, out)
    print(markdown_table(rows))
    print(f"wrote {out}/comparison.csv, comparison.json, comparison.md, curves.png, accuracy_vs_time.png, "
          f"per_answer_type.png")
    return rows


def tune(
    model: TwoTowerConfig = TwoTowerConfig(),
    data: DataConfig = DataConfig(),
    train: TrainConfig = TrainConfig(),
    trials: int | None = None,
    budget_minutes: float | None = None,
    seed: int = 0,
    space: str | None = None,
    out_dir: str = "runs/tune",
    storage: str | None = None,
    study_name: str = "tune",
    reports_per_trial: int = 4,
    pruner: str = "median",
    startup_trials: int = 5,
) -> dict:
    """Search hyperparameters around a base recipe (``--config`` preset + dotted overrides) with Optuna: TPE
    sampling, median pruning on the validation VQA accuracy of a split held out of the training data
    (``data.val_fraction``; the evaluation split is never used), SQLite storage so a killed search resumes.
    Writes ``best_config.yaml`` (train it with ``vqakit train --config``), ``trials.csv``, ``trials.md``,
    ``tune.png``, ``space.yaml`` and ``study.db`` into ``out_dir``.

        vqakit tune --config configs/shapes-rel.yaml --budget_minutes 30
        vqakit tune --config configs/easy-vqa.yaml --trials 20 --space my_space.yaml --out_dir runs/tune-easy

    Args:
        model: the base model (two-tower classifier).
        data: the data; ``data.val_fraction`` of the training images are held out for selection.
        train: the base training settings; training length is searched as a multiple of their plan.
        trials: stop when the study has this many complete + pruned trials (counted over resumed sessions).
        budget_minutes: wall time of the whole search (over resumed sessions); a trial starts only when the
            mean duration of the last completed trials still fits.
        seed: seed of the TPE sampler (trials train with ``train.seed``).
        space: YAML file of knobs, ``{train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}, model.hidden_size:
            {choices: [64, 128]}, steps_multiplier: {low: 0.5, high: 2}}`` (default: the base config's main knobs).
        out_dir: where the study, the trial runs and the outputs go; rerun with the same one to resume.
        storage: Optuna storage URL (default ``sqlite:///{out_dir}/study.db``).
        study_name: the study's name in the storage.
        reports_per_trial: validations per trial reported to the pruner.
        pruner: ``median`` (stop a trial whose validation accuracy is below the median of earlier trials at the
            same point of their schedule) or ``none``.
        startup_trials: trials sampled at random before TPE models the results (the base config is trial 0).
    """
    from vqakit.experiments.tune import run_search

    base = {"model": asdict(model), "data": asdict(data), "train": asdict(train)}
    return run_search(base, out_dir=out_dir, space=space, trials=trials, budget_minutes=budget_minutes, seed=seed,
                      storage=storage, study_name=study_name, reports_per_trial=reports_per_trial, pruner=pruner,
                      startup_trials=startup_trials)


def serve(
    checkpoint: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    server: ServeConfig = ServeConfig(),
    ui: bool = True,
    access_log: bool = False,
) -> None:
    """Serve a checkpoint over HTTP (FastAPI + uvicorn): ``POST /predict`` (JSON), ``POST /predict/upload``
    (multipart), ``GET /health``, OpenAI-compatible ``POST /v1/chat/completions`` and ``GET /v1/models``, OpenAPI
    docs at ``/docs`` and the web UI at ``/ui``. Concurrent requests are micro-batched; ``image_path`` and
    ``image_url`` stay disabled until ``--server.image_root`` / ``--server.allowed_url_hosts`` are set. Needs the ``serve`` extra (``pip install -e ".[serve]"``).

    Args:
        checkpoint: checkpoint directory.
        host: address to listen on (``0.0.0.0`` exposes the server to the network).
        port: TCP port.
        server: model backend, batching and request limits.
        ui: mount the Gradio web UI at ``/ui``.
        access_log: log every request (costs throughput).
    """
    import uvicorn

    from vqakit.serve.app import create_app, load_service

    service = load_service(checkpoint, server)
    app = create_app(service, ui=ui, ui_examples=_ui_examples() if ui else None)
    print(f"serving {checkpoint} ({service.predictor.backend}) on http://{host}:{port}  (docs: /docs"
          + (", web UI: /ui" if ui else "") + ")", flush=True)
    # SIGTERM: stop accepting, finish the requests in flight (at most 30 s), then exit 0
    uvicorn.run(app, host=host, port=port, access_log=access_log, log_level="info", timeout_graceful_shutdown=30)


def demo(
    checkpoint: str = "runs/easy-vqa/checkpoint",
    host: str = "127.0.0.1",
    port: int = 7860,
    server: ServeConfig = ServeConfig(),
) -> None:
    """The web UI: upload or pick an example image, ask a question, see the top-5 answers and the attention
    heatmap. The same server as ``vqakit serve`` (the REST API stays available), opened at ``/ui``.

    Args:
        checkpoint: checkpoint directory.
        host: address to listen on.
        port: TCP port.
        server: model backend, batching and request limits.
    """
    serve(checkpoint, host, port, server, ui=True)


def _ui_examples() -> list[list[str]]:
    """A few easy-VQA test images with a question each, to pick from in the web UI (none if not installed)."""
    try:
        from vqakit.data.sources import easy_vqa_data_dir

        images = easy_vqa_data_dir() / "test" / "images"
    except RuntimeError:  # easy-vqa is not installed
        return []
    questions = ["what shape is in the image?", "what is the color of the shape?", "is there a blue shape?",
                 "does the image contain a circle?"]
    return [[str(images / f"{i}.png"), q] for i, q in enumerate(questions) if (images / f"{i}.png").is_file()]


def export(checkpoint: str, out_dir: str | None = None, verify_int8: bool = False, data: DataConfig = DataConfig(),
           split: str | None = None, limit: int = 2000, max_drop: float = 0.2) -> dict:
    """Export a checkpoint to ONNX (vision tower, text tower, fusion + head) for fast CPU serving, verified
    against PyTorch on fresh inputs. ``predict`` then uses it automatically (``--backend auto``).

    Args:
        checkpoint: checkpoint directory.
        out_dir: where the .onnx files go (default ``<checkpoint>/onnx``).
        verify_int8: also check INT8 against float32 on questions of ``--data`` (split ``--split``, default
            ``data.eval_split``) and record it: ``predict`` / ``serve`` serve INT8 by default where it keeps
            accuracy (training runs this check on its validation questions).
        split: the split to check INT8 on.
        limit: at most this many questions of it (a seeded sample).
        max_drop: official accuracy points INT8 may lose and still be served by default.
    """
    from vqakit.inference.export import export_onnx

    if verify_int8:  # the questions first: bad data fails before the export runs
        from vqakit.data.config import load_split

        if out_dir is not None:
            raise ValueError("--verify_int8 checks the export that serving loads, <checkpoint>/onnx: drop --out_dir")
        split = split or data.eval_split
        examples = load_split(data, split)
        if not any(e.answers for e in examples):
            raise ValueError(f"split {split!r} of {data.dataset} has no questions with human answers to check INT8 on")
    out = export_onnx(checkpoint, out_dir)
    info = json.loads((out / "export.json").read_text())
    print(f"wrote {out}: max |onnx - torch| = {info['max_abs_diff']}")
    result = {"onnx_dir": str(out), "max_abs_diff": info["max_abs_diff"]}
    if verify_int8:
        from vqakit.eval.int8 import verify_int8 as check

        result["int8_check"] = check(checkpoint, examples, max_drop=max_drop, limit=limit)  # logs the verdict
    return result


def report(run_dirs: list[str], out_dir: str | None = None, title: str | None = None, pdf: str = "auto") -> dict:
    """Write a paper about compare / train runs: LaTeX in IEEE two-column format (report.tex, compiled to
    report.pdf when pdflatex is installed), report.html and report.md, with the approach, an architecture
    diagram generated from the model config, the metrics tables and the plots.

        vqakit report runs/compare-easy-vqa [MORE_RUN_DIRS...] [--out_dir DIR] [--pdf auto|true|false]

    Args:
        run_dirs: ``vqakit compare`` output directories and/or ``vqakit train`` run directories (positional).
        out_dir: where the report goes (default ``<first run dir>/report``).
        title: the paper's title (default: generated from the dataset and strategies).
        pdf: ``auto`` compiles when a LaTeX engine is installed, ``true`` requires one, ``false`` skips it.
    """
    from vqakit.experiments.report import write_report

    written = write_report(run_dirs, out_dir, title, pdf)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    if "pdf" not in written and pdf == "auto":
        print("no LaTeX engine with IEEEtran found: report.pdf not compiled (see the README to install one)")
    return {k: str(v) for k, v in written.items()}


def _positional_run_dirs(argv: list[str]) -> list[str]:
    """``report A B --opt x`` -> ``report --run_dirs '["A", "B"]' --opt x``: run directories are positional
    (every other subcommand takes options only)."""
    if not argv or argv[0] != "report":
        return argv
    i = 1
    while i < len(argv) and not argv[i].startswith("-"):
        i += 1
    return ["report", *(["--run_dirs", json.dumps(argv[1:i])] if i > 1 else []), *argv[i:]]


def _command() -> str | None:
    import shlex

    return None if _COMMAND is None else shlex.join(["vqakit", *_COMMAND])


def list_models() -> list[str]:
    """List the presets shipped in the package (``vqakit/configs/*.yaml``): ``vqakit train --config NAME``."""
    from vqakit.configs import list_presets

    names = list_presets()
    print("\n".join(names))
    return names


def _resolve_configs(argv: list[str]) -> list[str]:
    """``--config NAME`` -> the packaged preset's path; a path to an existing file is kept as given.

    A recipe or run config written by an earlier version (``model: {vision_grid_stride: 16}``) and dotted flags of
    the earlier names (``--model.vision_grid_stride 16``) are read in today's names (``model.vision.grid_stride``;
    ``vqakit.models.registry.upgrade_recipe``), saying so on stderr."""
    from vqakit.configs import resolve_config
    from vqakit.models.registry import upgrade_dotted_key

    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = _upgraded_config(resolve_config(out[i + 1]))
        elif arg.startswith("--config="):
            out[i] = "--config=" + _upgraded_config(resolve_config(arg.split("=", 1)[1]))
        elif arg.startswith("--") and "." in arg:
            key, eq, value = arg[2:].partition("=")
            new = upgrade_dotted_key(key)
            if new != key:
                print(f"vqakit: --{key} is now --{new}", file=sys.stderr)
                out[i] = f"--{new}{eq}{value}"
    return out


def _upgraded_config(path: str) -> str:
    """``path``, or the YAML text of its recipe in today's names when it uses names of an earlier version."""
    import yaml

    from vqakit.models.registry import upgrade_recipe

    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return path  # jsonargparse reports it
    if not isinstance(recipe, dict):
        return path
    recipe, renamed = upgrade_recipe(recipe)
    if not renamed:
        return path
    print(f"vqakit: {path} uses earlier names, read as " + ", ".join(f"{old} -> {new}" for old, new in renamed),
          file=sys.stderr)
    return yaml.safe_dump(recipe, sort_keys=False)


RECIPE_COMMANDS = ("train", "compare", "prepare", "tune")


def _apply_recipe(argv: list[str]) -> list[str]:
    """``train ... --recipe auto [--recipe_budget_minutes M] ...``: derive the recipe from the data the other
    arguments name (``vqakit.train.auto``), print it with its reasons, write it to ``<out_dir>/recipe.yaml`` and
    put it first (``--config recipe.yaml``), so that every option given on the command line overrides it."""
    if not argv or argv[0] not in RECIPE_COMMANDS:
        return argv
    rest, recipe, budget = [argv[0]], None, None
    i = 1
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in ("--recipe", "--recipe_budget_minutes"):
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{key} needs a value")
                value, i = argv[i + 1], i + 1
            if key == "--recipe":
                recipe = value
            else:
                budget = float(value)
        else:
            rest.append(arg)
        i += 1
    if recipe is None:
        if budget is not None:
            raise ValueError("--recipe_budget_minutes only applies with --recipe auto")
        return argv
    if recipe != "auto":
        raise ValueError(f"--recipe={recipe!r} is not one of ('auto',); a preset is given with --config NAME_OR_FILE")
    from jsonargparse import ArgumentParser

    from vqakit.train.auto import auto_recipe

    command = globals()[rest[0]]
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(command, as_group=False, as_positional=False)
    cfg = parser.parse_args([a for a in rest[1:] if a != "--print_config"])
    data = DataConfig(**cfg.data.as_dict())
    # the command's own --out_dir where it has one (prepare, compare, tune), else the run's (train.out_dir)
    out_dir = Path(cfg.out_dir if "out_dir" in cfg or "train" not in cfg else cfg.train.out_dir)
    kwargs = {} if budget is None else {"budget_minutes": budget}
    auto = auto_recipe(data, **kwargs)
    path = auto.write(out_dir)
    import inspect

    import yaml

    accepted = inspect.signature(command).parameters
    if any(group not in accepted for group in auto.config):  # e.g. prepare has no `train`
        path = out_dir / f"recipe-{rest[0]}.yaml"
        path.write_text(yaml.safe_dump({k: v for k, v in auto.config.items() if k in accepted}, sort_keys=False))
    print(auto.describe())
    print(f"recipe written to {path} (repeat with --config {path}); options on the command line override it")
    return [rest[0], "--config", str(path), *rest[1:]]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``vqakit`` console script (results are printed, not returned to the shell)."""
    from jsonargparse import CLI

    global _COMMAND
    _COMMAND = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    try:
        args = _resolve_configs(_positional_run_dirs(sys.argv[1:] if argv is None else argv))
        CLI(
            [
                prepare, train, evaluate, score, predict, visualize, serve, demo, export,  # data -> model -> serving
                compare, tune, report, bench,  # experiments
                convert, generate, mini_vqa, stats, list_models,  # datasets and catalogue
            ],
            args=_apply_recipe(args),
            as_positional=False,
        )
    except (ValueError, FileNotFoundError, NotImplementedError, RuntimeError) as err:  # bad input: say what, not a traceback
        print(f"vqakit: error: {err}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main(sys.argv[1:])
