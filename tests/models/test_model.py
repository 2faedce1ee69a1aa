"""Invariants of the two-tower model, for every fusion, on tiny random-config towers."""

from __future__ import annotations

import collections
import copy
import json

import pytest
import torch

from vqakit.models.two_tower import FUSIONS, TwoTowerConfig, TwoTowerForQuestionAnswering, vqa_loss
from vqakit.towers.processor import VQAProcessor
from vqakit.towers.text import load_tokenizer
from vqakit.towers.vision import build_vision_tower


@pytest.fixture
def tokenizer(tiny_text_tower):
    return load_tokenizer(tiny_text_tower)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_output_shape_and_finite(fusion, tiny_config, tiny_batch, tokenizer):
    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(fusion=fusion)).eval()
    out = model(**tiny_batch(tokenizer))
    assert out.logits.shape == (3, 5)
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_trainable_parameter_gets_a_gradient(fusion, tiny_config, tiny_batch, tokenizer):
    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(fusion=fusion, dropout=0.0))
    model.backbone.vision.requires_grad_(False)  # frozen tower
    model.train()
    batch = tiny_batch(tokenizer)
    out = model(**batch)
    targets = torch.rand_like(out.logits)
    vqa_loss(out.logits, targets, torch.tensor([0, 1, 2]), "bce").backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone.vision."):
            assert p.grad is None, name
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"no gradient for {name}"


def test_gradient_checkpointing_keeps_outputs_and_gradients(tiny_config, tiny_batch, tokenizer):
    torch.manual_seed(0)
    plain = TwoTowerForQuestionAnswering(tiny_config(dropout=0.0)).train()
    ckpt = TwoTowerForQuestionAnswering(tiny_config(dropout=0.0, gradient_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    for m in (plain, ckpt):  # the towers' own dropout would differ between the two runs
        m.backbone.vision.eval()
        m.backbone.text.eval()
    batch = tiny_batch(tokenizer)
    a, b = plain(**batch).logits, ckpt(**batch).logits
    torch.testing.assert_close(a, b)
    a.sum().backward()
    b.sum().backward()
    ga = dict(plain.named_parameters())["backbone.fusion.layers.0.q_from_v.in_proj_weight"].grad
    gb = dict(ckpt.named_parameters())["backbone.fusion.layers.0.q_from_v.in_proj_weight"].grad
    torch.testing.assert_close(ga, gb)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_save_load_round_trip_gives_identical_logits(fusion, tiny_config, tiny_batch, tokenizer, tmp_path):
    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(fusion=fusion)).eval()
    batch = tiny_batch(tokenizer)
    model.save_pretrained(tmp_path, tokenizer=tokenizer)
    assert {p.name for p in tmp_path.iterdir()} >= {"config.json", "model.safetensors", "text_tower", "vision_tower"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["id2label"] == {"0": "yes", "1": "no", "2": "red", "3": "circle", "4": "2"}
    assert config["fusion"] == fusion and config["model_type"] == "two_tower"
    loaded = TwoTowerForQuestionAnswering.from_pretrained(tmp_path)
    torch.testing.assert_close(model(**batch).logits, loaded(**batch).logits, rtol=0, atol=0)


def test_cached_features_give_the_same_logits_as_raw_inputs(tiny_config, tiny_batch, tokenizer):
    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config()).eval()
    batch = tiny_batch(tokenizer)
    image_features = model.backbone.encode_image(batch["pixel_values"])
    text_features = model.backbone.encode_text(batch["input_ids"], batch["attention_mask"])
    via_features = model(image_features=image_features, text_features=text_features,
                         attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(model(**batch).logits, via_features)


def test_attention_weights_are_distributions_over_image_tokens(tiny_config, tiny_batch, tokenizer):
    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(num_fusion_layers=3)).eval()
    batch = tiny_batch(tokenizer)
    out = model(**batch, output_attentions=True)
    assert len(out.attentions) == 3
    T = batch["input_ids"].shape[1]
    assert out.attentions[0].shape == (3, T, 16)  # 32px / 8px patches = 4 x 4 tokens
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(3, T))


