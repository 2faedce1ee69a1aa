"""`vqakit prepare` on VQA v2 in the official layout: validation errors that name the file, statistics,
the sampled image ids, and a feature cache that a second run finds complete."""

import json
import shutil

import pytest

from vqakit.cli import main
from fixtures.vqa_v2 import write_vqa_v2_fixture


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


def test_prepare_cache_checks_images_in_one_pass(vqa_root, tmp_path, tiny_model_args, capsys, monkeypatch):
    import vqakit.data.images as images

    def no_second_pass(*args, **kwargs):
        raise AssertionError("scan_images must not run when prepare caches the image features")

    monkeypatch.setattr(images, "scan_images", no_second_pass)
    train = sorted((vqa_root / "train2014").glob("*.jpg"))
    broken, missing = train[0], train[1]
    broken.write_bytes(b"<html>404 not found</html>")
    missing.unlink()
    broken_id, missing_id = (int(p.stem.rsplit("_", 1)[1]) for p in (broken, missing))
    main(_prepare(vqa_root, tmp_path, "--cache_features", "true", *tiny_model_args))
    out = capsys.readouterr().out
    assert f"skipped image {broken_id}" in out and "not a recognised image format" in out
    assert f"skipped image {missing_id}" in out and "file not found" in out
    assert "train: 18 questions, 6 images; 8 images checked: 6 ok, 2 bad" in out
    stats = json.loads((tmp_path / "prep" / "vqa-v2" / "stats.json").read_text())
    bad = {b["image_id"]: b["reason"] for b in stats["splits"]["train"]["bad"]}
    assert set(bad) == {broken_id, missing_id} and stats["feature_cache"]["images"] == 9  # 6 train + 3 val
    prepared = [json.loads(line) for line in (tmp_path / "prep" / "vqa-v2" / "train.jsonl").read_text().splitlines()]
    assert len(prepared) == 18 and not {e["image_id"] for e in prepared} & {broken_id, missing_id}
    from vqakit.data.cache import FeatureCache

    image_ns = [d for d in (tmp_path / "cache" / "features").iterdir() if d.name.startswith("vision-")]
    assert len(image_ns) == 1 and len(FeatureCache(image_ns[0].parent, image_ns[0].name)) == 9  # no row for them
    main(_prepare(vqa_root, tmp_path, "--cache_features", "true", *tiny_model_args))  # resumed: reported again
    assert f"skipped image {broken_id}" in capsys.readouterr().out
