"""Vision-prefixed causal LM with a tiny random Llama (no download): training step, KV-cache reuse, save/load, CLI."""

from __future__ import annotations

import json

import pytest
import torch

from vqakit.models.llm_prefix import Int8ShortlistHead, LLMPrefixConfig, LLMPrefixForQuestionAnswering
from vqakit.towers.vision import VisionTowerConfig

LM_WORDS = ("image question short answer what is the color of shape does contain a there not no present in which "
            "this circle rectangle triangle red green blue yellow black gray teal brown white how many yes : ? ,").split()


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory) -> str:
    """A 2-layer, 32-wide Llama with a word-level tokenizer, saved as an HF directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *dict.fromkeys(LM_WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(path)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_prefix_model(tiny_vision_tower, tiny_llm):
    def make(**overrides):
        kwargs = dict(vision=VisionTowerConfig(tiny_vision_tower, image_size=32), language_model=tiny_llm,
                      projector_hidden=32, max_new_tokens=4)
        kwargs.update(overrides)
        torch.manual_seed(0)
        return LLMPrefixForQuestionAnswering.build(LLMPrefixConfig(**kwargs))

    return make


QUESTIONS = ["what is the color of the shape?", "is there a red circle?", "how many shapes?", "which shape is this?",
             "does the image contain a triangle?"]


def test_config_validation():
    with pytest.raises(ValueError, match="must contain"):
        LLMPrefixConfig(prompt="Q: no placeholder")
    if not torch.cuda.is_available():
        from vqakit.models.llm_prefix import load_language_model

        with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
            load_language_model(LLMPrefixConfig(load_in_4bit=True, language_model="x"))


def test_training_step_and_answer_loss(tiny_prefix_model):
    model = tiny_prefix_model()
    model.lm.requires_grad_(False)
    model.vision.requires_grad_(False)
    text = model.processor.text(QUESTIONS[:3])
    pixels = torch.randn(3, 3, 32, 32)
    answers = ["red", "yes", "2"]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    first = model(pixel_values=pixels, answers=answers, **text).loss
    for _ in range(30):
        loss = model(pixel_values=pixels, answers=answers, **text).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first.item()
    for k, v in model.lm.state_dict().items():  # stage 1: the LM is unchanged
        torch.testing.assert_close(v, lm_before[k])
    assert model.projector[0].weight.grad is not None


def test_kv_cache_reuse_gives_the_same_answers(tiny_prefix_model):
    model = tiny_prefix_model().eval()
    image = (torch.rand(32, 32, 3) * 255).to(torch.uint8).numpy()
    p = model.processor
    fresh = model.answer_image(p, image, QUESTIONS, reuse_cache=False)
    batched = model.answer_image(p, image, QUESTIONS, reuse_cache=True, batch_questions=True)
    one_by_one = model.answer_image(p, image, QUESTIONS, reuse_cache=True, batch_questions=False)
    assert [a for a, _ in fresh] == [a for a, _ in batched] == [a for a, _ in one_by_one]
    for (_, x), (_, y), (_, z) in zip(fresh, batched, one_by_one):
        assert x == pytest.approx(y, rel=1e-3) and x == pytest.approx(z, rel=1e-3)
    # and the batch path of the evaluator (one image per question) agrees too
    text = p.text(QUESTIONS)
    pixels = p.images([image] * len(QUESTIONS))
    assert [a for a, _ in model.generate(pixel_values=pixels, **text)] == [a for a, _ in fresh]


def test_answer_images_shares_each_images_cache_across_its_questions(tiny_prefix_model):
    """The REST service's batch path: several images, each with its own questions, one decoding batch."""
    from vqakit.inference.generative import GenerativePredictor

    model = tiny_prefix_model().eval()
    p = model.processor
    images = [(torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(s)) * 255).to(torch.uint8).numpy()
              for s in range(2)]
    per_image = [QUESTIONS[:3], QUESTIONS[2:]]
    batched = model.answer_images(p, p.images(images), per_image)
    assert [len(a) for a in batched] == [3, 3]
    for image, questions, got in zip(images, per_image, batched):
        alone = model.answer_image(p, image, questions, reuse_cache=False)
        assert [a for a, _ in got] == [a for a, _ in alone]
        for (_, x), (_, y) in zip(got, alone):
            assert x == pytest.approx(y, rel=1e-3)
    predictor = GenerativePredictor(model, p)
    served = predictor.predict_prepared([predictor.prepare_image(im) for im in images], per_image, top_k=5)
    assert [[(x.answer, x.top_k) for x in preds] for preds in served] == \
        [[(a, [(a, s)]) for a, s in answers] for answers in batched]


