"""``--recipe auto``: the recipe follows the data (image size, grid, loss, schedule), is written as a preset,
command-line options override it, and data it cannot train on is refused with a clear message."""

import json

import pytest
import yaml

from vqakit.data.config import DataConfig
from vqakit.data.scenes import SUITE, write_scenes
from vqakit.train.auto import DataProfile, auto_recipe, profile_data
from vqakit.train.plan import make_plan


def _profile(**changes):
    base = dict(num_questions=40_000, num_images=4_000, image_width=75, image_height=75, size_spread=1.0,
                num_answers=19, answer_types={"yes/no": 1}, agreement=0.86, question_words=9.0,
                question_words_max=12, top_answer_share=0.2)
    return DataProfile(**{**base, **changes})


def test_image_size_and_grid_follow_the_native_resolution():
    cases = {(64, 64): (64, 8), (75, 75): (80, 8), (128, 128): (128, 16), (320, 240): (192, 16)}
    for (w, h), (size, stride) in cases.items():
        model = auto_recipe(DataConfig(), profile=_profile(image_width=w, image_height=h)).config["model"]
        assert (model["vision"]["image_size"], model["vision"]["grid_stride"]) == (size, stride), (w, h)
    # large images: the finest grid (16x16 cells of 16 px) when the budget runs the planned steps on it, a
    # coarser one that runs all of them when it does not
    roomy = auto_recipe(DataConfig(), profile=_profile(image_width=640, image_height=480), budget_minutes=120)
    assert roomy.config["model"]["vision"]["image_size"] == 256
    tight = auto_recipe(DataConfig(), profile=_profile(image_width=640, image_height=480), budget_minutes=18)
    assert tight.config["model"]["vision"]["image_size"] < 256
    assert tight.config["train"]["max_steps"] == roomy.config["train"]["max_steps"]  # no steps traded for cells
    assert any("budget" in why for key, _, why in tight.reasons if key == "model.vision.image_size")


def test_loss_follows_answer_agreement_and_schedule_follows_size():
    assert auto_recipe(DataConfig(), profile=_profile(agreement=0.95)).config["model"]["loss"] == "ce"
    assert auto_recipe(DataConfig(), profile=_profile(agreement=0.5)).config["model"]["loss"] == "bce"
    model = auto_recipe(DataConfig(), profile=_profile()).config["model"]
    assert model["position_gate_question"] is True
    assert model["position_shared_axes"] is True and model["step_read"] is False
    assert model["find_from_words"] is True and model["content_read"] is True and model["word_dropout"] == 0.1
    assert model["num_fusion_layers"] == 0  # no self-attention over the cells before the steps
    assert auto_recipe(DataConfig(), profile=_profile(num_questions=5_000)).config["model"]["num_fusion_layers"] == 1
    assert model["relation_bias"] is True
    assert model["free_steps"] == 1 and model["reasoning_steps"] == 5  # 4 ordered steps for short questions
    long = auto_recipe(DataConfig(), profile=_profile(question_words=14)).config["model"]
    assert long["reasoning_steps"] == 6 and long["free_steps"] == 1
    # small data: a first step that finds what the whole question names; larger data: none (its cost buys steps)
    assert auto_recipe(DataConfig(), profile=_profile(num_questions=5_000)).config["model"]["question_find"] is True
    assert auto_recipe(DataConfig(), profile=_profile(num_questions=40_000)).config["model"]["question_find"] is False
    small = auto_recipe(DataConfig(), profile=_profile(num_questions=5_000)).config["train"]["max_steps"]
    large = auto_recipe(DataConfig(), profile=_profile(num_questions=200_000), budget_minutes=1000)
    n_large = int(200_000 * 0.95)
    assert small * 160 / (5_000 * 0.9) == pytest.approx(40, rel=0.02)  # small data: many passes
    assert large.config["train"]["max_steps"] * 160 / n_large == pytest.approx(3.37, rel=0.02)  # 640k samples
    capped = auto_recipe(DataConfig(), profile=_profile(num_questions=200_000), budget_minutes=5)
    assert capped.config["train"]["max_steps"] < large.config["train"]["max_steps"]
    assert any("budget" in why for _, _, why in capped.reasons)