def test_efficientnet_tower_grid(tmp_path):
    tower = build_vision_tower("efficientnet-lite0", image_size=64, pretrained=False)
    assert tower(torch.zeros(2, 3, 64, 64)).shape == (2, 4, 1280)  # 64 / 32 = 2 x 2 grid


def test_hf_vision_tower_drops_the_cls_token(tiny_vision_tower):
    tower = build_vision_tower(tiny_vision_tower, image_size=32)
    assert tower(torch.zeros(2, 3, 32, 32)).shape == (2, 16, 32)


def test_unknown_tower_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither a packaged tower"):
        build_vision_tower(str(tmp_path / "no-such-model"), image_size=32)


@pytest.mark.parametrize(
    "kwargs, flag",
    [({"fusion": "bilinear"}, "--model.fusion"), ({"loss": "mse"}, "--model.loss"),
     ({"hidden_size": 30, "num_heads": 4}, "--model.hidden_size"), ({"text": {"pooler": "max"}}, "--model.text.pooler"),
     ({"vision": {"grid_stride": 4}}, "--model.vision.grid_stride"),
     ({"vision": {"image_size": 8}}, "--model.vision.image_size"), ({"focal_gamma": -1.0}, "--model.focal_gamma")],
)
def test_config_errors_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        TwoTowerConfig(**kwargs)


def test_missing_checkpoint_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        TwoTowerForQuestionAnswering.from_pretrained(tmp_path)


def test_processor_resizes_and_normalises(tiny_text_tower):
    import numpy as np

    p = VQAProcessor(32, [0.5] * 3, [0.5] * 3, load_tokenizer(tiny_text_tower))
    x = p.images([np.full((10, 20, 3), 255, dtype=np.uint8)])
    assert x.shape == (1, 3, 32, 32)
    torch.testing.assert_close(x, torch.ones_like(x))  # (1 - 0.5) / 0.5
    enc = p.text(["what is the color of the shape?", "yes"])
    assert enc["input_ids"].shape == enc["attention_mask"].shape and enc["attention_mask"][1].sum() < 9


def test_multiscale_tokens_keep_the_top_features_and_add_early_stages():
    tower = build_vision_tower("efficientnet-lite0", image_size=64, pretrained=False, multiscale=True).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = tower(x)
        top = tower.model.extract_features(x).flatten(2).transpose(1, 2)
    assert tower.out_dim == 1280 + 112 + 40 and tokens.shape == (2, 4, 1432)
    torch.testing.assert_close(tokens[..., :1280], top)


