"""End-to-end smoke runs of the CLI on a few dozen examples with tiny towers: train, evaluate, predict."""

from __future__ import annotations

import json

import pytest
import torch

from vqakit.cli import main
from fixtures.vqa_v2 import write_vqa_v2_fixture
from vqakit.data.sources import easy_vqa_data_dir


def _tiny_args(model_args, tmp_path, *extra):
    return [
        *model_args, "--data.cache_dir", str(tmp_path / "cache"), "--train.out_dir", str(tmp_path / "run"),
        "--train.epochs", "1", "--train.batch_size", "16", "--train.progress", "false", *extra,
    ]  # fmt: skip


def test_train_evaluate_predict_on_easy_vqa(tiny_model_args, tmp_path, capsys):
    main(["train", *_tiny_args(tiny_model_args, tmp_path, "--data.limit", "40")])
    out = capsys.readouterr().out
    assert "time to train:" in out and "VQA accuracy (official)" in out

    run = tmp_path / "run"
    ckpt = run / "checkpoint"
    assert {p.name for p in ckpt.iterdir()} == {
        "config.json", "model.safetensors", "answer_vocab.json", "training_metadata.json", "text_tower",
        "vision_tower", "eval-easy-vqa-test", "README.md", "onnx",
    }  # fmt: skip
    from vqakit.inference.export import export_is_current

    assert export_is_current(ckpt)  # exported at the end of training: predict / serve start on ONNX Runtime
    from vqakit.inference.export import int8_verdict

    check = json.loads((ckpt / "training_metadata.json").read_text())["int8_check"]  # on the validation questions
    assert check["questions"] >= 1 and check == {k: int8_verdict(ckpt)[k] for k in check}
    assert (ckpt / "text_tower" / "tokenizer.json").is_file()
    assert (run / "config.yaml").is_file() and (run / "logs" / "metrics.csv").is_file()
    meta = json.loads((ckpt / "training_metadata.json").read_text())
    assert meta["steps"] >= 2 and meta["time_to_train_s"] > 0 and len(meta["data_fingerprint"]) == 16
    assert meta["strategies"] == {"vision": "frozen", "text": "frozen"}
    metrics = json.loads((ckpt / "eval-easy-vqa-test" / "metrics.json").read_text())
    assert metrics["num_questions"] >= 40 and 0 <= metrics["vqa_accuracy"] <= 100
    assert set(metrics["per_answer_type"]) <= {"yes/no", "other"}
    header = (ckpt / "eval-easy-vqa-test" / "predictions.csv").read_text().splitlines()[0]
    assert header.startswith("question_id,")
    results = json.loads((ckpt / "eval-easy-vqa-test" / "results.json").read_text())
    assert len(results) == metrics["num_questions"] and set(results[0]) == {"question_id", "answer"}
    card = (ckpt / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: vqakit\n") and meta["command"].startswith("vqakit train ")
    assert meta["command"] in card and f"| easy-vqa | test | {metrics['num_questions']} |" in card

    # evaluate again from the checkpoint alone (feature cache reused) into another folder
    main(["evaluate", "--checkpoint", str(ckpt), "--data.limit", "40", "--data.cache_dir", str(tmp_path / "cache"),
          "--out_dir", str(tmp_path / "eval")])
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["vqa_accuracy"] == metrics["vqa_accuracy"]

    image = str(easy_vqa_data_dir() / "test" / "images" / "0.png")
    main(["predict", "--checkpoint", str(ckpt), "--image", image, "--question", "what is the color of the shape?",
          "--question+", "is there a circle?", "--top_k", "3"])
    out = capsys.readouterr().out
    assert out.count("Q: ") == 2 and "  3. " in out


def test_lora_training_writes_adapters_and_a_merged_checkpoint(tiny_model_args, tmp_path):
    main(["train", *_tiny_args(tiny_model_args, tmp_path, "--data.limit", "24",
                              "--train.vision", "lora", "--train.text", "full", "--train.lora_vision.rank", "2",
                              "--evaluate", "false")])
    ckpt = tmp_path / "run" / "checkpoint"
    assert {p.name for p in (ckpt / "adapters" / "vision").iterdir()} >= {
        "adapter_config.json", "adapter_model.safetensors"}
    meta = json.loads((ckpt / "training_metadata.json").read_text())
    assert meta["lora_merged_towers"] == ["vision"]
    assert meta["parameters"]["trainable"] < meta["parameters"]["total"]


def test_corrupt_images_are_skipped_and_reported(tiny_model_args, tmp_path):
    root = tmp_path / "vqa"
    write_vqa_v2_fixture(root, split="train", num_images=6, questions_per_image=3)
    write_vqa_v2_fixture(root, split="val", num_images=3, questions_per_image=3, seed=1)
    broken = sorted((root / "train2014").glob("*.jpg"))[0]
    broken.write_bytes(broken.read_bytes()[:100])  # truncated download
    main(["train", *_tiny_args(tiny_model_args, tmp_path, "--data.dataset", "vqa-v2",
                              "--data.root", str(root), "--data.eval_split", "val", "--data.val_fraction", "0")])
    meta = json.loads((tmp_path / "run" / "checkpoint" / "training_metadata.json").read_text())
    assert meta["skipped_images"] == [int(broken.stem.split("_")[-1])]
    assert meta["num_train_questions"] == 15


def test_bad_flags_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--model.fusion", "bilinear", "--train.out_dir", str(tmp_path)])
    err = capsys.readouterr().err  # a Literal-typed field: the parser names the flag, the choices and the value
    assert '"model.fusion"' in err and "'cross-attention', 'spatial'" in err and "Got value: bilinear" in err


def test_prepare_writes_splits_vocab_and_stats(tmp_path, capsys):
    root = tmp_path / "vqa"
    write_vqa_v2_fixture(root, split="train", num_images=8, questions_per_image=3)
    write_vqa_v2_fixture(root, split="val", num_images=4, questions_per_image=2, seed=1)
    main(["prepare", "--data.dataset", "vqa-v2", "--data.root", str(root), "--data.eval_split", "val",
          "--data.train_image_fraction", "0.5", "--out_dir", str(tmp_path / "prepared")])
    out = tmp_path / "prepared" / "vqa-v2"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["splits"]["train"] == {"questions": 12, "images": 4, "bad_images": 0,
                                        "answer_types": stats["splits"]["train"]["answer_types"]}
    assert stats["splits"]["val"]["questions"] == 8
    assert len((out / "train.jsonl").read_text().splitlines()) == 12
    assert (out / "answer_vocab.json").is_file()
    assert "answer vocabulary:" in capsys.readouterr().out


def test_missing_dataset_files_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["prepare", "--data.dataset", "vqa-v2", "--data.root", str(tmp_path), "--out_dir", str(tmp_path)])
    assert "v2_OpenEnded_mscoco_train2014_questions.json" in capsys.readouterr().err