def test_lora_stage2_save_load_round_trip(tiny_prefix_model, tmp_path):
    from vqakit.train.config import TrainConfig
    from vqakit.train.llm_family import apply_strategies

    model = tiny_prefix_model()
    params = apply_strategies(model, TrainConfig(text="lora", lora_text={"rank": 2, "alpha": 4}))
    assert 0 < params["trainable"] < params["total"]
    text = model.processor.text(QUESTIONS[:2])
    loss = model(pixel_values=torch.randn(2, 3, 32, 32), answers=["red", "no"], **text).loss
    loss.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():  # make the adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapters" / "lm" / "adapter_model.safetensors").is_file()
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "llm_prefix" and config["lora_targets"] == ["q_proj", "v_proj"]
    assert config["prompt"] == LLMPrefixConfig().prompt and config["max_new_tokens"] == 4
    loaded = LLMPrefixForQuestionAnswering.from_pretrained(tmp_path / "ckpt")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=pixels, answers=["red", "no"], **text).logits,
                                   model(pixel_values=pixels, answers=["red", "no"], **text).logits,
                                   atol=1e-4, rtol=1e-4)


def test_cli_two_stages_evaluate_predict(tiny_vision_tower, tiny_llm, tmp_path, capsys):
    from vqakit.cli import main
    from vqakit.data.sources import easy_vqa_data_dir

    llm = ["--llm.vision.name", tiny_vision_tower, "--llm.vision.image_size", "32", "--llm.vision.multiscale", "false",
           "--llm.language_model", tiny_llm, "--llm.projector_hidden", "32", "--llm.max_new_tokens", "3"]
    common = ["--data.limit", "30", "--data.cache_dir", str(tmp_path / "cache"), "--train.epochs", "1",
              "--train.batch_size", "16", "--train.progress", "false"]
    main(["train", *llm, *common, "--train.out_dir", str(tmp_path / "s1"), "--evaluate", "false"])
    main(["train", *llm, *common, "--train.out_dir", str(tmp_path / "s2"), "--train.text", "lora",
          "--train.lora_text.rank", "2", "--train.init_from", str(tmp_path / "s1" / "checkpoint")])
    ckpt = tmp_path / "s2" / "checkpoint"
    assert (ckpt / "adapters" / "lm" / "adapter_config.json").is_file()
    metrics = json.loads((ckpt / "eval-easy-vqa-test" / "metrics.json").read_text())
    assert metrics["decoding"]["max_new_tokens"] == 3 and "token_f1" in metrics["generative"]
    image = str(easy_vqa_data_dir() / "test" / "images" / "0.png")
    capsys.readouterr()
    main(["predict", "--checkpoint", str(ckpt), "--image", image, "--question", "what is the color of the shape?",
          "--question+", "is there a circle?"])
    assert capsys.readouterr().out.count("Q: ") == 2


def test_answer_loss_only_computes_the_answer_logits(tiny_prefix_model):
    """The training loss from the answer-span logits equals the loss over the LM's logits at every position."""
    import torch.nn.functional as F

    model = tiny_prefix_model().eval()
    text = model.processor.text(QUESTIONS[:3])
    pixels = torch.randn(3, 3, 32, 32)
    answers = ["red", "yes", "blue circle"]
    out = model(pixel_values=pixels, answers=answers, **text)
    # the same sequence, every position's logits: [prefix][visual][question][answer <eos>], labels on the answer
    prefix = model.prefix_embeds(model.visual_tokens(pixels))
    losses = []
    for i, a in enumerate(model._answer_ids(answers)):
        q = text["input_ids"][i][text["attention_mask"][i].bool()]
        ids = torch.cat([q, torch.tensor(a)])[None]
        embeds = torch.cat([prefix[i : i + 1], model._embed(ids)], dim=1)
        logits = model.lm(inputs_embeds=embeds).logits[0, -len(a) - 1 : -1]
        losses.append(F.cross_entropy(logits, torch.tensor(a), reduction="sum"))
    n = sum(len(a) for a in model._answer_ids(answers))
    torch.testing.assert_close(out.loss, torch.stack(losses).sum() / n, atol=1e-5, rtol=1e-5)
    assert out.logits.shape[1] < prefix.shape[1] + text["input_ids"].shape[1]  # not every position