def test_multiscale_is_refused_for_towers_without_it(tiny_vision_tower):
    with pytest.raises(NotImplementedError, match="multiscale"):
        build_vision_tower(tiny_vision_tower, image_size=32, multiscale=True)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_image_index_shares_each_image_between_its_questions(fusion, tiny_config, tiny_batch, tokenizer):
    """Each distinct image given once plus ``image_index`` gives the logits of one image per question."""
    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(fusion=fusion)).eval()
    batch = tiny_batch(tokenizer)
    images = model.backbone.encode_image(batch["pixel_values"][:2])  # 2 images for 3 questions
    index = torch.tensor([1, 0, 1])
    text = model.backbone.encode_text(batch["input_ids"], batch["attention_mask"])
    shared = model(image_features=images, image_index=index, text_features=text,
                   attention_mask=batch["attention_mask"]).logits
    repeated = model(image_features=images[index], text_features=text, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(shared, repeated)


def test_spatial_attention_can_prefer_the_cell_nearest_a_point():
    """``u = (2bx0, 2by0, -b)`` scores cell i by -b |p_i - p0|^2 (+ const): the nearest cell gets most weight,
    and ``-u`` the farthest; what each head reads back includes the attended cells' mean position."""
    from vqakit.models.two_tower import SpatialAttentionLayer, grid_coordinates

    torch.manual_seed(0)
    layer = SpatialAttentionLayer(h=8, heads=2, dropout=0.0).eval()
    coords = grid_coordinates(16)  # 4 x 4 cells, centres at +-0.25, +-0.75
    with torch.no_grad():
        layer.to_kv.weight.zero_()
        layer.to_kv.bias.zero_()  # no content: position alone decides
        layer.to_u.weight.zero_()
        x0, y0, b = 0.3, -0.7, 40.0
        layer.to_u.bias.copy_(torch.tensor([2 * b * x0, 2 * b * y0, -b, -2 * b * x0, -2 * b * y0, b]))
        _, attn = layer(torch.randn(1, 16, 8), torch.randn(1, 3, 8), torch.zeros(1, 3, dtype=torch.bool),
                        torch.tensor([0]), coords, need_weights=True)
    dist = ((coords - torch.tensor([x0, y0])) ** 2).sum(-1)
    assert attn.shape == (1, 3, 16)
    torch.testing.assert_close(attn.sum(-1), torch.ones(1, 3))
    # head-averaged: half the mass on the nearest cell (head 0), half on the farthest (head 1)
    top2 = set(attn[0, 0].topk(2).indices.tolist())
    assert top2 == {int(dist.argmin()), int(dist.argmax())}


def test_spatial_fusion_needs_a_square_grid(tiny_config):
    with pytest.raises(ValueError, match="square grid"):
        TwoTowerForQuestionAnswering(tiny_config(fusion="spatial", num_image_tokens=12))


@pytest.mark.parametrize("stride,cells", [(16, 4 * 4), (8, 8 * 8)])
def test_finer_efficientnet_grid_carries_every_stage(stride, cells):
    tower = build_vision_tower("efficientnet-lite0", image_size=64, pretrained=False, multiscale=True,
                               grid_stride=stride).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = tower(x)
        top = tower.model.extract_features(x)  # (2, 1280, 2, 2)
    assert tokens.shape == (2, cells, 1432) and tower.out_dim == 1432
    side = int(cells ** 0.5)
    upsampled = torch.nn.functional.interpolate(top, size=(side, side), mode="nearest").flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[..., :1280], upsampled)  # each cell: the top features of the cell above it


def test_grid_stride_is_validated(tiny_vision_tower):
    with pytest.raises(ValueError, match="vision.grid_stride"):
        TwoTowerConfig(vision={"grid_stride": 4})
    with pytest.raises(NotImplementedError, match="grid_stride"):
        build_vision_tower(tiny_vision_tower, image_size=32, grid_stride=16)


def test_truncated_efficientnet_is_the_full_networks_stage_features_plus_colour_statistics():
    full = build_vision_tower("efficientnet-lite0", image_size=64, pretrained=False, multiscale=True,
                              grid_stride=16).eval()
    cut = build_vision_tower("efficientnet-lite0", image_size=64, pretrained=False, multiscale=True,
                             grid_stride=16, truncate=True, color_stats=True).eval()
    cut.load_state_dict(full.state_dict(), strict=False)  # the cut network is a prefix of the full one
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        a, b = full(x), cut(x)
    assert b.shape == (2, 16, 112 + 40 + 9) and cut.out_dim == 161
    assert len(cut.model._blocks) < len(full.model._blocks)  # the later stages are gone, not only unused
    torch.testing.assert_close(b[..., :112], a[..., 1280 + 40:1280 + 40 + 112])  # the stride-16 stage
    torch.testing.assert_close(b[..., 112:152], a[..., 1280:1280 + 40])  # the stride-8 stage pooled into it
    cell = x[0, :, :16, 16:32]  # row 0, column 1 of the 4x4 grid
    expect = torch.cat([cell.mean((1, 2)), cell.amax((1, 2)), cell.amin((1, 2))])
    torch.testing.assert_close(b[0, 1, 152:], expect)


def test_truncate_needs_a_finer_grid_and_the_packaged_tower(tiny_vision_tower):
    with pytest.raises(ValueError, match="truncate=True needs grid_stride 8 or 16"):
        build_vision_tower("efficientnet-lite0", image_size=64, pretrained=False, truncate=True)
    with pytest.raises(NotImplementedError, match="color_stats=True"):
        build_vision_tower(tiny_vision_tower, image_size=32, color_stats=True)


