"""The one record every data source produces.

An ``Example`` is one question about one image, with up to 10 human answers, as in VQA v2
(Goyal et al., 2017, https://arxiv.org/abs/1612.00837). Sources with a single answer per
question (easy-VQA) repeat it ten times so the official metric reads it as unanimous.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

ANSWER_TYPES = ("yes/no", "number", "other")


@dataclass
class Example:
    """One question about one image.

    Args:
        image: path of the image file (absolute, or relative to the source root); a list of paths when the
            question is about several images (only the chat-VLM family reads those, see ``require_single_image``).
        question: the question text, as asked.
        question_id: unique id of the question within its source.
        image_id: id of the image; all questions of one image share it.
        answers: the human answers (raw, un-normalised), up to 10.
        answer_type: one of ``yes/no``, ``number``, ``other``.
        question_type: the question's type, e.g. ``what color is the`` (VQA v2 gives it;
            other sources derive it from the first words of the question).
    """

    image: str | list[str]
    question: str
    question_id: int
    image_id: int
    answers: list[str] = field(default_factory=list)
    answer_type: str = "other"
    question_type: str = ""

    def __post_init__(self):
        if self.answer_type not in ANSWER_TYPES:
            raise ValueError(
                f"question {self.question_id}: answer_type={self.answer_type!r} is not one of {ANSWER_TYPES}"
            )
        if len(self.answers) > 10:
            raise ValueError(f"question {self.question_id}: {len(self.answers)} answers given, at most 10 allowed")

    def to_dict(self) -> dict:
        return asdict(self)


def require_single_image(examples, who: str) -> None:
    """``ValueError`` naming the first question with several images: ``who`` (a model family) reads one."""
    for e in examples:
        if isinstance(e.image, (list, tuple)):
            raise ValueError(f"question {e.question_id} is about {len(e.image)} images, but {who} reads one image "
                             f"per question; several images per question are for the chat-VLM family (--chat_vlm.*)")


def question_type_of(question: str, n_words: int = 3) -> str:
    """A question type for sources that have none: its first ``n_words`` lower-cased words.

    >>> question_type_of("What is the color of the shape?")
    'what is the'
    """
    return " ".join(question.lower().rstrip("?").split()[:n_words])