def test_one_question_per_image_takes_one_pass_and_agrees(tiny_prefix_model):
    """With one question per image, prefix and question share one LM pass; the answers are those of the
    cached-prefix path."""
    model = tiny_prefix_model().eval()
    p = model.processor
    images = [(torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(s)) * 255).to(torch.uint8).numpy()
              for s in range(3)]
    one_pass = model.answer_images(p, p.images(images), [[q] for q in QUESTIONS[:3]])
    for image, q, got in zip(images, QUESTIONS[:3], one_pass):
        (cached,) = model.answer_image(p, image, [q], reuse_cache=True, batch_questions=False)
        assert got[0][0] == cached[0] and got[0][1] == pytest.approx(cached[1], rel=1e-3)


def test_int8_shortlist_head_rescores_its_top_k_in_float32():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=True)
    short = Int8ShortlistHead(head, k=8)
    x = torch.randn(3, 2, 32) * 4
    exact, approx = head(x), short(x)
    top = short.int8(x).topk(8, dim=-1).indices  # the shortlist: INT8's top 8
    assert torch.allclose(approx.gather(-1, top), exact.gather(-1, top), atol=1e-5)  # recomputed in float32
    assert torch.equal(approx.argmax(-1), exact.argmax(-1))
    others = torch.ones_like(approx, dtype=torch.bool).scatter(-1, top, False)
    assert (approx - exact)[others].abs().max() < 0.05 * exact.abs().max()  # the rest: INT8, close
    assert short.weight is head.weight  # no copy of the float32 weight (tied embeddings stay tied)


def test_int8_predictor_quantizes_the_lm_and_keeps_the_answers(tiny_prefix_model, tmp_path):
    from vqakit.inference.generative import GenerativePredictor

    model = tiny_prefix_model().eval()
    model.save_pretrained(tmp_path / "ckpt")
    image = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    fp32 = GenerativePredictor.from_pretrained(tmp_path / "ckpt", device="cpu")
    int8 = GenerativePredictor.from_pretrained(tmp_path / "ckpt", device="cpu", quantize="int8")
    float32 = {n.split(".")[-1] for n, m in int8.model.lm.named_modules() if type(m) is torch.nn.Linear}
    dynamic = {n.split(".")[-1] for n, m in int8.model.lm.named_modules()
               if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)}
    # down_proj's input carries the LM's activation outliers; the attention projections hold the merged LoRA
    assert float32 == {"down_proj", "q_proj", "k_proj", "v_proj", "o_proj"}
    assert dynamic == {"gate_proj", "up_proj", "int8"}  # int8:
    # the head's
    assert isinstance(int8.model.lm.get_output_embeddings(), Int8ShortlistHead)
    # a random LM's next-token logits are nearly tied, so INT8 error may flip an argmax: compare the logits of
    # the first answer token, and the answers wherever float32's top-2 margin is larger than the INT8 error
    pixels = fp32.processor.images([image])
    for q, x, y in zip(QUESTIONS, fp32.predict(image, QUESTIONS), int8.predict(image, QUESTIONS)):
        ids = fp32.processor.text([q])["input_ids"]
        first = []
        for m in (fp32.model, int8.model):
            embeds = torch.cat([m.prefix_embeds(m.visual_tokens(pixels)), m._embed(ids)], dim=1)
            first.append(m.lm(inputs_embeds=embeds).logits[0, -1])
        error = (first[0] - first[1]).abs().max()
        assert error < 0.05 * first[0].abs().max()
        top2 = first[0].topk(2).values
        if top2[0] - top2[1] > 2 * error:
            assert first[1].argmax() == first[0].argmax()
        if x.answer == y.answer:
            assert x.score == pytest.approx(y.score, rel=0.1)
    with pytest.raises(ValueError, match="not one of"):
        GenerativePredictor.from_pretrained(tmp_path / "ckpt", device="cpu", quantize="int4")