def test_relation_bias_starts_neutral_and_gets_gradients(tiny_config, tiny_batch, tokenizer):
    """The relation gains start at zero (the model computes what it did without them) and they train."""
    torch.manual_seed(0)
    plain = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", dropout=0.0)).eval()
    biased = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", dropout=0.0, relation_bias=True)).eval()
    missing, unexpected = biased.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all("relation_gain" in k for k in missing)
    batch = tiny_batch(tokenizer)
    torch.testing.assert_close(plain(**batch).logits, biased(**batch).logits)
    biased.train()
    biased(**batch).logits.logsumexp(-1).sum().backward()
    grads = [p.grad for n, p in biased.named_parameters() if "relation_gain" in n and n.endswith("weight")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_position_gate_can_read_the_question_with_the_same_weights(tiny_config, tiny_batch, tokenizer):
    """position_gate_question changes what the position gate reads (the step's control plus the pooled question),
    not the parameters: the same weights load into both, and the answers differ; checkpoints without the field
    keep the control-only gate."""
    from vqakit.models.two_tower import TwoTowerConfig

    torch.manual_seed(0)
    control = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", dropout=0.0)).eval()
    both = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", dropout=0.0,
                                                    position_gate_question=True)).eval()
    both.load_state_dict(control.state_dict())  # strict: the same parameters
    batch = tiny_batch(tokenizer)
    assert not torch.allclose(control(**batch).logits, both(**batch).logits)
    old = {k: v for k, v in control.config.to_dict().items() if k != "position_gate_question"}
    assert TwoTowerConfig.from_dict(old).position_gate_question is False


def test_position_question_feeds_each_step_position_times_the_question(tiny_config, tiny_batch, tokenizer):
    """position_question adds, per step, its attended (x, y) times the pooled question to the classifier's input:
    no new parameters besides the classifier's wider first layer; the features flip sign with the position, so a
    linear read of them answers "in the top half?"; checkpoints without the field keep it off."""
    from vqakit.models.two_tower import TwoTowerConfig

    torch.manual_seed(0)
    plain = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", dropout=0.0)).eval()
    cfg = tiny_config(fusion="relational", dropout=0.0, position_question=True)
    both = TwoTowerForQuestionAnswering(cfg).eval()
    fusion = both.backbone.fusion
    assert fusion.out_dim - plain.backbone.fusion.out_dim == fusion.steps * 2 * cfg.hidden_size
    differ = {k for k, v in both.state_dict().items() if plain.state_dict()[k].shape != v.shape}
    assert differ == {"classifier.0.weight"} and both.state_dict().keys() == plain.state_dict().keys()
    batch = tiny_batch(tokenizer)
    pooled, _ = both.backbone(**batch)
    extra = pooled[:, -fusion.steps * 2 * cfg.hidden_size:].unflatten(1, (fusion.steps, 2, -1))  # (B, K, 2, H)
    # the same question vector in every step, scaled by the step's x and by its y
    ratio = extra[:, :, 1] / extra[:, :, 0]
    assert torch.allclose(ratio, ratio[..., :1].expand_as(ratio), rtol=1e-4, atol=1e-4)
    loss = both(**batch).logits.logsumexp(-1).sum()
    loss.backward()
    assert both.classifier[0].weight.grad[:, -fusion.steps * 2 * cfg.hidden_size:].abs().sum() > 0
    old = {k: v for k, v in plain.config.to_dict().items() if k != "position_question"}
    assert TwoTowerConfig.from_dict(old).position_question is False


