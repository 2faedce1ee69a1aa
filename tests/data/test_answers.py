"""Answer normalisation (official VQA evaluator quirks) and the answer vocabulary."""

from __future__ import annotations

import json

import pytest

from vqakit.data.answers import (
    CONTRACTIONS,
    MANUAL_MAP,
    PUNCTUATION,
    AnswerVocab,
    majority_answer,
    normalize_answer,
    process_digit_article,
    process_punctuation,
)

# ----------------------------------------------------------------------------- process_punctuation


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes.", "Yes"),  # trailing period removed; no lower-casing at this stage
        ("3.5", "3.5"),  # a period followed by a digit stays
        (".5", ".5"),
        ("5.", "5"),
        ("e.g.", "eg"),
        ("1.a", "1a"),  # the look-behind "(?!<=\d)" is a typo upstream: a period after a digit still goes
        ("1,000", "1000"),  # digit-comma-digit: punctuation removed, not replaced by a space
        ("1,000-2", "10002"),  # ...and that holds for every mark once the original text has it
        ("hot-dog", "hot dog"),  # no space around it: replaced by a space
        ("hot - dog", "hot  dog"),  # touches a space: removed (spaces collapse later)
        ("(red)", " red "),
        ("a, b-c", "a b c"),  # ", " removes the comma, the lone hyphen becomes a space
        ("what?!", "what  "),
        ("yes!", "yes "),
        ("black/white", "black white"),
        ("black / white", "black  white"),
        ('"stop"', " stop "),
        ("it's 3:00", "it's 3:00"),  # apostrophes and colons are not in the list
        ("50%", "50%"),
        ("", ""),
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_process_punctuation_conditions_read_the_original_text():
    # "- " is in the original text, so every hyphen is removed, even "x-y" which touches no space.
    assert process_punctuation("a - x-y") == "a  xy"
    # "(" is replaced (no space next to it in the original) although the output has one by then.
    assert process_punctuation("((a") == "  a"


def test_period_strip_count_is_re_unicode():
    # Upstream passes re.UNICODE (32) as the count: only the first 32 periods go.
    assert process_punctuation("." * 40 + "x") == "." * 8 + "x"
    assert process_punctuation("." * 32) == ""


def test_punctuation_table():
    assert PUNCTUATION == tuple(";/[]\"{}()=+\\_-><@`,?!")


# ----------------------------------------------------------------------------- process_digit_article


@pytest.mark.parametrize(
    "text, expected",
    [
        ("two", "2"),
        ("Ten", "10"),
        ("none", "0"),
        ("zero", "0"),
        ("eleven", "eleven"),  # the map stops at ten
        ("a dog", "dog"),
        ("The Cat", "cat"),
        ("an apple", "apple"),
        ("one", "1"),  # numbers are mapped before articles are dropped
        ("the", ""),
        ("dont", "don't"),
        ("youre", "you're"),
        ("whats", "what's"),
        ("i dont know", "i don't know"),
        ("Im", "im"),  # the capitalised keys can never match after lower-casing
        ("somebody'd", "somebodyd"),  # upstream table maps this one backwards
        ("twas", "'twas"),
        ("  red   car ", "red car"),
        ("two\tdogs\nhere", "2 dogs here"),
    ],
)
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_tables_match_upstream_sizes():
    assert len(CONTRACTIONS) == 120
    assert len(MANUAL_MAP) == 12
    assert CONTRACTIONS["dont"] == "don't" and CONTRACTIONS["Id've"] == "I'd've"