def test_eval_limit_fixes_the_test_subset_whatever_the_training_limit():
    """The LLM recipes train on more questions than they evaluate on; data.eval_limit keeps the test subset."""
    from vqakit.data.config import DataConfig, load_split

    small, large = DataConfig(limit=100, eval_limit=200), DataConfig(limit=300, eval_limit=200)
    assert len(load_split(small, "train")) < len(load_split(large, "train"))
    assert [e.question_id for e in load_split(small, "test")] == [e.question_id for e in load_split(large, "test")]
    assert 200 <= len(load_split(small, "test")) < len(load_split(DataConfig(limit=300), "test"))
    with pytest.raises(ValueError, match="eval_limit"):
        DataConfig(eval_limit=0)


def _lm_calls(model):
    calls = []
    handle = model.lm.register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("drafts_of", ["whole answers", "first words"])
def test_drafts_give_the_plain_greedy_answers_with_fewer_lm_passes(tiny_prefix_model, drafts_of):
    """Answer drafts (a token tree in the question's pass) change the number of LM passes, never the answers:
    whole answers in the tree need no pass after the question's; answers that only start in the tree leave it
    after their first word (each row's cache keeps its own accepted path) and decode on as usual."""
    model = tiny_prefix_model(max_draft_tokens=256).eval()
    p = model.processor
    images = [(torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(s)) * 255).to(torch.uint8).numpy()
              for s in range(3)]
    pixels = p.images(images)
    model.set_draft_answers([])
    plain_one = [model.answer_image(p, im, [q], reuse_cache=False) for im in images for q in QUESTIONS]
    plain_batch = model.answer_images(p, pixels, [QUESTIONS, QUESTIONS[:2], QUESTIONS[1:]])
    plain_rows = model.answer_images(p, pixels, [[q] for q in QUESTIONS[:3]])
    answers = sorted({a for ((a, _),) in plain_one if a})
    assert answers  # the random LM writes words (it rarely says <eos> first)
    multi = [a for a in answers if len(a.split()) > 1]
    drafts = answers if drafts_of == "whole answers" else sorted({a.split()[0] for a in multi})
    if drafts_of == "first words" and not multi:
        pytest.skip("this random LM wrote one-word answers only")
    model.set_draft_answers(["zzz unknown words", *drafts])
    assert len(model.draft_tree) > 1
    calls, handle = _lm_calls(model)
    drafted_one = [model.answer_image(p, im, [q], reuse_cache=False) for im in images for q in QUESTIONS]
    one_calls = len(calls)
    drafted_batch = model.answer_images(p, pixels, [QUESTIONS, QUESTIONS[:2], QUESTIONS[1:]])
    drafted_rows = model.answer_images(p, pixels, [[q] for q in QUESTIONS[:3]])
    handle.remove()
    for got, want in [(drafted_one, plain_one), (drafted_batch, plain_batch), (drafted_rows, plain_rows)]:
        assert [[a for a, _ in x] for x in got] == [[a for a, _ in x] for x in want]
        for x, y in zip(got, want):
            for (_, s), (_, t) in zip(x, y):
                assert s == pytest.approx(t, rel=1e-3)
    model.set_draft_answers([])
    calls, handle = _lm_calls(model)
    for im in images:
        for q in QUESTIONS:
            model.answer_image(p, im, [q], reuse_cache=False)
    handle.remove()
    assert one_calls < len(calls)  # some answers came out of the tree