def test_free_steps_start_without_a_word_order_preference(tiny_config, tiny_batch, tokenizer):
    """free_steps: the last steps start with no preference for where in the question they read, the others keep the
    ordered start (first words to last); the parameters are the same, and a step count they do not fit is refused."""
    from vqakit.models.two_tower import TwoTowerConfig

    torch.manual_seed(0)
    ordered = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", reasoning_steps=4, dropout=0.0))
    free = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", reasoning_steps=4, free_steps=1,
                                                    dropout=0.0))
    order = free.backbone.fusion.order.detach()
    assert torch.allclose(ordered.backbone.fusion.order.detach(), torch.linspace(-2, 2, 4))
    assert torch.allclose(order, torch.tensor([-2.0, 0.0, 2.0, 0.0]))
    free.load_state_dict(ordered.state_dict())  # strict: the same parameters
    loss = free(**tiny_batch(tokenizer)).logits.logsumexp(-1).sum()
    loss.backward()
    assert free.backbone.fusion.order.grad[-1] != 0  # the free step learns where to read
    with pytest.raises(ValueError, match="free_steps=4 must be .* less than --model.reasoning_steps=4"):
        TwoTowerForQuestionAnswering(tiny_config(fusion="relational", reasoning_steps=4, free_steps=4))
    old = {k: v for k, v in ordered.config.to_dict().items() if k != "free_steps"}
    assert TwoTowerConfig.from_dict(old).free_steps == 0


def test_question_find_is_a_step_the_pooled_question_alone_drives(tiny_config, tiny_batch, tokenizer):
    """question_find adds step 0, controlled by the pooled question and not by where a step reads the words: its
    control does not move with the word-order bias, the other steps' do; it trains, and checkpoints without the
    field have no such step."""
    from vqakit.models.two_tower import TwoTowerConfig

    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", reasoning_steps=3, dropout=0.0,
                                                     question_find=True)).eval()
    fusion = model.backbone.fusion
    assert fusion.steps == 4 and fusion.order.shape == (3,)
    q, mask = torch.randn(2, 6, fusion.token_pos.shape[1]), torch.ones(2, 6)
    _, controls, read_at, _ = fusion.controls(q, mask)
    with torch.no_grad():
        fusion.order.mul_(-5.0)  # read the question the other way round
    _, controls2, _, _ = fusion.controls(q, mask)
    assert controls.shape[1] == 4 and (read_at[:, 0] == 0).all()
    torch.testing.assert_close(controls[:, 0], controls2[:, 0])
    assert not torch.allclose(controls[:, 1:], controls2[:, 1:])
    model.train()
    model(**tiny_batch(tokenizer)).logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in fusion.find_control.parameters())
    old = {k: v for k, v in model.config.to_dict().items() if k != "question_find"}
    assert TwoTowerConfig.from_dict(old).question_find is False
    assert TwoTowerForQuestionAnswering(TwoTowerConfig.from_dict(old)).backbone.fusion.find_control is None


def test_find_from_words_finds_what_the_step_read_whatever_the_rest_of_the_question(tiny_config, tiny_batch,
                                                                                     tokenizer):
    """find_from_words: a step's find (its FiLM) comes from the words it read, so changing the rest of the
    question (the pooled question inside every control) leaves the find unchanged where the step reads the same
    words; the control still changes, the model trains, and older checkpoints read False."""
    from vqakit.models.two_tower import TwoTowerConfig

    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", reasoning_steps=2, dropout=0.0,
                                                     find_from_words=True)).eval()
    fusion = model.backbone.fusion
    h = fusion.token_pos.shape[1]
    q = torch.randn(1, 4, h)
    q2 = q.clone()
    q2[:, 3] += 3 * torch.randn(h)  # another last word: another pooled question
    with torch.no_grad():
        fusion.order.fill_(0.0)
        fusion.step_from_question.weight.zero_()  # each step's word query no longer depends on the question
        fusion.token_pos.zero_()
        big = torch.zeros(2, h)
        big[:, 0] = 50.0  # ... and both steps read word 0 (the only word with a large first feature)
        fusion.step_query.copy_(big)
        q[:, 0, 0] = q2[:, 0, 0] = 5.0
    mask = torch.ones(1, 4)
    _, controls, _, finds = fusion.controls(q, mask)
    _, controls2, _, finds2 = fusion.controls(q2, mask)
    torch.testing.assert_close(finds, finds2, atol=1e-4, rtol=1e-4)  # the same word read: the same find
    assert not torch.allclose(controls, controls2, atol=1e-3)  # the control sees the other question
    plain = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", reasoning_steps=2, dropout=0.0)).eval()
    plain.load_state_dict(model.state_dict())  # the same weights, the find from the control
    with torch.no_grad():
        plain.backbone.fusion.step_query.copy_(big)
    _, c_plain, _, f_plain = plain.backbone.fusion.controls(q, mask)
    torch.testing.assert_close(f_plain, c_plain)
    model.train()
    model(**tiny_batch(tokenizer)).logits.logsumexp(-1).sum().backward()
    assert fusion.film.weight.grad.abs().sum() > 0 and fusion.step_query.grad.abs().sum() > 0
    old = {k: v for k, v in model.config.to_dict().items() if k != "find_from_words"}
    assert TwoTowerConfig.from_dict(old).find_from_words is False


