"""Answer normalisation exactly as the official VQA evaluator does it, and the answer vocabulary.

Normalisation reproduces ``processPunctuation`` and ``processDigitArticle`` of the official VQA
evaluator (Antol et al., 2015, https://arxiv.org/abs/1505.00468; Goyal et al., 2017,
https://arxiv.org/abs/1612.00837), ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` in
https://github.com/GT-Vision-Lab/VQA, quirks included, so that a vocabulary built here and the
accuracy computed in :mod:`vqakit.eval.vqa_accuracy` agree bit for bit with published numbers:

- punctuation is removed when it touches a space *in the original text*, or anywhere when the
  original text contains a digit-comma-digit (``1,000``); otherwise it is replaced by a space;
- the period regex ``(?!<=\\d)(\\.)(?!\\d)`` has a typo'd look-behind (it is a look-ahead for the
  literal ``<=``), so it removes every period not followed by a digit; it is called with
  ``re.UNICODE`` (= 32) in the *count* slot, so at most 32 periods are removed;
- number words ``none`` / ``zero`` ... ``ten`` become digits, the articles ``a an the`` are dropped
  and contractions are restored (``dont`` -> ``don't``) from the evaluator's table below.

The soft targets of :meth:`AnswerVocab.soft_scores` are the usual VQA classification targets
(Teney et al., 2018, https://arxiv.org/abs/1708.02711), here ``min(count / 3, 1)`` per answer.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# --- Data tables of the official evaluator (vqaEval.py, GT-Vision-Lab/VQA). Keep them exactly as they are:
# the keys written with a capital "I" can never match (the text is lower-cased first) and
# "somebody'd" maps to "somebodyd"; both are upstream quirks that published numbers include.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
MANUAL_MAP: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES: tuple[str, ...] = ("a", "an", "the")
# Order matters: each mark is handled in turn on the running output.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)  # fmt: skip
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a look-ahead, kept as upstream wrote it
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
# Upstream calls periodStrip.sub("", text, re.UNICODE): the flag lands in the count slot.
PERIOD_STRIP_COUNT = int(re.UNICODE)  # 32

_CACHE_SIZE = 1 << 18  # answers repeat heavily; normalising 100k questions x 11 strings stays fast


@lru_cache(maxsize=_CACHE_SIZE)
def process_punctuation(text: str) -> str:
    """``processPunctuation`` of the official evaluator, quirks included.

    >>> process_punctuation("hot-dog"), process_punctuation("hot - dog"), process_punctuation("1,000")
    ('hot dog', 'hot  dog', '1000')
    >>> process_punctuation("Yes."), process_punctuation("3.5")
    ('Yes', '3.5')
    """
    out = text
    # Both conditions look at the ORIGINAL text, not at the running output.
    strip_all = COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if strip_all or (p + " " in text) or (" " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


@lru_cache(maxsize=_CACHE_SIZE)
def process_digit_article(text: str) -> str:
    """``processDigitArticle`` of the official evaluator: lower-case, number words to digits, drop
    articles, restore contractions, and re-join on single spaces.

    >>> process_digit_article("The Two dogs"), process_digit_article("dont know")
    ('2 dogs', "don't know")
    """
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


@lru_cache(maxsize=_CACHE_SIZE)
def normalize_answer(text: str) -> str:
    """The full normalisation used by vocabularies and metrics: newlines and tabs to spaces, strip,
    then :func:`process_punctuation` and :func:`process_digit_article`.

    >>> normalize_answer(" A Dog.\\n"), normalize_answer("two"), normalize_answer("none")
    ('dog', '2', '0')
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def majority_answer(answers: list[str]) -> str:
    """The most frequent normalised answer; ties go to the answer that occurs first.

    >>> majority_answer(["Red", "blue", "red.", "Blue"])
    'red'
    """
    if not answers:
        raise ValueError("majority_answer: the list of answers is empty; each question needs at least one answer")
    counts = Counter(normalize_answer(a) for a in answers)  # insertion-ordered, and most_common is stable
    return counts.most_common(1)[0][0]