def test_draft_budget_and_checkpoint_drafts(tiny_prefix_model, tmp_path):
    """The tree holds at most max_draft_tokens tokens and a pass of B questions drafts only when B x its size fits
    in that budget; a checkpoint keeps its drafts in config.json, and one saved without them takes the most
    frequent answers of its answer_vocab.json."""
    from vqakit.data.answers import AnswerVocab

    model = tiny_prefix_model(max_draft_tokens=4).eval()
    model.set_draft_answers(["red", "blue", "green circle", "yes", "no"])
    assert len(model.draft_tree) == 4  # red, blue, green, circle: capped at max_draft_tokens
    assert model.draft_tree.parents == [-1, -1, -1, 2]
    p = model.processor
    image = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    first = []
    handle = model.lm.register_forward_pre_hook(
        lambda m, args, kwargs: first.append(kwargs["inputs_embeds"].shape[1]) if "inputs_embeds" in kwargs else None,
        with_kwargs=True)
    prefix_len = model.prefix_ids.shape[1] + model.config.num_visual_tokens
    for questions, drafted in [(QUESTIONS[:1], True), (QUESTIONS[:2], False)]:
        first.clear()
        model.answer_images(p, p.images([image]), [questions])
        T = p.text(questions)["input_ids"].shape[1]
        assert first == [prefix_len + len(questions) * T + (4 if drafted else 0)]
    handle.remove()
    model.save_pretrained(tmp_path / "a")
    again = LLMPrefixForQuestionAnswering.from_pretrained(tmp_path / "a")
    assert again.config.draft_answers == ["red", "blue", "green circle", "yes", "no"]
    model.set_draft_answers([])
    model.save_pretrained(tmp_path / "b")
    AnswerVocab.build([["yes"] * 3, ["no"] * 3, ["yes"] * 3, ["red"] * 3]).to_json(tmp_path / "b" / "answer_vocab.json")
    old = LLMPrefixForQuestionAnswering.from_pretrained(tmp_path / "b")
    assert old.config.draft_answers == ["yes", "no", "red"]
    with pytest.raises(ValueError, match="max_draft_tokens"):
        LLMPrefixConfig(max_draft_tokens=-1)


def test_packed_pass_computes_each_image_prefix_once_with_its_questions(tiny_prefix_model, monkeypatch):
    """answer_images packs [prefix][question 1][question 2]... into one LM pass per image (block attention mask):
    no separate prefix pass, the same answers as each question alone; caches whose rows cannot be re-indexed
    (e.g. sliding-window layers) take the prefix pass + expanded cache instead, with the same answers."""
    import vqakit.models.llm_prefix as llm_prefix

    model = tiny_prefix_model().eval()
    model.set_draft_answers([])
    p = model.processor
    images = [(torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(s)) * 255).to(torch.uint8).numpy()
              for s in range(2)]
    per_image = [QUESTIONS, QUESTIONS[1:3]]
    alone = [model.answer_image(p, im, qs, reuse_cache=False) for im, qs in zip(images, per_image)]
    lengths = []
    handle = model.lm.register_forward_pre_hook(
        lambda m, args, kwargs: lengths.append((kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None
                                                else kwargs["input_ids"]).shape), with_kwargs=True)
    packed = model.answer_images(p, p.images(images), per_image)
    first = lengths[0]
    monkeypatch.setattr(llm_prefix, "_prunable", lambda cache: False)
    lengths.clear()
    fallback = model.answer_images(p, p.images(images), per_image)
    handle.remove()
    prefix_len = model.prefix_ids.shape[1] + model.config.num_visual_tokens
    T = p.text(QUESTIONS)["input_ids"].shape[1]
    assert first[:2] == (2, prefix_len + len(QUESTIONS) * T)  # one row per image, its questions packed
    assert lengths[0][:2] == (2, prefix_len)  # the fallback's separate prefix pass
    for got in (packed, fallback):
        assert [[a for a, _ in x] for x in got] == [[a for a, _ in x] for x in alone]
        for x, y in zip(got, alone):
            for (_, s), (_, t) in zip(x, y):
                assert s == pytest.approx(t, rel=1e-3)