def _set_reads(fusion, first_feature: float) -> None:
    """The steps' question-set reads set by hand: no preference for where in the question, no query from the
    question, no token positions; every step's query is ``first_feature`` on feature 0 (0: the mean of the words)."""
    with torch.no_grad():
        fusion.order.fill_(0.0)
        fusion.step_from_question.weight.zero_()
        fusion.step_from_question.bias.zero_()
        fusion.token_pos.zero_()
        fusion.step_query.zero_()
        fusion.step_query[:, 0] = first_feature


def test_content_read_takes_the_same_word_in_every_wording(tiny_config, tiny_batch, tokenizer):
    """content_read: each ordered step also reads the words with a query the question does not set, so it
    takes the same word whatever the other words are (here, with no preference for where, wherever it stands);
    the free step gets no such read; it trains, and older checkpoints read False."""
    from vqakit.models.two_tower import TwoTowerConfig

    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", reasoning_steps=3, free_steps=1,
                                                     dropout=0.0, find_from_words=True, content_read=True)).eval()
    fusion = model.backbone.fusion
    h = fusion.token_pos.shape[1]
    _set_reads(fusion, 0.0)  # the question-set read: the mean of the words
    with torch.no_grad():
        fusion.content_query.zero_()
        fusion.content_order.zero_()
        fusion.content_query[:, 0] = 50.0  # the content read: the word with a large first feature
        fusion.content_gate.bias.fill_(20.0)  # gate open
    mask = torch.ones(1, 5)
    for where in (1, 3):  # the named word early or late, among other words
        q = torch.randn(1, 5, h)
        q[..., 0] = -1.0
        q[:, where, 0] = 5.0
        _, _, _, finds = fusion.controls(q, mask)
        want = q.mean(1) + q[:, where]
        torch.testing.assert_close(finds[:, :2], want[:, None].expand(-1, 2, -1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(finds[:, 2], q.mean(1), atol=1e-4, rtol=1e-4)  # the free step
    with torch.no_grad():  # two named words: the first ordered step takes the earlier, the second the later one
        fusion.content_order.copy_(torch.tensor([-10.0, 10.0]))
    q = torch.randn(1, 5, h)
    q[..., 0] = -1.0
    q[:, 1, 0] = q[:, 3, 0] = 5.0
    _, _, _, finds = fusion.controls(q, mask)
    torch.testing.assert_close(finds[:, 0], q.mean(1) + q[:, 1], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(finds[:, 1], q.mean(1) + q[:, 3], atol=1e-3, rtol=1e-3)
    plain = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", reasoning_steps=2, dropout=0.0,
                                                     find_from_words=True)).eval()
    assert plain.backbone.fusion.content_query is None
    model.train()
    with torch.no_grad():
        fusion.content_query.normal_(0, 0.1)
        fusion.content_gate.bias.zero_()
    model(**tiny_batch(tokenizer)).logits.logsumexp(-1).sum().backward()
    assert fusion.content_query.grad.abs().sum() > 0 and fusion.content_gate.weight.grad.abs().sum() > 0
    old = {k: v for k, v in model.config.to_dict().items() if k != "content_read"}
    assert TwoTowerConfig.from_dict(old).content_read is False


def test_word_dropout_hides_words_from_the_reads_while_training_only(tiny_config, tiny_batch, tokenizer):
    """word_dropout: in training a read that settled on one word sometimes has to take another (never a padding
    token, and never no word at all); in evaluation every word is read, as without it; a bad value is refused and
    older checkpoints read 0."""
    from vqakit.models.two_tower import TwoTowerConfig

    torch.manual_seed(0)
    model = TwoTowerForQuestionAnswering(tiny_config(fusion="relational", reasoning_steps=2, dropout=0.0,
                                                     find_from_words=True, word_dropout=0.5))
    fusion = model.backbone.fusion
    h = fusion.token_pos.shape[1]
    _set_reads(fusion, 50.0)  # both steps read the word with the largest first feature
    q = torch.randn(1, 6, h)
    q[0, :, 0] = torch.tensor([1.0, 2, 5, 3, 9, 9])  # word 2 first, then 3, 1, 0; never the padding
    mask = torch.tensor([[1.0, 1, 1, 1, 0, 0]])  # two padding tokens
    model.eval()
    for _ in range(3):  # evaluation: always the settled word
        torch.testing.assert_close(fusion.controls(q, mask)[3], q[:, 2:3].expand(-1, 2, -1))
    model.train()
    taken = collections.Counter()
    for _ in range(200):
        finds = fusion.controls(q, mask)[3]  # (1, 2, H): each step's read, sharp on one word
        for step in range(2):
            word = int((finds[0, step] - q[0]).abs().sum(-1).argmin())
            torch.testing.assert_close(finds[0, step], q[0, word], atol=1e-3, rtol=1e-3)  # one whole word
            taken[word] += 1
    assert set(taken) == {0, 1, 2, 3}  # the settled word most often, the others sometimes, padding never
    assert taken[2] == max(taken.values()) and 150 < taken[2] < 300  # ~225 of 400 at p = 0.5
    model(**tiny_batch(tokenizer)).logits.logsumexp(-1).sum().backward()
    assert fusion.step_query.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="word_dropout"):
        TwoTowerConfig(fusion="relational", word_dropout=1.0)
    old = {k: v for k, v in model.config.to_dict().items() if k != "word_dropout"}
    assert TwoTowerConfig.from_dict(old).word_dropout == 0.0