@dataclass
class AnswerVocab:
    """The answer classes of a classifier head: normalised answers, most frequent first.

    Args:
        answers: the normalised answer strings; the index in this list is the class id.
        counts: how many human answers (over all questions) normalised to each answer.

    >>> vocab = AnswerVocab.build([["yes", "Yes", "no"], ["two", "2", "yes"]], top_k=2)
    >>> vocab.answers, vocab.counts, vocab.encode("Yes."), vocab.soft_scores(["yes", "yes", "no"])
    (['yes', '2'], [3, 2], 0, {0: 0.6666666666666666})
    """

    answers: list[str]
    counts: list[int]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.answers = list(self.answers)
        self.counts = list(self.counts)
        if len(self.answers) != len(self.counts):
            raise ValueError(
                f"AnswerVocab: {len(self.answers)} answers but {len(self.counts)} counts; they must be equal in length"
            )
        for i, (answer, count) in enumerate(zip(self.answers, self.counts)):
            if not isinstance(answer, str):
                raise ValueError(f"AnswerVocab: answers[{i}]={answer!r} is not a string")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise ValueError(f"AnswerVocab: counts[{i}]={count!r} (answer {answer!r}) is not a non-negative int")
        self._index = {}
        for i, answer in enumerate(self.answers):
            if answer in self._index:
                raise ValueError(
                    f"AnswerVocab: duplicate answer {answer!r} at positions {self._index[answer]} and {i}"
                )
            self._index[answer] = i

    @classmethod
    def build(cls, answer_lists: Iterable[list[str]], top_k: int = 1000, min_count: int = 1) -> AnswerVocab:
        """Count every normalised human answer of every question and keep the ``top_k`` most frequent.

        Args:
            answer_lists: one list of raw human answers per question; each answer counts once.
            top_k: the number of classes to keep.
            min_count: drop answers given fewer times than this.

        Ties in frequency are broken alphabetically so the vocabulary is deterministic. Answers that
        normalise to the empty string (e.g. ``"?"``) are not counted.
        """
        if top_k < 1:
            raise ValueError(f"AnswerVocab.build: top_k={top_k} must be >= 1")
        if min_count < 1:
            raise ValueError(f"AnswerVocab.build: min_count={min_count} must be >= 1")
        counter: Counter[str] = Counter()
        for answers in answer_lists:
            if isinstance(answers, str):
                raise ValueError(
                    f"AnswerVocab.build: got the string {answers!r} where a list of answers was expected"
                )
            counter.update(a for a in map(normalize_answer, answers) if a)
        kept = sorted((item for item in counter.items() if item[1] >= min_count), key=lambda item: (-item[1], item[0]))
        kept = kept[:top_k]
        return cls(answers=[a for a, _ in kept], counts=[c for _, c in kept])

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, answer: str) -> bool:
        return normalize_answer(answer) in self._index

    @property
    def label2id(self) -> dict[str, int]:
        """``{answer: class id}``, as in a Hugging Face config."""
        return dict(self._index)

    @property
    def id2label(self) -> dict[int, str]:
        """``{class id: answer}``, as in a Hugging Face config."""
        return dict(enumerate(self.answers))

    def encode(self, answer: str) -> int | None:
        """The class id of ``answer`` after normalisation, or ``None`` when it is not in the vocabulary."""
        return self._index.get(normalize_answer(answer))

    def soft_scores(self, answers: list[str]) -> dict[int, float]:
        """Soft targets ``{class id: min(n / 3, 1)}``, ``n`` = humans who gave that normalised answer.

        Answers outside the vocabulary get no entry.
        """
        counts = Counter(normalize_answer(a) for a in answers)
        return {self._index[a]: min(n / 3, 1.0) for a, n in counts.items() if a in self._index}

    def majority(self, answers: list[str]) -> str:
        """The most frequent normalised answer (see :func:`majority_answer`); it may lie outside the vocabulary."""
        return majority_answer(answers)

    def coverage(self, answer_lists: Iterable[list[str]]) -> float:
        """The fraction of questions whose majority answer is in the vocabulary."""
        total = hits = 0
        for answers in answer_lists:
            total += 1
            hits += majority_answer(answers) in self._index
        if total == 0:
            raise ValueError("AnswerVocab.coverage: no questions given")
        return hits / total

    def to_json(self, path: str | Path) -> None:
        """Write ``{"answers": [...], "counts": [...]}`` to ``path``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"answers": self.answers, "counts": self.counts}, ensure_ascii=False))

    @classmethod
    def from_json(cls, path: str | Path) -> AnswerVocab:
        """Read a vocabulary written by :meth:`to_json`; a malformed file raises a ``ValueError`` naming it."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"answer vocabulary file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"answer vocabulary file {path} is not valid JSON: {e}") from e
        if not isinstance(data, dict) or "answers" not in data or "counts" not in data:
            raise ValueError(
                f'answer vocabulary file {path} must hold an object {{"answers": [...], "counts": [...]}}, '
                f"got {type(data).__name__}" + (f" with keys {sorted(data)}" if isinstance(data, dict) else "")
            )
        answers, counts = data["answers"], data["counts"]
        if not isinstance(answers, list) or not isinstance(counts, list):
            raise ValueError(f'answer vocabulary file {path}: "answers" and "counts" must both be lists')
        try:
            return cls(answers=answers, counts=counts)
        except ValueError as e:
            raise ValueError(f"answer vocabulary file {path} is malformed: {e}") from e
