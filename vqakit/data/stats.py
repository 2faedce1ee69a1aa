"""How hard is a VQA split? Distributions, and the accuracy of baselines that never look at the image.

Goyal et al. (2017, https://arxiv.org/abs/1612.00837) balanced VQA v2 because answer priors alone
scored well on VQA v1; Antol et al. (2015) report the "prior (yes)" and "per Q-type prior" baselines.
``dataset_stats`` reports, for a split:

- answer distribution (majority normalised answer), answer types, question lengths, top question types;
- trivial baselines scored with the official VQA accuracy: the most common answer; the most common
  answer per question type (question-only prior); the most common answer per question text (falling
  back to the question type, then to the overall answer). Priors are fit on ``fit_examples`` (the
  training split) and scored on ``examples``, so they measure what a blind model can learn.

A model is only interesting where it clearly beats these numbers.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from vqakit.data.answers import majority_answer, normalize_answer
from vqakit.data.example import Example
from vqakit.eval.vqa_accuracy import official_accuracy, vqa_accuracy


def _question_key(question: str) -> str:
    return " ".join(normalize_answer(question).split())


def fit_priors(examples: list[Example]) -> dict:
    """Most common majority answer overall, per question type and per (normalised) question text."""
    overall, per_type, per_question = Counter(), defaultdict(Counter), defaultdict(Counter)
    for e in examples:
        if not e.answers:
            continue
        a = majority_answer(e.answers)
        overall[a] += 1
        per_type[e.question_type][a] += 1
        per_question[_question_key(e.question)][a] += 1
    if not overall:
        raise ValueError("cannot fit answer priors: no example has answers")
    top = overall.most_common(1)[0][0]
    return {
        "most_common": top,
        "per_question_type": {k: c.most_common(1)[0][0] for k, c in per_type.items()},
        "per_question": {k: c.most_common(1)[0][0] for k, c in per_question.items()},
    }


def baseline_predictions(priors: dict, e: Example) -> dict[str, str]:
    by_type = priors["per_question_type"].get(e.question_type, priors["most_common"])
    return {
        "most_common_answer": priors["most_common"],
        "question_type_prior": by_type,
        "question_prior": priors["per_question"].get(_question_key(e.question), by_type),
    }


def baseline_accuracies(fit_examples: list[Example], examples: list[Example]) -> dict:
    """Official accuracy of each blind baseline on ``examples``: overall and per answer type."""
    priors = fit_priors(fit_examples)
    scored = [e for e in examples if e.answers]
    if not scored:
        raise ValueError("cannot score baselines: no example has answers (a test split?)")
    accs: dict[str, list[float]] = defaultdict(list)
    per_type: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    per_qtype: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for e in scored:
        for name, pred in baseline_predictions(priors, e).items():
            acc = vqa_accuracy(pred, e.answers)
            accs[name].append(acc)
            per_type[name][e.answer_type].append(acc)
            per_qtype[name][e.question_type].append(acc)
    return {
        name: {"vqa_accuracy": official_accuracy(v),
               "per_answer_type": {t: official_accuracy(a) for t, a in sorted(per_type[name].items())},
               "per_question_type": {t: official_accuracy(a) for t, a in sorted(per_qtype[name].items())}}
        for name, v in accs.items()
    } | {"most_common_answer_is": priors["most_common"]}


def dataset_stats(examples: list[Example], fit_examples: list[Example] | None = None, top_k: int = 20) -> dict:
    """Statistics of ``examples``; baselines are fit on ``fit_examples`` (default: ``examples`` itself)."""
    if not examples:
        raise ValueError("no examples to describe")
    answered = [e for e in examples if e.answers]
    majority = Counter(majority_answer(e.answers) for e in answered)
    lengths = Counter(len(e.question.split()) for e in examples)
    n_words = [len(e.question.split()) for e in examples]
    stats = {
        "questions": len(examples),
        "images": len({e.image_id for e in examples}),
        "questions_per_image": round(len(examples) / len({e.image_id for e in examples}), 2),
        "distinct_answers": len(majority),
        "top_answers": [[a, n, round(100 * n / max(1, len(answered)), 2)] for a, n in majority.most_common(top_k)],
        "answer_types": dict(Counter(e.answer_type for e in examples).most_common()),
        "question_length": {"mean": round(sum(n_words) / len(n_words), 2), "min": min(n_words), "max": max(n_words),
                            "histogram": dict(sorted(lengths.items()))},
        "top_question_types": Counter(e.question_type for e in examples).most_common(top_k),
        "distinct_questions": len({_question_key(e.question) for e in examples}),
    }
    if answered:
        top1000 = {a for a, _ in majority.most_common(1000)}
        stats["top_1000_answer_coverage"] = round(100 * sum(majority[a] for a in top1000) / len(answered), 2)
        stats["baselines"] = baseline_accuracies(fit_examples or examples, examples)
    return stats


def format_stats(stats: dict, name: str = "") -> str:
    lines = [f"{name}: {stats['questions']:,} questions, {stats['images']:,} images "
             f"({stats['questions_per_image']} per image), {stats['distinct_answers']:,} distinct answers, "
             f"{stats['distinct_questions']:,} distinct questions"]
    lines.append("answer types: " + ", ".join(f"{k} {v:,}" for k, v in stats["answer_types"].items()))
    ql = stats["question_length"]
    lines.append(f"question length (words): mean {ql['mean']}, min {ql['min']}, max {ql['max']}")
    lines.append("top answers: " + ", ".join(f"{a} {p}%" for a, _, p in stats["top_answers"][:10]))
    lines.append("top question types: " + ", ".join(f"{t!r} {n:,}" for t, n in stats["top_question_types"][:10]))
    if "baselines" in stats:
        b = stats["baselines"]
        lines.append(f"blind baselines (official VQA accuracy; most common answer = {b['most_common_answer_is']!r}):")
        for k, v in b.items():
            if isinstance(v, dict):
                per = ", ".join(f"{t} {a}" for t, a in v["per_answer_type"].items())
                lines.append(f"  {k:<20} {v['vqa_accuracy']:6.2f}   ({per})")
    return "\n".join(lines)


def plot_stats(stats: dict, path: str | Path, title: str = "") -> Path:
    """One PNG with four panels: top answers, answer types, question lengths, top question types."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    answers = stats["top_answers"][:15][::-1]
    ax[0, 0].barh([a for a, _, _ in answers], [n for _, n, _ in answers])
    ax[0, 0].set_title("top majority answers")
    types = stats["answer_types"]
    ax[0, 1].bar(list(types), list(types.values()))
    ax[0, 1].set_title("answer types")
    hist = stats["question_length"]["histogram"]
    ax[1, 0].bar([int(k) for k in hist], list(hist.values()))
    ax[1, 0].set_title("question length (words)")
    qtypes = stats["top_question_types"][:15][::-1]
    ax[1, 1].barh([t for t, _ in qtypes], [n for _, n in qtypes])
    ax[1, 1].set_title("top question types")
    if "baselines" in stats:
        b = stats["baselines"]
        fig.text(0.5, 0.005, "blind baselines: " + ", ".join(
            f"{k} {v['vqa_accuracy']}" for k, v in b.items() if isinstance(v, dict)), ha="center")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def write_stats(stats: dict, out_dir: str | Path, name: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(stats, indent=1) + "\n")
    return out / f"{name}.json", plot_stats(stats, out / f"{name}.png", title=name)