def test_small_data_gets_a_narrower_regularised_fusion():
    small = auto_recipe(DataConfig(), profile=_profile(num_questions=5_000))
    assert small.config["model"]["hidden_size"] == 64 and small.config["model"]["dropout"] == 0.1
    assert small.config["train"]["weight_decay"] == 0.05
    assert any("memorising" in why for key, _, why in small.reasons if key == "model.hidden_size")
    # the line is on training questions, after the validation split is carved out
    edge = auto_recipe(DataConfig(), profile=_profile(num_questions=11_000)).config  # 9,900 training questions
    assert edge["model"]["hidden_size"] == 64
    large = auto_recipe(DataConfig(), profile=_profile(num_questions=12_000)).config  # 10,800
    assert (large["model"]["hidden_size"], large["model"]["dropout"], large["train"]["weight_decay"]) == (128, 0.0, 0.01)


def test_plan_follows_max_steps_whatever_the_data_size():
    plan = make_plan(40_000, 160, epochs=4, max_steps=3700)
    assert plan.steps == 3700 and plan.max_epochs == 15 and plan.rule == "max_steps"
    assert "3,700 steps = 14.80 epochs of 40,000 questions, batch 160" in plan.describe()
    assert make_plan(1000, 100, epochs=3, max_steps=-1).steps == 30
    with pytest.raises(ValueError, match="empty"):
        make_plan(0, 10, 1, -1)


def test_vocabulary_holds_every_majority_answer_despite_frequent_synonyms():
    from collections import Counter

    from vqakit.data.answers import AnswerVocab, majority_answer
    from vqakit.train.auto import _vocab_classes

    # humans say "yep" / "nope" often enough that they outrank "purple", a majority answer of fewer questions
    answers = ([["yes"] * 6 + ["yep"] * 4] * 30 + [["no"] * 6 + ["nope"] * 4] * 30 + [["purple"] * 10] * 10
               + [["red"] * 10] * 2)
    majorities = Counter(majority_answer(a) for a in answers)
    assert len(majorities) == 4 and "purple" not in AnswerVocab.build(answers, top_k=len(majorities))
    k = _vocab_classes(answers, majorities)
    vocab = AnswerVocab.build(answers, top_k=k)
    assert k == 6 and all(m in vocab for m in majorities)
    # an answer given nearly as often as the last one kept stays above the cut too
    near = answers + [["violet"]] * 19
    assert _vocab_classes(near, majorities) == 7
    # the recipe takes the measured size, and says why
    recipe = auto_recipe(DataConfig(), profile=_profile(num_answers=4, vocab_classes=6))
    assert recipe.config["data"]["top_k_answers"] == 6
    assert any("6 classes" in why for key, _, why in recipe.reasons if key == "data.top_k_answers")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    return write_scenes(root, SUITE["transfer-sort75"].scaled(num_train_images=20, num_val_images=4))


def test_profile_reads_the_data(scenes):
    p = profile_data(DataConfig(dataset="vqa-v2", root=str(scenes)))
    assert (p.image_width, p.image_height, p.num_questions, p.num_images) == (75, 75, 200, 20)
    assert 0.7 < p.agreement <= 1.0 and p.num_answers > 5 and p.vocab_classes >= p.num_answers