# ----------------------------------------------------------------------------- normalize_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Yes.", "yes"),
        ("yes", "yes"),
        ("two", "2"),
        ("a dog", "dog"),
        ("dont", "don't"),
        ("3.5", "3.5"),
        ("1,000", "1000"),
        ("hot-dog", "hot dog"),
        ("hot - dog", "hot dog"),
        ("(red)", "red"),
        ("none", "0"),
        ("\tyes\n", "yes"),
        ("Two Dogs.", "2 dogs"),
        ("A\tdog", "dog"),
        ("?", ""),
        ("\n", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_majority_answer_ties_go_to_first_occurrence():
    assert majority_answer(["blue", "red", "red", "blue"]) == "blue"
    assert majority_answer(["red", "blue", "blue", "red"]) == "red"
    assert majority_answer(["Two", "2", "3", "three", "3."]) == "3"
    with pytest.raises(ValueError, match="empty"):
        majority_answer([])


# ----------------------------------------------------------------------------- AnswerVocab

ANSWER_LISTS = [["Yes", "yes", "no"], ["two", "2", "2"], ["red", "Red.", "blue"], ["?"]]


def test_build_counts_normalised_answers_and_breaks_ties_alphabetically():
    vocab = AnswerVocab.build(ANSWER_LISTS)
    assert vocab.answers == ["2", "red", "yes", "blue", "no"]  # "?" normalises to "" and is not counted
    assert vocab.counts == [3, 2, 2, 1, 1]
    assert len(vocab) == 5


def test_build_top_k_and_min_count():
    assert AnswerVocab.build(ANSWER_LISTS, top_k=3).answers == ["2", "red", "yes"]
    assert AnswerVocab.build(ANSWER_LISTS, min_count=2).answers == ["2", "red", "yes"]
    assert AnswerVocab.build(ANSWER_LISTS, top_k=1, min_count=3).answers == ["2"]
    assert AnswerVocab.build(ANSWER_LISTS, min_count=4).answers == []


def test_build_is_order_independent():
    a = AnswerVocab.build(ANSWER_LISTS)
    b = AnswerVocab.build(list(reversed(ANSWER_LISTS)))
    assert a == b


@pytest.mark.parametrize("kwargs, match", [({"top_k": 0}, "top_k=0"), ({"min_count": 0}, "min_count=0")])
def test_build_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnswerVocab.build(ANSWER_LISTS, **kwargs)


def test_build_rejects_a_string_instead_of_a_list():
    with pytest.raises(ValueError, match="'yes'"):
        AnswerVocab.build(["yes", "no"])


def test_lookups():
    vocab = AnswerVocab.build(ANSWER_LISTS)
    assert vocab.label2id == {"2": 0, "red": 1, "yes": 2, "blue": 3, "no": 4}
    assert vocab.id2label == {0: "2", 1: "red", 2: "yes", 3: "blue", 4: "no"}
    assert vocab.encode("The Two.") == 0
    assert vocab.encode("Yes!") == 2
    assert vocab.encode("green") is None
    assert "RED" in vocab and "green" not in vocab


def test_soft_scores():
    vocab = AnswerVocab(answers=["yes", "no", "2"], counts=[5, 4, 1])
    scores = vocab.soft_scores(["yes", "Yes.", "no", "no", "no", "No", "maybe", "two"])
    assert scores == {0: pytest.approx(2 / 3), 1: 1.0, 2: pytest.approx(1 / 3)}
    assert vocab.soft_scores(["maybe"]) == {}


def test_majority_and_coverage():
    vocab = AnswerVocab(answers=["yes", "2"], counts=[2, 1])
    assert vocab.majority(["no", "yes", "yes"]) == "yes"
    lists = [["yes", "yes", "no"], ["two", "3", "2"], ["red"], ["blue", "blue", "yes"]]
    assert vocab.coverage(lists) == 0.5
    with pytest.raises(ValueError, match="no questions"):
        vocab.coverage([])


@pytest.mark.parametrize(
    "answers, counts, match",
    [
        (["yes", "no"], [1], "2 answers but 1 counts"),
        (["yes", "no", "yes"], [3, 2, 1], "duplicate answer 'yes' at positions 0 and 2"),
        (["yes"], [-1], r"counts\[0\]=-1"),
        (["yes"], [1.5], r"counts\[0\]=1.5"),
        ([3], [1], r"answers\[0\]=3"),
    ],
)
def test_post_init_validation(answers, counts, match):
    with pytest.raises(ValueError, match=match):
        AnswerVocab(answers=answers, counts=counts)


def test_json_round_trip(tmp_path):
    vocab = AnswerVocab.build(ANSWER_LISTS)
    path = tmp_path / "sub" / "answers.json"
    vocab.to_json(path)
    assert json.loads(path.read_text()) == {"answers": vocab.answers, "counts": vocab.counts}
    again = AnswerVocab.from_json(path)
    assert again == vocab and again.label2id == vocab.label2id


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('["yes", "no"]', "must hold an object"),
        ('{"answers": ["yes"]}', "must hold an object"),
        ('{"answers": "yes", "counts": [1]}', "must both be lists"),
        ('{"answers": ["yes", "yes"], "counts": [1, 1]}', "duplicate answer 'yes'"),
        ('{"answers": ["yes", "no"], "counts": [1]}', "2 answers but 1 counts"),
    ],
)
def test_from_json_malformed_names_the_file(tmp_path, content, match):
    path = tmp_path / "bad_vocab.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        AnswerVocab.from_json(path)
    assert "bad_vocab.json" in str(info.value)


def test_from_json_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        AnswerVocab.from_json(tmp_path / "nope.json")
