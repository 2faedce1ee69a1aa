"""Chat VLMs (Idefics3/SmolVLM, Qwen2-VL, PaliGemma, LLaVA) with tiny random configs built offline: a word-level
tokenizer with each architecture's special tokens and a chat template in its style, saved and loaded by path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vqakit.data.answers import normalize_answer
from vqakit.models.chat_vlm import ChatVLMConfig, ChatVLMForQuestionAnswering

ARCHS = ["idefics3", "qwen2_vl", "paligemma", "llava"]
WORDS = ("what color is the shape red blue green circle square triangle yes no there a how many one two USER "
         "ASSISTANT user assistant system you are helpful answer en").split()
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=37)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32,
              patch_size=8)
# chat templates in the style of each family's real one (SmolVLM, Qwen2-VL, llava-hf 1.5); PaliGemma has none
TEMPLATES = {
    "idefics3": "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
                "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}",
    "qwen2_vl": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                "{% endif %}",
    "llava": "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
             "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% if m['role'] == 'assistant' %}</s>{% endif %}"
             " {% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}",
}
SPECIALS = {
    "idefics3": ["<image>", "<fake_token_around_image>", "<end_of_utterance>", "<global-img>", "<|im_start|>"]
                + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)],
    "qwen2_vl": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
    "paligemma": ["<image>"],
    "llava": ["<image>"],
}


def _tokenizer(arch):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = SPECIALS[arch]
    tokens = ["<pad>", "<unk>", "<s>", "</s>", *specials, *WORDS, *"?.,:!"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(tokens)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def build_tiny(arch: str, path) -> str:
    """A tiny random ``arch`` model + processor saved to ``path``."""
    import transformers as tf

    tok = _tokenizer(arch)
    ids = tok.convert_tokens_to_ids
    text = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, **TEXT)
    template = TEMPLATES.get(arch)
    torch.manual_seed(0)
    if arch == "idefics3":
        ip = tf.Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 32},
                                          max_image_size={"longest_edge": 32})
        proc = tf.Idefics3Processor(ip, tok, image_seq_len=4, chat_template=template)
        config = tf.Idefics3Config(vision_config=VISION, text_config=dict(model_type="llama", **text), scale_factor=2,
                                   image_token_id=ids("<image>"), pad_token_id=tok.pad_token_id)
        model = tf.Idefics3ForConditionalGeneration(config)
    elif arch == "qwen2_vl":
        from vqakit.models.chat_vlm import _qwen2_vl_image_processor_class

        ip = tf.Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}, patch_size=8,
                                         temporal_patch_size=2, merge_size=2)
        proc = _qwen2_vl_image_processor_class()(image_processor=ip, tokenizer=tok, chat_template=template)
        config = tf.Qwen2VLConfig(
            vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=8,
                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
            text_config=dict(rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2]}, **text),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"))
        model = tf.Qwen2VLForConditionalGeneration(config)
    elif arch == "paligemma":
        ip = tf.SiglipImageProcessorPil(size={"height": 32, "width": 32})
        ip.image_seq_length = 16
        proc = tf.PaliGemmaProcessor(image_processor=ip, tokenizer=tok)
        config = tf.PaliGemmaConfig(vision_config={**VISION, "projection_dim": 32},
                                    text_config=dict(model_type="gemma", head_dim=8, **{**text, "num_key_value_heads": 1}),
                                    image_token_id=ids("<image>"), projection_dim=32)
        model = tf.PaliGemmaForConditionalGeneration(config)
    else:
        ip = tf.LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        proc = tf.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy="default",
                                 num_additional_image_tokens=1, chat_template=template)
        config = tf.LlavaConfig(vision_config=dict(model_type="clip_vision_model", projection_dim=32, **VISION),
                                text_config=dict(model_type="llama", **text), image_token_id=ids("<image>"),
                                vision_feature_layer=-1, vision_feature_select_strategy="default")
        model = tf.LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    proc.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = build_tiny(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return cache[arch]

    return get


def _image(seed, size=(40, 50)):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))


def _train(lora_text=None, **kw):
    from vqakit.train.config import TrainConfig

    return TrainConfig(lora_text=lora_text or {"rank": 4, "alpha": 8, "dropout": 0.0}, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_labels_cover_only_the_answer(arch, tiny):
    net = ChatVLMForQuestionAnswering.build(ChatVLMConfig(model=tiny(arch), system_prompt="you are helpful"
                                                          if arch != "paligemma" else ""))
    p = net.processor
    images = [[_image(0)], [_image(1)]]
    enc = p.batch(images, ["what color is the shape?", "how many?"], ["red", "two circle"])
    tok = p.tokenizer
    labels, ids, mask = enc["labels"], enc["input_ids"], enc["attention_mask"]
    image_ids = {tok.convert_tokens_to_ids(t) for t in SPECIALS[arch] if "im_" not in t and "end_of" not in t}
    for i, answer in enumerate(["red", "two circle"]):
        labelled = labels[i] != -100
        assert not labelled[mask[i] == 0].any()  # padding
        assert not any(int(t) in image_ids for t in ids[i][labelled])  # image tokens
        answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
        got = labels[i][labelled].tolist()
        assert got[: len(answer_ids)] == answer_ids and len(got) == len(answer_ids) + 1  # + end of turn / eos
        first = int(labelled.nonzero()[0])
        assert tok.decode(ids[i][:first]).count("what") + tok.decode(ids[i][:first]).count("how") == 1  # the prompt
        assert int(mask[i].sum()) == first + len(got) or arch == "llava"  # the template's trailing " " for LLaVA


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_step_base_unchanged_and_batched_generation(arch, tiny):
    from vqakit.train.chat_vlm_family import apply_strategies

    net = ChatVLMForQuestionAnswering.build(ChatVLMConfig(model=tiny(arch), max_new_tokens=3))
    params = apply_strategies(net, _train(text="lora"))
    assert 0 < params["trainable"] < params["total"]
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in names) and not any("lora_" in n and ("vision" in n or "visual.blocks" in n)
                                                         for n in names)
    base = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    enc = net.processor.batch([[_image(0)], [_image(1)]], ["what color?", "what shape?"], ["red", "circle"])
    out = net(**enc)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert all(p.grad is not None for n, p in net.named_parameters() if "lora_" in n and "lora_B" in n)
    torch.optim.SGD(trainable, lr=0.1).step()
    for n, p in net.named_parameters():
        if n in base:
            torch.testing.assert_close(p, base[n])
    net.eval()
    images = [[_image(2)], [_image(3, (20, 70))], [_image(4)]]
    questions = ["what color?", "is there a red circle?", "how many?"]
    batched = net.generate(images, questions)
    alone = [net.generate([im], [q])[0] for im, q in zip(images, questions)]
    assert [a for a, _ in batched] == [a for a, _ in alone]
    assert [s for _, s in batched] == pytest.approx([s for _, s in alone], abs=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_overfit_memorises_answers(arch, tiny):
    from vqakit.train.chat_vlm_family import apply_strategies

    torch.manual_seed(0)
    net = ChatVLMForQuestionAnswering.build(ChatVLMConfig(model=tiny(arch), max_new_tokens=3))
    apply_strategies(net, _train(text="full"))
    answers = ["red", "blue", "green", "yes", "no", "circle", "square", "two"]
    images = [[_image(10 + i)] for i in range(8)]
    questions = [f"what {w}?" for w in ["color", "shape", "is", "there", "a", "how", "many", "one"]]
    enc = net.processor.batch(images, questions, answers)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2 if arch == "paligemma" else 3e-3)
    net.train()
    for _ in range(40):  # 20 steps memorise 7-8 of 8 (measured)
        opt.zero_grad()
        loss = net(**enc).loss
        loss.backward()
        opt.step()
    net.eval()
    assert net(**enc).answer_exact.all()
    assert [a for a, _ in net.generate(images, questions)] == [normalize_answer(a) for a in answers]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_save_load_adapter_and_merged(arch, tiny, tmp_path):
    from vqakit.train.chat_vlm_family import apply_strategies

    torch.manual_seed(0)
    net = ChatVLMForQuestionAnswering.build(ChatVLMConfig(model=tiny(arch), max_new_tokens=3))
    apply_strategies(net, _train(text="lora"))
    enc = net.processor.batch([[_image(0)], [_image(1)]], ["what color?", "what shape?"], ["red", "circle"])
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # LoRA B away from zero, the projector changed
        opt.zero_grad()
        net(**enc).loss.backward()
        opt.step()
    net.eval()
    logits = net(**enc).logits
    net.save_pretrained(tmp_path / "ckpt", merge=True)
    ckpt = tmp_path / "ckpt"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {f.name for f in (ckpt / "adapter").iterdir()}
    assert (ckpt / "model" / "config.json").is_file() and (ckpt / "processor").is_dir()
    saved = json.loads((ckpt / "config.json").read_text())
    assert saved["model_type"] == "chat_vlm" and saved["model"] == tiny(arch) and saved["max_new_tokens"] == 3
    for prefer in ("adapter", "model"):
        loaded = ChatVLMForQuestionAnswering.from_pretrained(ckpt, prefer=prefer)
        torch.testing.assert_close(loaded(**enc).logits, logits, atol=1e-4, rtol=1e-4)


def test_predictor_from_pretrained_matches_generate(tiny, tmp_path):
    from vqakit.inference.generative import ChatVLMPredictor
    from vqakit.inference.predict import VQAPredictor
    from vqakit.train.chat_vlm_family import apply_strategies

    net = ChatVLMForQuestionAnswering.build(ChatVLMConfig(model=tiny("idefics3"), max_new_tokens=3))
    apply_strategies(net, _train(text="lora"))
    net.save_pretrained(tmp_path / "ckpt")
    predictor = VQAPredictor.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert isinstance(predictor, ChatVLMPredictor)
    assert predictor.decoding["max_new_tokens"] == 3 and predictor.decoding["architecture"] == "idefics3"
    image = _image(5)
    questions = ["what color?", "what shape?"]
    expected = predictor.model.generate([[image], [image]], questions)
    got = predictor.predict(image, questions)
    assert [p.answer for p in got] == [a for a, _ in expected]
    assert [p.score for p in got] == pytest.approx([s for _, s in expected], abs=1e-5)
    prepared = predictor.predict_prepared([predictor.prepare_image(image)], [questions])[0]
    assert [p.answer for p in prepared] == [a for a, _ in expected]


def test_multi_image_and_errors(tiny, tmp_path):
    net = ChatVLMForQuestionAnswering.build(ChatVLMConfig(model=tiny("qwen2_vl"), max_new_tokens=2))
    enc = net.processor.batch([[_image(0), _image(1)]], ["what color?"], ["red"])
    assert int((enc["input_ids"] == net.processor.hf.image_token_id).sum()) > 2  # both images' tokens
    assert len(net.generate([[_image(0), _image(1)]], ["what color?"])) == 1
    llava = ChatVLMForQuestionAnswering.build(ChatVLMConfig(model=tiny("llava")))
    with pytest.raises(ValueError, match="takes one image per question"):
        llava.processor.batch([[_image(0), _image(1)]], ["what color?"])
    with pytest.raises(ValueError, match="--chat_vlm.too_long='cut'"):
        ChatVLMConfig(too_long="cut")
    with pytest.raises(ValueError, match="not a loadable"):
        ChatVLMForQuestionAnswering.build(ChatVLMConfig(model=str(tmp_path / "nothing")))
    with pytest.raises(RuntimeError, match="needs a CUDA GPU") if not torch.cuda.is_available() else _nothing():
        ChatVLMForQuestionAnswering.build(ChatVLMConfig(model=tiny("llava"), load_in_4bit=True))


def test_too_long_samples_error_or_skip(tiny):
    from vqakit.train.chat_vlm_family import ChatVLMCollator

    net = ChatVLMForQuestionAnswering.build(ChatVLMConfig(model=tiny("idefics3"), max_length=20))
    items = [{"index": 0, "images": [_image(0)], "question": "what color?", "answer": "red", "question_id": 7},
             {"index": 1, "images": [_image(1)], "question": "what " * 20 + "?", "answer": "red", "question_id": 8}]
    with pytest.raises(ValueError, match="question 8 .* longer than --chat_vlm.max_length=20"):
        ChatVLMCollator(net.processor)(items)
    net.config.too_long = "skip"
    collate = ChatVLMCollator(net.processor)
    batch = collate(items)
    assert batch["index"].tolist() == [0] and collate.skipped == [8]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_cli_train_evaluate_predict_and_serve(tiny, tmp_path, capsys):
    """``vqakit train --chat_vlm.model`` on 16 easy-VQA questions, then evaluate, predict and the REST service."""
    import base64
    import io

    from vqakit.cli import main
    from vqakit.data.sources import easy_vqa_data_dir
    from vqakit.inference.predict import VQAPredictor

    main(["train", "--chat_vlm.model", tiny("idefics3"), "--chat_vlm.max_new_tokens", "3", "--train.text", "lora",
          "--train.lora_text.rank", "2", "--data.limit", "16", "--data.cache_dir", str(tmp_path / "cache"),
          "--train.out_dir", str(tmp_path / "run"), "--train.max_steps", "2", "--train.batch_size", "4",
          "--train.eval_batch_size", "8", "--train.progress", "false"])
    ckpt = tmp_path / "run" / "checkpoint"
    assert (ckpt / "adapter" / "adapter_model.safetensors").is_file() and not (ckpt / "model").exists()
    metrics = json.loads(next(ckpt.glob("eval-*/metrics.json")).read_text())
    assert metrics["decoding"]["architecture"] == "idefics3" and metrics["decoding"]["max_new_tokens"] == 3
    image = str(easy_vqa_data_dir() / "test" / "images" / "0.png")
    capsys.readouterr()
    main(["predict", "--checkpoint", str(ckpt), "--image", image, "--question", "what is the color of the shape?"])
    assert capsys.readouterr().out.count("Q: ") == 1

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from vqakit.serve.app import create_app, load_service
    from vqakit.serve.config import ServeConfig

    questions = ["what is the color of the shape?", "is there a circle?"]
    reference = VQAPredictor.from_pretrained(ckpt, device="cpu").predict(image, questions)
    png = io.BytesIO()
    Image.open(image).save(png, "PNG")
    with TestClient(create_app(load_service(str(ckpt), ServeConfig(max_wait_ms=5))),
                    raise_server_exceptions=False) as client:
        r = client.post("/predict", json={"questions": questions,
                                          "image_base64": base64.b64encode(png.getvalue()).decode()})
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        assert [g["answer"] for g in got] == [p.answer for p in reference]
        assert [g["score"] for g in got] == pytest.approx([p.score for p in reference], abs=1e-4)
        r = client.post("/predict", json={"question": "what?", "image_base64": base64.b64encode(png.getvalue()).decode(),
                                          "heatmap": True})
        assert 400 <= r.status_code < 500


def test_several_images_per_question_in_jsonl_and_image_json(tiny, tmp_path):
    from vqakit.data.example import require_single_image
    from vqakit.data.formats import load_image_json, load_jsonl
    from vqakit.train.chat_vlm_family import ChatVLMCollator, dataset

    (tmp_path / "images").mkdir()
    for i in range(3):
        _image(i).save(tmp_path / "images" / f"{i}.png")
    records = [{"image": ["images/0.png", "images/1.png"], "question": "what color?", "answer": "red"},
               {"image": "images/2.png", "question": "what shape?", "answer": "circle"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = load_jsonl("train", tmp_path)
    assert examples[0].image == [str(tmp_path / "images" / "0.png"), str(tmp_path / "images" / "1.png")]
    assert examples[1].image == str(tmp_path / "images" / "2.png")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "a.json").write_text(json.dumps({"path": ["images/0.png", "images/2.png"],
                                                         "questions": [{"question": "same?", "answer": "no"}]}))
    assert len(load_image_json("val", tmp_path)[0].image) == 2
    with pytest.raises(ValueError, match="field 'image' is a list but not of non-empty paths"):
        (tmp_path / "bad.jsonl").write_text(json.dumps({"image": [], "question": "q?", "answer": "a"}) + "\n")
        load_jsonl("bad", tmp_path)
    with pytest.raises(ValueError, match="question 0 is about 2 images, but the two-tower classifier reads one"):
        require_single_image(examples, "the two-tower classifier")

    qwen = ChatVLMForQuestionAnswering.build(ChatVLMConfig(model=tiny("qwen2_vl")))
    batch = ChatVLMCollator(qwen.processor)([dataset(examples, None, qwen, qwen.processor, None, None)[i]
                                             for i in range(2)])
    assert batch["chat_inputs"]["image_grid_thw"].shape[0] == 3  # 2 + 1 images
    llava = ChatVLMForQuestionAnswering.build(ChatVLMConfig(model=tiny("llava")))
    with pytest.raises(ValueError, match="question 0 is about 2 images, but llava takes one image per question"):
        dataset(examples, None, llava, llava.processor, None, None)