def test_position_shared_axes_reads_x_and_y_through_one_map(tiny_config, tiny_batch, tokenizer):
    """position_shared_axes passes x and y through the same code map: swapping the two axes of the attended
    positions and the two halves of the gate gives the same features, so what the left / right questions train
    serves the top / bottom ones; checkpoints without the field keep the joint map."""
    from vqakit.models.two_tower import TwoTowerConfig

    torch.manual_seed(0)
    cfg = tiny_config(fusion="relational", dropout=0.0, position_shared_axes=True)
    model = TwoTowerForQuestionAnswering(cfg).eval()
    fusion, h = model.backbone.fusion, cfg.hidden_size
    assert fusion.where_codes.weight.shape == (h, 7) and fusion.where_gate.weight.shape == (2 * h, h)
    wheres, gate_from = torch.rand(3, fusion.steps, 2) * 2 - 1, torch.randn(3, fusion.steps, h)
    swapped = copy.deepcopy(fusion)
    with torch.no_grad():
        swapped.where_gate.weight.copy_(fusion.where_gate.weight.roll(h, 0))
        swapped.where_gate.bias.copy_(fusion.where_gate.bias.roll(h, 0))
    same = fusion.read_positions(wheres, gate_from)
    torch.testing.assert_close(swapped.read_positions(wheres.flip(-1), gate_from), same)
    assert not torch.allclose(fusion.read_positions(wheres.flip(-1), gate_from), same)  # the axes still differ
    model(**tiny_batch(tokenizer)).logits.sum().backward()
    assert fusion.where_codes.weight.grad.abs().sum() > 0 and fusion.where_gate.weight.grad.abs().sum() > 0
    old = {k: v for k, v in model.config.to_dict().items() if k != "position_shared_axes"}
    assert TwoTowerConfig.from_dict(old).position_shared_axes is False