def test_cli_writes_the_recipe_and_options_override_it(scenes, tmp_path, capsys):
    from vqakit.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:  # --print_config prints and exits 0
        main(["train", "--recipe", "auto", "--data.dataset", "vqa-v2", "--data.root", str(scenes),
              "--train.out_dir", str(out), "--model.hidden_size", "64", "--print_config"])
    assert exit_.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model.vision.image_size" in printed and "native 75x75 px" in printed
    resolved = yaml.safe_load(printed[printed.index("model:"):])
    assert resolved["model"]["hidden_size"] == 64  # the command line wins
    assert resolved["model"]["vision"]["image_size"] == 80 and resolved["model"]["fusion"] == "relational"
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"]["vision"]["image_size"] == 80 and recipe["train"]["max_steps"] >= 200
    reasons = json.loads((out / "recipe_reasons.json").read_text())
    assert {r["key"] for r in reasons["reasons"]} >= {"model.vision.image_size", "train.max_steps", "model.loss"}


def test_prepare_writes_the_recipe_into_its_own_out_dir(scenes, tmp_path, monkeypatch):
    from vqakit.cli import main

    monkeypatch.chdir(tmp_path)  # the default run directory (runs/easy-vqa) would be under here
    out = tmp_path / "prepared"
    main(["prepare", "--recipe", "auto", "--data.dataset", "vqa-v2", "--data.root", str(scenes),
          "--data.eval_split", "val", "--out_dir", str(out)])
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"]["vision"]["image_size"] == 80
    assert not (tmp_path / "runs").exists()


def _write_vqa(root, answers, image_bytes=None):
    from PIL import Image

    from vqakit.data.formats import write_vqa_v2_json
    from vqakit.data.sources import vqa_v2_image_path, vqa_v2_paths

    qp, ap, img_dir = vqa_v2_paths(root, "train2014")
    img_dir.mkdir(parents=True)
    qs, anns = [], []
    for i, ans in enumerate(answers):
        path = vqa_v2_image_path(img_dir, "train2014", i + 1)
        if image_bytes is None:
            Image.new("RGB", (32, 32), (i * 20, 0, 0)).save(path)
        else:
            path.write_bytes(image_bytes)
        qs.append({"image_id": i + 1, "question": "what is it?", "question_id": i})
        anns.append({"question_id": i, "image_id": i + 1, "question_type": "what", "answer_type": "other",
                     "multiple_choice_answer": ans[0] if ans else "",
                     "answers": [{"answer": a, "answer_id": j + 1, "answer_confidence": "yes"}
                                 for j, a in enumerate(ans)]})
    write_vqa_v2_json(qp, ap, "train2014", qs, anns)


@pytest.mark.parametrize("case,message", [
    ("single", "every question has the same answer 'red'"),
    ("undecodable", "fail to decode|could be opened"),
    ("no_answers", "no question has an answer"),
])
def test_data_it_cannot_train_on_is_refused(tmp_path, case, message):
    if case == "single":
        _write_vqa(tmp_path, [["red"] * 10] * 4)
    elif case == "no_answers":
        _write_vqa(tmp_path, [[], []])
    else:
        _write_vqa(tmp_path, [["red"] * 10, ["blue"] * 10], image_bytes=b"not an image")
    with pytest.raises(ValueError, match=message):
        profile_data(DataConfig(dataset="vqa-v2", root=str(tmp_path), scan_images=False))


def test_image_sizes_that_vary_wildly_are_named_in_the_recipe(tmp_path):
    from PIL import Image

    from vqakit.data.sources import vqa_v2_image_path, vqa_v2_paths

    _write_vqa(tmp_path, [["red"] * 10, ["blue"] * 10, ["red"] * 10])
    _, _, img_dir = vqa_v2_paths(tmp_path, "train2014")
    Image.new("RGB", (480, 320)).save(vqa_v2_image_path(img_dir, "train2014", 3))
    recipe = auto_recipe(DataConfig(dataset="vqa-v2", root=str(tmp_path), scan_images=False))
    assert recipe.profile.size_spread == 15.0
    warning = [why for key, _, why in recipe.reasons if key == "warning"]
    assert warning and "vary 15.0x" in warning[0] and "32 px" in warning[0]
    assert "warning" in recipe.describe()