def test_same_seed_gives_identical_weights(tiny_model_args, tmp_path):
    from safetensors.torch import load_file

    weights = []
    for run in ("a", "b"):
        args = _tiny_args(tiny_model_args, tmp_path / run, "--data.limit", "24",
                          "--train.text", "full", "--evaluate", "false")
        main(["train", *args])
        weights.append(load_file(str(tmp_path / run / "run" / "checkpoint" / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_recipes_and_flags_of_the_flat_layout_are_read_in_the_nested_names(tmp_path, capsys):
    """A run's config.yaml / recipe.yaml written before the tower options were nested (``model.vision_grid_stride``)
    and the flat flags resolve to the same configuration as today's names, saying so on stderr."""
    import yaml

    old = tmp_path / "config.yaml"
    old.write_text(yaml.safe_dump({"model": {"vision_tower": "efficientnet-lite0", "image_size": 128,
                                             "vision_grid_stride": 16, "vision_truncate": True,
                                             "max_question_length": 24, "text_pooler": "cls", "fusion": "gated"},
                                   "gru": None}))

    def printed(*args):
        with pytest.raises(SystemExit) as done:
            main(["train", *args, "--print_config"])
        assert done.value.code in (0, None)
        captured = capsys.readouterr()
        return yaml.safe_load(captured.out)["model"], captured.err

    model, err = printed("--config", str(old), "--model.vision_color_stats", "true")
    assert "model.vision_grid_stride -> model.vision.grid_stride" in err
    assert "--model.vision_color_stats is now --model.vision.color_stats" in err
    assert model["vision"] == {"name": "efficientnet-lite0", "image_size": 128, "multiscale": False, "grid_stride": 16,
                               "truncate": True, "color_stats": True, "feature_norm": False}
    assert model["text"] == {"name": "minilm-l6", "max_length": 24, "pooler": "cls"} and model["fusion"] == "gated"
    nested, err = printed("--model.vision.image_size", "128", "--model.vision.grid_stride", "16",
                          "--model.vision.truncate", "true", "--model.vision.color_stats=true",
                          "--model.text.max_length", "24", "--model.text.pooler", "cls", "--model.fusion", "gated")
    assert nested == model and not err


def test_help_shows_the_nested_tower_flags_with_their_choices(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--model.vision.grid_stride {8,16,32}" in out and "--model.text.pooler {mean,cls}" in out