@pytest.mark.parametrize("drafts", [False, True])
def test_cached_prompt_prefix_gives_the_same_answers_on_every_path(tiny_prefix_model, drafts):
    """Serving computes the prompt prefix's keys/values once (it comes before the visual tokens): every decoding
    path then starts after it and must give the answers and probabilities of the full prefill; training ignores
    the cache."""
    model = tiny_prefix_model(max_draft_tokens=256).eval()
    p = model.processor
    assert model.prefix_ids.shape[1] >= 1
    images = [(torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(s)) * 255).to(torch.uint8).numpy()
              for s in range(3)]
    pixels = p.images(images)
    model.set_draft_answers([])
    if drafts:
        first = [a for ((a, _),) in (model.answer_image(p, im, [q], reuse_cache=False) for im in images
                                      for q in QUESTIONS) if a]
        model.set_draft_answers(sorted(set(first)))

    def every_path():
        return [
            [model.answer_image(p, im, [q], reuse_cache=False) for im in images for q in QUESTIONS],
            model.answer_image(p, images[0], QUESTIONS, reuse_cache=True, batch_questions=False),
            model.answer_images(p, pixels, [QUESTIONS, QUESTIONS[:2], QUESTIONS[1:]]),
            model.answer_images(p, pixels, [[q] for q in QUESTIONS[:3]]),
        ]

    want = every_path()
    model.cache_prompt_prefix()
    assert model._text_cache is not None
    calls = []
    handle = model.lm.register_forward_pre_hook(lambda m, args, kwargs: calls.append(
        (kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[1]),
        with_kwargs=True)
    got = every_path()
    handle.remove()
    flat = lambda runs: [x for run in runs for item in run for x in (item if isinstance(item, list) else [item])]
    assert [a for a, _ in flat(got)] == [a for a, _ in flat(want)]
    for (_, s), (_, t) in zip(flat(got), flat(want)):
        assert s == pytest.approx(t, rel=1e-4)
    model.train()
    assert model._text_prefix_cache(1, pixels)[0] is None  # training: the full prefix every time
    model.eval()
    model._text_cache = None
    calls_full = []
    handle = model.lm.register_forward_pre_hook(lambda m, args, kwargs: calls_full.append(
        (kwargs.get("inputs_embeds") if kwargs.get("inputs_embeds") is not None else kwargs["input_ids"]).shape[1]),
        with_kwargs=True)
    every_path()
    handle.remove()
    assert sum(calls) < sum(calls_full)  # the prompt prefix's positions are no longer fed to the LM


def test_smoothing_down_proj_keeps_the_float_model_and_can_be_left_out(tiny_prefix_model):
    """SmoothQuant's scales are folded into up_proj and down_proj: the float LM computes the same logits, and an
    outlier channel of down_proj's input (made here: one up_proj row x100) shrinks towards the others;
    quantize_int8 can keep down_proj in float32 instead."""
    model = tiny_prefix_model().eval()
    mlp = model.lm.model.layers[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[3] *= 100
    image = (torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8).numpy()
    p = model.processor
    embeds = torch.cat([model.prefix_embeds(model.visual_tokens(p.images([image]))),
                        model._embed(p.text([QUESTIONS[0]])["input_ids"])], dim=1)
    inputs = []
    handle = mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0].abs().amax((0, 1))))
    with torch.no_grad():
        before = model.lm(inputs_embeds=embeds).logits
        smoothed = model.smooth_down_proj(0.5)
        after = model.lm(inputs_embeds=embeds).logits
    handle.remove()
    assert len(smoothed) == 2 and all(n.endswith("down_proj") for n in smoothed)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    outlier = [x[3] / x.median() for x in (inputs[0], inputs[-1])]  # channel 3 against the typical one
    # (between them: the calibration passes)
    assert outlier[0] > 30 and outlier[1] < outlier[0] / 3
    kept = tiny_prefix_model().eval()
    kept.quantize_int8(skip=("down_proj",), smooth=None)
    assert {n.split(".")[-1] for n, m in kept.lm.named_modules() if type(m) is torch.nn.Linear} == {"down_proj"}
    every = tiny_prefix_model().eval()
    every.quantize_int8(skip=(), smooth=0.5)  # down_proj in INT8 too, smoothed first
    assert not {n for n, m in every.lm.named_modules() if type(m) is torch.nn.Linear}
