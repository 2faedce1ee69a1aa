"""A killed ``evaluate`` resumes from its predictions journal and scores exactly like an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from vqakit.data.config import DataConfig
from vqakit.eval.evaluate import evaluate_checkpoint
from vqakit.eval.journal import JOURNAL_NAME, PredictionJournal

TIMINGS = ("predict_seconds", "questions_per_second", "resumed_questions", "out_dir", "results_file")

CHILD = """
import sys
from vqakit.data.config import DataConfig
from vqakit.eval.evaluate import evaluate_checkpoint
evaluate_checkpoint(sys.argv[1], DataConfig(limit=160, cache_dir=sys.argv[3]), out_dir=sys.argv[2], batch_size=8,
                    progress=False, journal_every=8)
"""


def test_a_killed_evaluation_resumes_and_scores_the_same(tiny_checkpoint, tmp_path):
    data = DataConfig(limit=160, cache_dir=str(tmp_path / "cache"))
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tiny_checkpoint), str(killed), data.cache_dir],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = killed / JOURNAL_NAME
    deadline = time.time() + 600  # a busy machine: the child may need minutes to import
    while proc.poll() is None and time.time() < deadline:
        if journal.is_file() and journal.read_bytes().count(b"\n") > 1 + 3 * 8:  # header + 3 chunks answered
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the evaluation ended before it could be killed: {err.decode()[-2000:]}"
    assert journal.is_file(), "no journal was written before the deadline"
    answered = journal.read_bytes().count(b"\n") - 1
    assert not (killed / "metrics.json").exists()

    resumed = evaluate_checkpoint(tiny_checkpoint, data, out_dir=killed, batch_size=8, progress=False, journal_every=8)
    assert answered <= resumed["resumed_questions"] + 1 and 0 < resumed["resumed_questions"] < resumed["num_questions"]
    assert not journal.exists()  # removed once the outputs are written

    fresh = evaluate_checkpoint(tiny_checkpoint, data, out_dir=tmp_path / "fresh", batch_size=8, progress=False)
    assert fresh["resumed_questions"] == 0
    assert {k: v for k, v in resumed.items() if k not in TIMINGS} == {k: v for k, v in fresh.items() if k not in TIMINGS}
    assert (killed / "predictions.csv").read_text() == (tmp_path / "fresh" / "predictions.csv").read_text()


def test_journal_ignores_a_cut_line_and_another_checkpoints_answers(tmp_path):
    row = {"row": 0, "question_id": 7, "answer": "yes", "score": 0.9, "top_k": [["yes", 0.9]]}
    j = PredictionJournal(tmp_path, "key-a")
    j.append([row, {**row, "row": 1}])
    with open(j.path, "ab") as f:
        f.write(json.dumps({**row, "row": 2}).encode()[:20])  # the write a SIGKILL cut short
    again = PredictionJournal(tmp_path, "key-a")
    assert sorted(again.done) == [0, 1]
    again.append([{**row, "row": 2}])
    assert sorted(PredictionJournal(tmp_path, "key-a").done) == [0, 1, 2]
    assert PredictionJournal(tmp_path, "key-b").done == {}  # other weights / split / settings: start over
    assert PredictionJournal(tmp_path, "key-a").done == {}


def test_per_image_answers_each_image_in_one_call_as_served(tiny_checkpoint, tmp_path, monkeypatch):
    """per_image: one predictor.predict(image, questions) call per image, the answers in the split's order; a float32
    classifier answers the same as in batches."""
    from vqakit.inference.predict import VQAPredictor

    data = DataConfig(limit=40, cache_dir=str(tmp_path / "cache"))
    batched = evaluate_checkpoint(tiny_checkpoint, data, out_dir=tmp_path / "batched", batch_size=8, progress=False)
    calls = []
    predict = VQAPredictor.predict
    monkeypatch.setattr(VQAPredictor, "predict", lambda self, image, questions, *a, **k: calls.append(
        (image, list(questions))) or predict(self, image, questions, *a, **k))
    served = evaluate_checkpoint(tiny_checkpoint, data, out_dir=tmp_path / "served", progress=False, per_image=True,
                                 journal_every=7)
    images = [image for image, _ in calls]
    assert len(images) == len(set(images)) > 1  # one call per image, never cut between journal chunks
    assert sum(len(q) for _, q in calls) == served["num_questions"] == batched["num_questions"]
    assert served["vqa_accuracy"] == batched["vqa_accuracy"]
    import csv

    def answers(d):  # scores may differ in the 4th decimal with the batch's shape
        return [(r["question_id"], r["prediction"]) for r in csv.DictReader(open(tmp_path / d / "predictions.csv"))]

    assert answers("served") == answers("batched")
