"""`vqakit prepare` on VQA v2 in the official layout: validation errors that name the file, statistics,
the sampled image ids, and a feature cache that a second run finds complete."""

import json
import shutil

import pytest

from vqakit.cli import main
from vqakit.data.sources import write_vqa_v2_fixture


@pytest.fixture
def vqa_root(tmp_path):
    root = write_vqa_v2_fixture(tmp_path / "vqa", "train", num_images=8, questions_per_image=3)
    return write_vqa_v2_fixture(root, "val", num_images=3, questions_per_image=2)


def _prepare(root, tmp_path, *extra):
    return ["prepare", "--data.dataset", "vqa-v2", "--data.root", str(root), "--data.eval_split", "val",
            "--out_dir", str(tmp_path / "prep"), "--data.cache_dir", str(tmp_path / "cache"), *extra]


def test_prepare_samples_validates_and_caches(vqa_root, tmp_path, tiny_model_args, capsys):
    main(_prepare(vqa_root, tmp_path, "--data.train_image_fraction", "0.5", "--cache_features", "true",
                  *tiny_model_args))
    out = capsys.readouterr().out
    assert "train: 12 questions, 4 images" in out and "blind baselines" in out and "feature cache: 7 images" in out
    stats = json.loads((tmp_path / "prep" / "vqa-v2" / "stats.json").read_text())
    assert stats["statistics"]["train"]["questions"] == 12 and stats["feature_cache"]["images"] == 7
    sample = json.loads((tmp_path / "prep" / "vqa-v2" / "sample.json").read_text())
    assert sample["split"] == "train2014" and len(sample["image_ids"]) == 4
    from vqakit.data.sources import load_vqa_v2

    # the recorded sample reproduces exactly the prepared images
    again = load_vqa_v2(vqa_root, "train", sample_file=tmp_path / "prep" / "vqa-v2" / "sample.json")
    assert sorted(again.sampled_image_ids) == sample["image_ids"]
    shards = sorted((tmp_path / "cache" / "features").rglob("shard-*.keys.json"))
    assert len(shards) == 2  # one image shard, one question shard
    main(_prepare(vqa_root, tmp_path, "--data.train_image_fraction", "0.5", "--cache_features", "true",
                  *tiny_model_args))
    assert sorted((tmp_path / "cache" / "features").rglob("shard-*.keys.json")) == shards  # nothing re-encoded


def test_prepare_missing_files_are_named(vqa_root, tmp_path, capsys):
    (vqa_root / "v2_mscoco_val2014_annotations.json").unlink()
    with pytest.raises(SystemExit):
        main(_prepare(vqa_root, tmp_path))
    assert "v2_mscoco_val2014_annotations.json" in capsys.readouterr().err
    shutil.rmtree(vqa_root / "train2014")
    with pytest.raises(SystemExit):
        main(_prepare(vqa_root, tmp_path))
    err = capsys.readouterr().err
    assert "none of the images exist" in err and "train2014" in err and "expected 8 image files" in err