def test_step_read_picks_the_step_the_question_points_to(tiny_config, tiny_batch, tokenizer):
    """step_read adds a question-weighted read over the steps: at the start the mean of the steps' reads; with a
    question that points at one step, that step's read exactly. Checkpoints without the field have none."""
    from vqakit.models.two_tower import STEP_READ_HEADS, TwoTowerConfig

    torch.manual_seed(0)
    cfg = tiny_config(fusion="relational", dropout=0.0, step_read=True)
    model = TwoTowerForQuestionAnswering(cfg).eval()
    fusion, h, k = model.backbone.fusion, cfg.hidden_size, model.backbone.fusion.steps
    batch = tiny_batch(tokenizer)
    inputs = {key: batch[key] for key in ("pixel_values", "input_ids", "attention_mask")}

    def reads_and_step_read():
        pooled, _ = model.backbone(**inputs)
        start = h + k + k * h  # question, where each step read in the question, the steps' states
        reads = torch.stack([pooled[:, start + i * (h + 2): start + i * (h + 2) + h] for i in range(k)], dim=1)
        return reads, pooled[:, -STEP_READ_HEADS * h:].unflatten(-1, (STEP_READ_HEADS, h))

    with torch.no_grad():
        reads, step_read = reads_and_step_read()
        torch.testing.assert_close(step_read, reads.mean(1, keepdim=True).expand(-1, STEP_READ_HEADS, -1))
        fusion.step_read_key.weight.zero_()
        fusion.step_read_key.bias.zero_()
        fusion.step_read_order.zero_()
        fusion.step_read_order[k - 1, 0] = 1.0  # the last step, along one direction the query looks in
        fusion.step_read_query.bias.fill_(0.0)
        fusion.step_read_query.bias[0] = 1e4  # head 0 attends to it; head 1 still averages
        reads, step_read = reads_and_step_read()
        torch.testing.assert_close(step_read[:, 0], reads[:, -1])
        torch.testing.assert_close(step_read[:, 1], reads.mean(1))
    model = TwoTowerForQuestionAnswering(cfg)  # fresh: the query learns first, then the keys it looks at
    model(**batch).logits.sum().backward()
    fusion = model.backbone.fusion
    assert fusion.step_read_query.weight.grad.abs().sum() > 0 and fusion.step_read_order.grad.abs().sum() == 0
    with torch.no_grad():
        fusion.step_read_query.weight.normal_()
    model.zero_grad()
    model(**batch).logits.sum().backward()
    assert fusion.step_read_order.grad.abs().sum() > 0 and fusion.step_read_key.weight.grad.abs().sum() > 0
    old = {key: v for key, v in model.config.to_dict().items() if key != "step_read"}
    assert TwoTowerConfig.from_dict(old).step_read is False


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_focal_gamma_keeps_the_gradient_on_what_is_not_learned(loss):
    """focal_gamma 0 is the plain loss; with gamma > 0 a question the model already answers gives almost no
    gradient while one it does not gives nearly its plain gradient, so the unlearned question's share of the
    gradient rises. Checkpoints without the field train with the plain loss."""
    targets = torch.zeros(3, 4)
    targets[0, 1] = targets[1, 2] = targets[2, 3] = 1.0
    labels = torch.tensor([1, 2, -100])  # the third question's majority answer is out of vocabulary (ce skips it)
    base = torch.zeros(3, 4)
    base[0] = -8.0
    base[0, 1] = 8.0  # learned; the second question is at chance
    torch.testing.assert_close(vqa_loss(base, targets, labels, loss, 0.0), vqa_loss(base, targets, labels, loss))

    def grad_norms(gamma):
        logits = base.clone().requires_grad_()
        vqa_loss(logits, targets, labels, loss, gamma).backward()
        return logits.grad[0].norm(), logits.grad[1].norm()

    learned_plain, unlearned_plain = grad_norms(0.0)
    learned, unlearned = grad_norms(2.0)
    assert learned < 0.01 * learned_plain  # (1 - p)^2 with p ~ 1
    assert unlearned > 0.25 * unlearned_plain
    assert unlearned / learned > 100 * (unlearned_plain / learned_plain)
    cfg = TwoTowerConfig(fusion="concat", loss=loss, focal_gamma=2.0)
    assert TwoTowerConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "focal_gamma"}).focal_gamma == 0
