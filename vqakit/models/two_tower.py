"""Two-tower VQA: a pretrained vision tower and a pretrained text tower, fused, then classified.

References:
- Antol et al., 2015, "VQA: Visual Question Answering" (https://arxiv.org/abs/1505.00468): answer
  classification over the most frequent answers.
- Teney et al., 2018, "Tips and Tricks for Visual Question Answering" (https://arxiv.org/abs/1708.02711):
  soft-score targets with a sigmoid/BCE loss, gated tanh-style units, the classifier shape.
- Lu et al., 2019, ViLBERT (https://arxiv.org/abs/1908.02265) and Tan & Bansal, 2019, LXMERT
  (https://arxiv.org/abs/1908.07490): co-attention layers in which question tokens attend to image
  regions and image regions attend to question tokens.
- Kim et al., 2018, BAN (https://github.com/jnhwkim/ban-vqa): BCE loss scaled by the number of answers.

Fusions: ``concat`` (pooled image ++ pooled question -> MLP), ``gated`` (a learned sigmoid gate mixes
the projected modalities, then a refinement MLP), ``cross-attention`` (N co-attention layers) and ``spatial``
(N layers of question -> image attention in which every head can also score image tokens by where they are;
for questions about relations between objects, see ``SpatialFusion``).

The ``nn.Module`` owns no training logic: losses live here only as a pure function of logits and
targets so the Lightning system and the evaluator share one definition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vqakit.models.checkpoint import CONFIG_NAME, ConfigMixin, as_config, nest_tower_keys
from vqakit.models.checkpoint_files import load_weights
from vqakit.towers.text import POOLERS, HFTextTower, TextTowerConfig, mean_pool
from vqakit.towers.vision import VisionTowerConfig, build_vision_tower

Fusion = Literal["concat", "gated", "cross-attention", "spatial", "relational"]
Loss = Literal["bce", "ce"]
FUSIONS = get_args(Fusion)
LOSSES = get_args(Loss)
WEIGHTS_NAME = "model.safetensors"


@dataclass
class TwoTowerConfig(ConfigMixin):
    """Architecture of a two-tower VQA classifier (saved as ``config.json`` in the checkpoint).

    Args:
        vision: the vision tower and its options (:class:`~vqakit.towers.vision.VisionTowerConfig`: ``name``,
            ``image_size``, ``multiscale``, ``grid_stride``, ``truncate``, ``color_stats``, ``feature_norm``), each
            checked there against the tower; ``--model.vision.grid_stride 16`` on the command line.
        text: the text tower and its options (:class:`~vqakit.towers.text.TextTowerConfig`: ``name``,
            ``max_length`` (questions are truncated to this many tokens), ``pooler`` (how ``concat``/``gated``
            pool question tokens)).
        fusion: how the modalities meet: ``concat``, ``gated``, ``cross-attention``, ``spatial`` (question tokens
            attend by content and position) or ``relational`` (find/relate/read steps, ``RelationalFusion``).
        hidden_size: width of the fusion layers.
        num_fusion_layers: co-attention layers (``cross-attention``, ``spatial``); ``relational``: image
            self-attention layers before the reasoning steps.
        reasoning_steps: find/relate steps over the image of the ``relational`` fusion.
        free_steps: ``relational``: how many of the ``reasoning_steps``, the last ones, start with no preference
            for where in the question they read. The others read the question in order, so the last of them reads
            its last words: in "what colour is the object nearest to the green one?" that step finds the green
            object, and only a step after it can find what is nearest to it. ``--recipe auto`` uses one.
        position_readout: ``relational``: each step's attended position also enters the answer through its
            sin/cos codes gated by the step's control (where the found object is, read as the question asks:
            "in the left half?", "on which side?"). Off in checkpoints written before it existed.
        position_gate_question: ``relational`` with ``position_readout``: the gate reads the pooled question as
            well as the step's control, so the step that found the object and the word that asks about it
            ("left", "upper") need not be read by the same step (transfer-sort75 at batch 80, same seed and init:
            position 81.97 -> 100.0). ``--recipe auto`` turns it on.
        position_shared_axes: ``relational`` with ``position_readout``: x and y pass the same code map, and the
            gate says how much of each axis a question asks for. "Is it in the left half?" and "which side?" train
            the map that "is it in the top half?" then reads y with, instead of one wording of many training the
            y half of the map and its gate together from scratch. It fixed both transfer runs that had left "in
            the top half?" near chance, but two of three transfer-sort75 seeds then stalled on the colour-relational
            questions; with the three word options below (``find_from_words``, ``content_read``,
            ``word_dropout``) every transfer run met its target (docs/LOG.md). Off by default and in older
            checkpoints; ``--recipe auto`` turns it on.
        step_read: ``relational``: the answer also gets what the steps read (the content at each step's attended
            place) weighted by a softmax over the steps, its scores from the pooled question against each step's
            control (``STEP_READ_HEADS`` such reads). "What colour is the object nearest to the green one?" takes
            its colour from the step that related, "what colour is the square?" from the step that found the
            square: one question-set softmax picks the step, where the classifier alone has to learn to route
            among the concatenated reads of all steps. With ``position_shared_axes`` it cured the transfer-sort75
            colour-relational stalls, but all three transfer-clutter128 seeds then left "is the X bigger than the
            Y?" near chance (docs/LOG.md): off by default, in ``--recipe auto`` and in older checkpoints.
        position_question: ``relational``: each step's attended (x, y) times the pooled question vector also
            enters the answer. The position readout's gate is learned jointly with the coordinate codes it gates,
            and a run could find the named object and still leave "is it in the top half?" near chance; with the
            coordinates themselves times the question, "top / bottom" times y is linear in the classifier's
            weights (transfer-clutter128 seed 0: that wording 65.0 -> 100, overall 96.63 -> 99.32). Off by default
            and in ``--recipe auto``: on two other transfer runs with it a relational question family plateaued
            instead (docs/LOG.md).
        relation_bias: ``relational``: a step's attention scores also get, per earlier step, a question-set
            multiple of each cell's squared distance to where that step looked and of that step's attention map
            ("nearest to it, not it": near, and away from the earlier find). Off in checkpoints written before
            it existed.
        question_find: ``relational``: one more step, before the ``reasoning_steps``, whose control comes from the
            pooled question alone (no reading of words in order): it finds the object the question names
            whatever the question's word order, and the later steps and the position readout see what it found.
            Off in checkpoints written before it existed.
        find_from_words: ``relational``: each step finds (the FiLM of the cells) from the question words it read
            alone, not from its control, which also holds the pooled question. With the control, what a step
            finds for "green" depends on the rest of the question: a run could find the green object for "which
            side is the green object on?" and miss it for "is the green item in the left half?" (transfer-sort75,
            a seed on which the yes/no position questions stayed near chance: the step reading "green" landed 0.45
            from the object against 0.04), and the readout of a find that never lands gets no gradient to learn
            from, nor the find from a readout that never answers. The control still sets the step's relation
            gains and position gate. Off by default and in older checkpoints; ``--recipe auto`` turns it on. Alone
            it rescued that run, but on another seed no step read the colour word of the yes/no wording at all
            (docs/LOG.md).
        content_read: ``relational``: each ordered step (not the free ones) also reads the question's words
            with a query of its own that does not depend on the question, and its own learned preference for
            where in the question (early for the first step, late for the last, as the question-set read
            starts), gated per step by the pooled question, and adds that read to the words its question-set
            read took. A word this read learns to take in one wording ("green" in "which side is the green
            object on?") it takes in every wording ("is the green item in the left half?"), where the
            question-set reads of a run could all settle on "is", "half" or the side word and no step found the
            object. Off by default and in older checkpoints; ``--recipe auto`` turns it on. With the find from
            words alone it met the transfer target on 12 of 13 runs; the reads it learned stay broad
            (mostly the question's first or last tokens, not the colour words), and on the run it missed no read
            of either kind took the colour word of the yes/no wording (docs/LOG.md).
        word_dropout: ``relational``, training only: each step's read over the question's words (and its
            content read) hides each word with this probability, drawn anew per question and step (a read that
            would hide every word hides none). A read that has settled on one word ("is", weight 0.99) then
            still has to try the others now and then, so the colour word's worth can be learned after the
            read settled (a softmax at weight ~1 gives the other words almost no gradient). Inference reads every
            word. 0 (off) by default and in older checkpoints; ``--recipe auto`` uses 0.1. With the find from
            words and the content read but a position code map per axis, 0.1 met the transfer target on 13 of 15
            runs, both misses on the yes/no position questions; with ``position_shared_axes`` as well, on every
            run (docs/LOG.md).
        num_heads: attention heads per fusion layer.
        mlp_ratio: width of the fusion MLPs, as a multiple of ``hidden_size``.
        dropout: dropout in the fusion layers and the classifier.
        loss: ``bce`` against VQA soft scores (standard) or ``ce`` against the majority answer.
        focal_gamma: > 0 weighs each question's loss by how wrong the model still is on it (focal loss; see
            :func:`vqa_loss`), so questions the model has not learned keep their share of the gradient once the
            rest are learned. 0 (the plain loss) in checkpoints written before it existed.
        gradient_checkpointing: recompute activations in backward to save memory: per fusion layer, per
            tower layer (transformers' own) and per EfficientNet block.
        id2label: answer vocabulary, class id -> answer (filled from the training data).
        image_mean: per-channel mean used to normalise pixels (filled from the vision tower).
        image_std: per-channel std used to normalise pixels (filled from the vision tower).
        num_image_tokens: tokens the vision tower yields at ``vision.image_size`` (filled when built).

    Checkpoints and YAML recipes written with the earlier flat fields (``vision_tower``, ``image_size``,
    ``vision_grid_stride``, ..., ``max_question_length``, ``text_pooler``) are read through :meth:`upgrade`
    (:data:`~vqakit.models.checkpoint.FLAT_TOWER_KEYS`).

    >>> TwoTowerConfig.from_dict({"vision_grid_stride": 16, "text_pooler": "cls"}).vision.grid_stride
    16
    """

    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    fusion: Fusion = "cross-attention"
    hidden_size: int = 256
    num_fusion_layers: int = 3
    reasoning_steps: int = 3
    free_steps: int = 0
    position_readout: bool = True
    position_gate_question: bool = False
    position_question: bool = False
    position_shared_axes: bool = False
    step_read: bool = False
    relation_bias: bool = False
    question_find: bool = False
    find_from_words: bool = False
    content_read: bool = False
    word_dropout: float = 0.0
    num_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.1
    loss: Loss = "bce"
    focal_gamma: float = 0.0
    gradient_checkpointing: bool = False
    id2label: dict[int, str] = field(default_factory=dict)
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    num_image_tokens: int | None = None

    model_type = "two_tower"

    def __post_init__(self):
        self.vision = as_config(self.vision, VisionTowerConfig, "--model.vision")
        self.text = as_config(self.text, TextTowerConfig, "--model.text")
        if self.fusion not in FUSIONS:
            raise ValueError(f"--model.fusion={self.fusion!r} is not one of {FUSIONS}")
        if self.loss not in LOSSES:
            raise ValueError(f"--model.loss={self.loss!r} is not one of {LOSSES}")
        if not self.focal_gamma >= 0:
            raise ValueError(f"--model.focal_gamma={self.focal_gamma} must be >= 0 (0: the plain loss)")
        if not 0 <= self.word_dropout < 1:
            raise ValueError(f"--model.word_dropout={self.word_dropout} must be in [0, 1) (0: every word read)")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"--model.hidden_size={self.hidden_size} must be divisible by --model.num_heads={self.num_heads}"
            )
        if self.reasoning_steps < 1:
            raise ValueError(f"--model.reasoning_steps={self.reasoning_steps} must be at least 1")
        if not 0 <= self.free_steps < self.reasoning_steps:
            raise ValueError(f"--model.free_steps={self.free_steps} must be at least 0 and less than "
                             f"--model.reasoning_steps={self.reasoning_steps}")
        if self.vision.image_size < 16:
            raise ValueError(f"--model.vision.image_size={self.vision.image_size} is too small (at least 16)")
        self.id2label = {int(k): v for k, v in self.id2label.items()}  # JSON keys are strings

    @property
    def num_answers(self) -> int:
        return len(self.id2label)

    @classmethod
    def upgrade(cls, d: dict) -> dict:
        """A ``config.json`` of any earlier layout: the defaults older checkpoints were trained under, then the flat
        tower fields moved into ``vision`` / ``text``."""
        return nest_tower_keys(_patch_missing_keys(d))

    @classmethod
    def upgrade_keys(cls, d: dict) -> dict:
        """The flat tower fields of ``d`` (possibly partial: a YAML recipe's ``model`` section) moved into
        ``vision`` / ``text``."""
        return nest_tower_keys(d)


def _patch_missing_keys(d: dict) -> dict:
    """Fill fields that older checkpoints lack with the defaults they were trained under."""
    d.setdefault("gradient_checkpointing", False)
    d.setdefault("reasoning_steps", 3)
    d.setdefault("position_readout", False)
    d.setdefault("relation_bias", False)
    d.setdefault("mlp_ratio", 4)
    if "vision" not in d:  # the flat layout: its tower options as the flat fields, nested by nest_tower_keys
        d.setdefault("vision_multiscale", False)
        d.setdefault("vision_grid_stride", 32)
        d.setdefault("vision_truncate", False)
        d.setdefault("vision_color_stats", False)
        d.setdefault("vision_feature_norm", False)
    return d


@dataclass
class VQAOutput:
    """logits (B, A); attentions: per fusion layer, question->image attention (B, T, N), when asked."""

    logits: torch.Tensor
    attentions: list[torch.Tensor] | None = None


# ---------------------------------------------------------------------------------------------------------------------
# Fusion blocks


def mlp(d_in: int, d_hidden: int, d_out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_hidden, d_out))


class ConcatFusion(nn.Module):
    """[mean(image tokens); pool(question tokens)] -> MLP -> (B, H)."""

    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.pool_text = POOLERS[cfg.text.pooler]
        h = cfg.hidden_size
        self.mlp = nn.Sequential(mlp(2 * h, cfg.mlp_ratio * h, h, cfg.dropout), nn.GELU())
        self.out_dim = cfg.hidden_size

    def forward(self, v, q, q_mask, output_attentions=False):
        fused = torch.cat([v.mean(1), self.pool_text(q, q_mask)], dim=-1)  # (B, 2H)
        return self.mlp(fused), None


class GatedFusion(nn.Module):
    """g = sigmoid(W [v; q]); h = g * v + (1 - g) * q; h = h + MLP(LN(h)) -> (B, H)."""

    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        h = cfg.hidden_size
        self.pool_text = POOLERS[cfg.text.pooler]
        self.gate = nn.Linear(2 * h, h)
        self.ln = nn.LayerNorm(h)
        self.refine = mlp(h, cfg.mlp_ratio * h, h, cfg.dropout)
        self.out_dim = h

    def forward(self, v, q, q_mask, output_attentions=False):
        v, q = v.mean(1), self.pool_text(q, q_mask)  # (B, H) each
        g = torch.sigmoid(self.gate(torch.cat([v, q], dim=-1)))
        h = g * v + (1 - g) * q
        return h + self.refine(self.ln(h)), None


class CoAttentionLayer(nn.Module):
    """One ViLBERT-style layer: cross-attention both ways, self-attention within each stream, MLPs (pre-LN)."""

    def __init__(self, h: int, heads: int, dropout: float, mlp_ratio: int = 4):
        super().__init__()
        self.ln_q_cross, self.ln_v_cross = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q_from_v = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
        self.v_from_q = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
        self.ln_q_self, self.ln_v_self = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q_self = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
        self.v_self = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
        self.ln_q_mlp, self.ln_v_mlp = nn.LayerNorm(h), nn.LayerNorm(h)
        self.mlp_q, self.mlp_v = mlp(h, mlp_ratio * h, h, dropout), mlp(h, mlp_ratio * h, h, dropout)

    def forward(self, v, q, q_pad, need_weights: bool = False):
        # v: (B, N, H) image tokens; q: (B, T, H) question tokens; q_pad: (B, T) True where padding
        qn, vn = self.ln_q_cross(q), self.ln_v_cross(v)
        dq, attn = self.q_from_v(qn, vn, vn, need_weights=need_weights)  # attn: (B, T, N), head-averaged
        dv, _ = self.v_from_q(vn, qn, qn, key_padding_mask=q_pad, need_weights=False)
        q, v = q + dq, v + dv
        qn, vn = self.ln_q_self(q), self.ln_v_self(v)
        q = q + self.q_self(qn, qn, qn, key_padding_mask=q_pad, need_weights=False)[0]
        v = v + self.v_self(vn, vn, vn, need_weights=False)[0]
        q = q + self.mlp_q(self.ln_q_mlp(q))
        v = v + self.mlp_v(self.ln_v_mlp(v))
        return v, q, attn


class CrossAttentionFusion(nn.Module):
    """N co-attention layers, then [mean(image tokens); masked mean(question tokens)] -> (B, 2H)."""

    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            CoAttentionLayer(cfg.hidden_size, cfg.num_heads, cfg.dropout, cfg.mlp_ratio)
            for _ in range(cfg.num_fusion_layers)
        )
        self.ln_v, self.ln_q = nn.LayerNorm(cfg.hidden_size), nn.LayerNorm(cfg.hidden_size)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.out_dim = 2 * cfg.hidden_size

    def forward(self, v, q, q_mask, output_attentions=False):
        q_pad = ~q_mask.bool()
        attentions = []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                v, q, attn = checkpoint(layer, v, q, q_pad, output_attentions, use_reentrant=False)
            else:
                v, q, attn = layer(v, q, q_pad, need_weights=output_attentions)
            if output_attentions:
                attentions.append(attn)
        pooled = torch.cat([self.ln_v(v).mean(1), mean_pool(self.ln_q(q), q_mask)], dim=-1)
        return pooled, (attentions if output_attentions else None)


def grid_coordinates(num_tokens: int) -> torch.Tensor:
    """(N, 2) centres (x, y) in [-1, 1] of a square grid of ``num_tokens`` cells in row-major order."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"fusion 'spatial' needs a square grid of image tokens, got {num_tokens} tokens")
    centres = (torch.arange(side, dtype=torch.float32) + 0.5) / side * 2 - 1
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


WHERE_FREQS = 3  # sin/cos frequencies of the position readout's codes of an attended position
STEP_READ_HEADS = 2  # question-weighted reads over the steps, with ``step_read``


def cell_codes(coords: torch.Tensor, num_freqs: int) -> torch.Tensor:
    """(N, D) positions (cell centres: D = 2) -> (N, D + 2 * D * num_freqs): them and their sin/cos at
    ``pi * 2**f``."""
    freqs = torch.pi * 2.0 ** torch.arange(num_freqs, device=coords.device, dtype=coords.dtype)
    angles = coords[..., None] * freqs  # (N, D, F)
    return torch.cat([coords, angles.sin().flatten(1), angles.cos().flatten(1)], dim=-1)


class SpatialAttentionLayer(nn.Module):
    """Question tokens attend to image tokens; each head can also score the tokens by position, then
    question self-attention and an MLP (pre-LN).

    Head ``h`` scores image token ``i`` as ``q.k_i / sqrt(d) + u_h(q) . [x_i, y_i, x_i^2 + y_i^2]`` and reads
    ``[v_i, x_i, y_i]``: the query states which positions it prefers (``u`` from ``q``), and the answer
    carries where the attended tokens are. ``u = (2bx, 2by, -b)`` prefers tokens near ``(x, y)`` (the
    object closest to one found by an earlier layer), ``-b`` far from it, ``(-1, 0, 0)`` the leftmost: the
    relations between positions that plain attention over learned position embeddings learns slowly. It is
    the quadratic distance bias of Gaussian attention (Sukhbaatar et al.'s adaptive spans; ConViT's
    positional gating, d'Ascoli et al., 2021, https://arxiv.org/abs/2103.10697) made question-dependent.

    Keys and values depend only on the image, so they are computed once per distinct image of the batch and
    shared by all of its questions (``image_index``)."""

    def __init__(self, h: int, heads: int, dropout: float, mlp_ratio: int = 4):
        super().__init__()
        self.heads, self.d = heads, h // heads
        self.ln_q, self.ln_v = nn.LayerNorm(h), nn.LayerNorm(h)
        self.to_q, self.to_kv = nn.Linear(h, h), nn.Linear(h, 2 * h)
        self.to_u = nn.Linear(h, 3 * heads)
        nn.init.zeros_(self.to_u.weight)  # positions start without influence; the content path learns first
        nn.init.zeros_(self.to_u.bias)
        self.out = nn.Linear(h + 2 * heads, h)
        self.drop = nn.Dropout(dropout)
        self.ln_self, self.ln_mlp = nn.LayerNorm(h), nn.LayerNorm(h)
        self.q_self = nn.MultiheadAttention(h, heads, dropout=dropout, batch_first=True)
        self.mlp = mlp(h, mlp_ratio * h, h, dropout)

    def forward(self, v, q, q_pad, image_index, coords, need_weights: bool = False):
        # v: (U, N, H) distinct images; q: (B, T, H); image_index: (B,) row of v for each question, or None
        # when U == B (one image per question); coords: (N, 2). Written without batch sizes (ONNX export).
        heads, d = self.heads, self.d
        k, val = self.to_kv(self.ln_v(v)).unflatten(-1, (2, heads, d)).permute(2, 0, 3, 1, 4)  # (U, heads, N, d)
        if image_index is not None:
            k, val = k.index_select(0, image_index), val.index_select(0, image_index)  # (B, heads, N, d)
        qn = self.ln_q(q)
        query = self.to_q(qn).unflatten(-1, (heads, d)).transpose(1, 2)  # (B, heads, T, d)
        u = self.to_u(qn).unflatten(-1, (heads, 3)).transpose(1, 2)  # (B, heads, T, 3)
        phi = torch.cat([coords, (coords**2).sum(-1, keepdim=True)], dim=-1).to(q.dtype)  # (N, 3)
        scores = query @ k.transpose(-1, -2) / math.sqrt(d) + u @ phi.T  # (B, heads, T, N)
        attn = torch.softmax(scores, dim=-1)
        content = (attn @ val).transpose(1, 2).flatten(2)  # (B, T, H)
        where = (attn @ coords.to(q.dtype)).transpose(1, 2).flatten(2)  # (B, T, 2 * heads)
        weights = attn.mean(1) if need_weights else None  # (B, T, N), head-averaged
        q = q + self.drop(self.out(torch.cat([content, where], dim=-1)))
        qn = self.ln_self(q)
        q = q + self.q_self(qn, qn, qn, key_padding_mask=q_pad, need_weights=False)[0]
        q = q + self.mlp(self.ln_mlp(q))
        return q, weights


class SpatialFusion(nn.Module):
    """N ``SpatialAttentionLayer`` s over image tokens that also carry fixed sin/cos codes of their grid cell,
    then [mean(image tokens); masked mean(question tokens)] -> (B, 2H).

    Question tokens read the image again in every layer, so a later layer can look for what an earlier one
    found (``What shape is the object closest to the red one?``: find red, then the token nearest to it).
    The image side (projection, keys, values) runs once per distinct image, not once per question."""

    image_index_aware = True

    def __init__(self, cfg: TwoTowerConfig):
        super().__init__()
        h = cfg.hidden_size
        self.register_buffer("coords", grid_coordinates(cfg.num_image_tokens), persistent=False)
        self.register_buffer("codes", cell_codes(self.coords, 4), persistent=False)  # computed once, not per call
        self.coord_proj = nn.Linear(self.codes.shape[1], h)
        self.layers = nn.ModuleList(
            SpatialAttentionLayer(h, cfg.num_heads, cfg.dropout, cfg.mlp_ratio) for _ in range(cfg.num_fusion_layers)
        )
        self.ln_v, self.ln_q = nn.LayerNorm(h), nn.LayerNorm(h)
        self.gradient_checkpointing = cfg.gradient_checkpointing
        self.out_dim = 2 * h

    def forward(self, v, q, q_mask, output_attentions=False, image_index=None):
        v = v + self.coord_proj(self.codes.to(v.dtype))
        q_pad = ~q_mask.bool()
        attentions = []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                q, attn = checkpoint(layer, v, q, q_pad, image_index, self.coords, output_attentions,
                                     use_reentrant=False)
            else:
                q, attn = layer(v, q, q_pad, image_index, self.coords, need_weights=output_attentions)
            if output_attentions:
                attentions.append(attn)
        image = self.ln_v(v).mean(1)
        if image_index is not None:
            image = image.index_select(0, image_index)
        pooled = torch.cat([image, mean_pool(self.ln_q(q), q_mask)], dim=-1)
        return pooled, (attentions if output_attentions else None)


class RelationalFusion(nn.Module):
    """Find, then relate, then read: a question is answered in a few steps over the image cells, each step
    attending to one place, conditioned on where the earlier steps looked (the control/read loop of MAC,
    Hudson & Manning, 2018, https://arxiv.org/abs/1803.03067, with FiLM-ed cells, Perez et al., 2018,
    https://arxiv.org/abs/1709.07871, in place of MAC's memory).

    1. Image: the cells, with sin/cos codes of their position, pass ``num_fusion_layers`` self-attention layers,
       once per image. With none (``--recipe auto`` on 10,000 questions or more) every step reads each cell's
       own features: a layer could learn to overwrite each cell with other cells' content, and a run that did
       lost the cells' colour and plateaued (transfer-clutter128: 70.3 with a layer, 99.3 without, same seed).
    2. Controls: step ``k`` attends over the question tokens (a learned query plus one from the pooled
       question) with a bias on where in the question a token is: step 1 starts out preferring the first
       words, the last step the last ones (``order_bias``, then learned). Without it the
       steps of "is the red object left of the blue object?" read both colours alike and find the same place:
       comparisons of two objects stayed at chance in our runs; with it they are learned. The last
       ``free_steps`` steps start without the bias: with every step ordered, the last one reads the last words,
       which in "what colour is the object nearest to the green one?" name the object to relate to, and no
       step is left to relate (transfer-sort75: nearest_color 28.6 -> 83.6 with one free step).
       With ``content_read`` each ordered step also reads the words with a query of its own that the question
       does not set, added (gated by the question) to what its question-set read took.
       With ``question_find`` a step 0 comes first, its control from the pooled question alone: it finds the
       object the question names, whichever words the ordered steps end up reading. Without it, "is the red
       object in the left half?" could stay at chance on some seeds while "which side is the red object on?"
       scored 100: no ordered step found the object for the yes/no wording.
    3. Steps: the control and what the earlier steps read FiLM-modulate every cell; the cells also see their
       offset (dx, dy, |dx|, |dy|, distance^2) to every earlier step's attended position. One attention over
       the cells gives the step's read (the cells' content) and position. "The object closest to the red
       one": one step finds red, a later one scores cells by their distance to it. Finding what a control
       names (the cell projection, FiLM from the control, the attention score) is one module shared by all
       steps, as MAC shares its read unit: a step that reads "red" can find red whichever step it is. With
       a module per step, "is the red object left of the blue one?" needs two steps to each learn to find
       colours on their own; a run could finish with left_of at chance (seed 1 of the recipe before). With
       ``find_from_words`` the FiLM comes from the words the step read, not from its control (which also holds
       the pooled question), so "green" finds the green object whatever else the question says.
       With ``relation_bias`` a step's attention scores also get, per earlier step, a gain from its control and
       the question on each cell's squared distance to that step's position and on that step's attention map:
       "nearest to the red one, not the red one" as two numbers (transfer-dots64: relational 79.6 -> 87.8;
       on transfer-sort75 the position questions scored lower with them, so they are off by default).
    4. Out: the question, where in the question each step read, every step's read (the image content and the
       step's own cell states, which carry the offsets to earlier steps) and position, the pairwise
       differences of the positions (also widened by an MLP: left of / above), and max/mean pools of the last
       step's cells.

    The image side runs once per distinct image of the batch (``image_index``)."""

    image_index_aware = True

    def __init__(self, cfg: TwoTowerConfig, order_bias: float = 2.0):
        super().__init__()
        h, k_read = cfg.hidden_size, cfg.reasoning_steps
        k_steps = k_read + int(cfg.question_find)  # the question's find, if any, is step 0
        self.steps = k_steps
        self.register_buffer("coords", grid_coordinates(cfg.num_image_tokens), persistent=False)
        self.register_buffer("codes", cell_codes(self.coords, 3), persistent=False)
        self.coord_proj = nn.Linear(self.codes.shape[1], h)
        self.image_layers = nn.ModuleList(
            nn.TransformerEncoderLayer(h, cfg.num_heads, cfg.mlp_ratio * h, cfg.dropout, batch_first=True,
                                       norm_first=True)
            for _ in range(cfg.num_fusion_layers)
        )
        self.ln_v = nn.LayerNorm(h)
        self.token_pos = nn.Parameter(torch.randn(cfg.text.max_length, h) * 0.1)
        self.question_out = mlp(h, 2 * h, h, 0.0)
        self.step_query = nn.Parameter(torch.randn(k_read, h) * 0.02)
        self.step_from_question = nn.Linear(h, k_read * h)
        self.find_control = mlp(h, 2 * h, h, 0.0) if cfg.question_find else None
        ordered = k_read - cfg.free_steps
        self.order = nn.Parameter(torch.cat([torch.linspace(-order_bias, order_bias, ordered),
                                             torch.zeros(cfg.free_steps)]))
        self.step_out = mlp(2 * h, 2 * h, h, 0.0)
        if cfg.content_read:  # per ordered step: a query the question does not set, its own order; a gate
            self.content_query = nn.Parameter(torch.randn(ordered, h) * 0.02)
            self.content_order = nn.Parameter(torch.linspace(-order_bias, order_bias, ordered))
            self.content_gate = nn.Linear(h, ordered)
            nn.init.zeros_(self.content_gate.weight)  # 0.5 at the start
            nn.init.zeros_(self.content_gate.bias)
        else:
            self.content_query = self.content_order = self.content_gate = None
        read = h + 2  # a step's read: content and position
        self.cell, self.cell2, self.attend = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, 1)  # shared by the steps
        self.film = nn.Linear(h, 2 * h)  # from the step's control, shared
        self.film_context = nn.ModuleList(nn.Linear(k * read, 2 * h) for k in range(1, k_steps))  # earlier reads
        self.relate = nn.ModuleList(nn.Linear(5 * k, h) for k in range(1, k_steps))  # offsets to earlier steps
        pairs = k_steps * (k_steps - 1) // 2
        self.geometry = mlp(2 * k_steps + 2 * pairs, 2 * h, h, 0.0)  # positions and their differences, widened
        self.out_dim = h + k_steps + k_steps * h + k_steps * read + 2 * pairs + h + 2 * h
        self.find_from_words = cfg.find_from_words
        self.word_dropout = cfg.word_dropout
        self.position_readout = cfg.position_readout
        self.position_gate_question = cfg.position_gate_question
        if cfg.position_readout:
            # absolute position as the question asks for it: codes(where_k) (.) gate(control_k), per step. The
            # product makes "is it in the LEFT / RIGHT half?" (position sign times a question word) linear
            # for the classifier; a plain concatenation of the 2 coordinates left such questions at chance.
            self.position_shared_axes = cfg.position_shared_axes
            if cfg.position_shared_axes:  # one axis's codes, one map for x and y; the gate weighs the two axes
                self.where_codes = nn.Linear(1 + 2 * WHERE_FREQS, h)
                self.where_gate = nn.Linear(h, 2 * h)
            else:
                self.where_codes = nn.Linear(2 + 4 * WHERE_FREQS, h)
                self.where_gate = nn.Linear(h, h)
            self.out_dim += k_steps * h
        self.step_read = cfg.step_read
        if cfg.step_read:  # question (query) against each step's control and its place in the order (keys)
            self.step_read_query = nn.Linear(h, STEP_READ_HEADS * h)
            nn.init.zeros_(self.step_read_query.weight)  # zero at the start: the mean of the steps' reads
            nn.init.zeros_(self.step_read_query.bias)
            self.step_read_key = nn.Linear(h, h)
            self.step_read_order = nn.Parameter(torch.randn(k_steps, h) * 0.02)
            self.out_dim += STEP_READ_HEADS * h
        self.position_question = cfg.position_question
        if cfg.position_question:
            self.out_dim += k_steps * 2 * h
        if cfg.relation_bias:
            # step k's gains on the distance to, and the attention map of, each earlier step, from its control and
            # the question (the relation word, "closest" / "farthest", need not be the words the step reads);
            # zero at the start: the content path learns first
            self.relation_gain = nn.ModuleList(nn.Linear(2 * h, 2 * k) for k in range(1, k_steps))
            for gain in self.relation_gain:
                nn.init.zeros_(gain.weight)
                nn.init.zeros_(gain.bias)
        else:
            self.relation_gain = None

    def controls(self, q, q_mask):
        """(B, T, H) question tokens -> pooled question (B, H), step controls (B, K, H), where in the question
        each step read (B, K), in [-1, 1] from the first token to the last (0 for the question's find, step 0),
        and what each step finds from (B, K, H): its control, or with ``find_from_words`` the words it read."""
        mask = q_mask.bool()
        t = q + self.token_pos[: q.shape[1]].to(q.dtype)
        question = mean_pool(t, mask)
        length = mask.sum(1, keepdim=True).to(q.dtype)
        place = torch.arange(q.shape[1], device=q.device, dtype=q.dtype)[None] / (length - 1).clamp(min=1) * 2 - 1

        def read(queries, order):  # (B or 1, K, H) queries, (K,) preference for where -> (B, K, T) word weights
            scores = queries @ t.transpose(1, 2) / math.sqrt(t.shape[-1]) + order[:, None] * place[:, None]
            visible = mask[:, None].expand_as(scores)
            if self.training and self.word_dropout > 0:  # hide words at random; never all of a read's words
                kept = visible & (torch.rand_like(scores) >= self.word_dropout)
                visible = torch.where(kept.any(-1, keepdim=True), kept, visible)
            return scores.masked_fill(~visible, float("-inf")).softmax(-1)

        k_read = self.step_query.shape[0]
        queries = self.step_query + self.step_from_question(question).unflatten(-1, (k_read, -1))  # (B, K, H)
        weights = read(queries, self.order)
        words = weights @ t  # (B, K, H) what each step read
        if self.content_query is not None:  # the same words in every wording of a question; no free step
            ordered = self.content_query.shape[0]
            content = self.content_gate(question).sigmoid()[..., None] * (
                read(self.content_query, self.content_order) @ t)  # (B, ordered, H)
            words = torch.cat([words[:, :ordered] + content, words[:, ordered:]], dim=1)
        controls = self.step_out(torch.cat([words, question[:, None].expand(-1, k_read, -1)], dim=-1))
        read_at = (weights * place[:, None]).sum(-1)
        finds = words if self.find_from_words else controls
        if self.find_control is not None:  # step 0: the whole question, read at no particular place
            step0 = self.find_control(question)[:, None]
            controls, finds = torch.cat([step0, controls], dim=1), torch.cat([step0, finds], dim=1)
            read_at = torch.cat([read_at.new_zeros(read_at.shape[0], 1), read_at], dim=1)
        return question, controls, read_at, finds

    def read_positions(self, wheres, gate_from):
        """(B, K, 2) attended positions, (B, K, H) what each step's gate reads -> (B, K, H): the position codes,
        gated by the question."""
        gate = self.where_gate(gate_from)
        if self.position_shared_axes:  # (B, K, 2, H): the same map of x and of y, each axis by its own gate
            codes = self.where_codes(cell_codes(wheres.reshape(-1, 1), WHERE_FREQS).unflatten(0, wheres.shape))
            return (codes * gate.unflatten(-1, (2, -1))).sum(2)
        return self.where_codes(cell_codes(wheres.flatten(0, 1), WHERE_FREQS).unflatten(0, wheres.shape[:2])) * gate

    def forward(self, v, q, q_mask, output_attentions=False, image_index=None):
        coords = self.coords.to(v.dtype)
        v = v + self.coord_proj(self.codes.to(v.dtype))
        for layer in self.image_layers:
            v = layer(v)
        v = self.ln_v(v)  # (U, N, H)
        cells = self.cell(v)  # linear in the image: once per image, not per question
        if image_index is not None:
            # index_select, not v[image_index]: its backward is index_add_, where advanced indexing's
            # index_put_(accumulate=True) took ~8% of a CPU training step
            v, cells = v.index_select(0, image_index), cells.index_select(0, image_index)  # (B, N, H)
        question, controls, read_at, finds = self.controls(q, q_mask)
        films = self.film(finds)  # (B, K, 2H): the shared FiLM, all steps at once
        reads, states, wheres, offsets, maps, dists, founds = [], [], [], [], [], [], []
        for k in range(self.steps):
            film, pre = films[:, k], cells
            if k:
                film = film + self.film_context[k - 1](torch.cat([*reads, *wheres], dim=-1))
                pre = pre + self.relate[k - 1](torch.cat(offsets, dim=-1))
            gamma, beta = film[:, None].chunk(2, dim=-1)
            z = torch.addcmul(beta, pre, 1 + gamma).relu_()  # relu(pre * (1 + gamma) + beta), one pass
            z = z + torch.relu(self.cell2(z))  # (B, N, H)
            score = self.attend(z).squeeze(-1)  # (B, N)
            if k and self.relation_gain is not None:
                gain = self.relation_gain[k - 1](torch.cat([controls[:, k], question], dim=-1))  # (B, 2k)
                dist2, found = torch.stack(dists, dim=-1), torch.stack(founds, dim=-1)  # (B, N, k) each
                score = score + (dist2 * gain[:, None, :k]).sum(-1) + (found * gain[:, None, k:]).sum(-1)
            attn = score.softmax(-1)  # (B, N)
            where = attn @ coords  # (B, 2)
            reads.append(torch.einsum("bn,bnh->bh", attn, v))
            states.append(torch.einsum("bn,bnh->bh", attn, z))  # what the step saw there, its relations included
            wheres.append(where)
            rel = coords[None] - where[:, None]  # (B, N, 2): every cell's offset from where this step looked
            offsets.append(torch.cat([rel, rel.abs(), (rel**2).sum(-1, keepdim=True)], dim=-1))
            maps.append(attn)
            if self.relation_gain is not None:  # what the later steps' gains multiply, computed once per step
                dists.append(offsets[-1][..., 4])  # (B, N) squared distance to where this step looked, in [0, 8]
                founds.append(attn / attn.amax(-1, keepdim=True))  # (B, N) this step's map, peak 1
        diffs = [wheres[i] - wheres[j] for i in range(self.steps) for j in range(i + 1, self.steps)]
        geometry = self.geometry(torch.cat([*wheres, *diffs], dim=-1))
        parts = [self.question_out(question), read_at, *states,
                 *(torch.cat([r, w], -1) for r, w in zip(reads, wheres)), *diffs, geometry, z.amax(1), z.mean(1)]
        where_all = torch.stack(wheres, dim=1)  # (B, K, 2)
        if self.position_readout:
            gate_from = controls + question[:, None] if self.position_gate_question else controls
            parts.append(self.read_positions(where_all, gate_from).flatten(1))  # (B, K * H)
        if self.step_read:  # (B, heads, K) softmax over the steps -> (B, heads * H)
            query = self.step_read_query(question).unflatten(-1, (STEP_READ_HEADS, -1))  # (B, heads, H)
            keys = self.step_read_key(controls) + self.step_read_order  # (B, K, H)
            weights = (query @ keys.transpose(1, 2) / math.sqrt(keys.shape[-1])).softmax(-1)
            parts.append((weights @ torch.stack(reads, dim=1)).flatten(1))
        if self.position_question:  # fixed coordinates times the question: (B, K, 2, H) -> (B, K * 2 * H)
            parts.append((where_all[..., None] * question[:, None, None]).flatten(1))
        pooled = torch.cat(parts, dim=-1)
        attentions = None
        if output_attentions:  # per step, where it looked, as (B, T, N) like the other fusions' maps
            attentions = [m[:, None].expand(-1, q.shape[1], -1) for m in maps]
        return pooled, attentions


FUSION_CLASSES = {"concat": ConcatFusion, "gated": GatedFusion, "cross-attention": CrossAttentionFusion,
                  "spatial": SpatialFusion, "relational": RelationalFusion}


# ---------------------------------------------------------------------------------------------------------------------
# The model


class TwoTowerModel(nn.Module):
    """Towers + projections + fusion: ``(image, question) -> pooled joint vector``.

    Either modality can come as raw input (``pixel_values`` / ``input_ids``) or as precomputed tower
    output (``image_features`` (B, N, Dv) / ``text_features`` (B, T, Dt)), which is how frozen towers
    train from the feature cache without running the towers at all.
    """

    def __init__(self, config: TwoTowerConfig, pretrained_towers: bool = True, tower_dir: str | Path | None = None):
        super().__init__()
        self.config = config
        vision_cfg = _subdir(tower_dir, "vision_tower")
        text_cfg = _subdir(tower_dir, "text_tower")
        self.vision = build_vision_tower(config.vision, pretrained=pretrained_towers, config_dir=vision_cfg)
        self.text = HFTextTower(config.text, pretrained=pretrained_towers, config_dir=text_cfg)
        if config.gradient_checkpointing:  # the towers too, not only the fusion layers
            self.vision.gradient_checkpointing_enable()
            self.text.gradient_checkpointing_enable()
        if config.image_mean is None or config.image_std is None:
            config.image_mean, config.image_std = list(self.vision.image_mean), list(self.vision.image_std)
        if config.num_image_tokens is None:
            with torch.no_grad():
                probe = torch.zeros(1, 3, config.vision.image_size, config.vision.image_size)
                config.num_image_tokens = self.vision.eval()(probe).shape[1]
        h = config.hidden_size
        # momentum=None: a cumulative average over every training batch, i.e. the training set's statistics
        self.vision_norm = (nn.BatchNorm1d(self.vision.out_dim, affine=False, momentum=None)
                            if config.vision.feature_norm else None)
        self.vision_proj = nn.Sequential(nn.Linear(self.vision.out_dim, h), nn.LayerNorm(h))
        self.text_proj = nn.Sequential(nn.Linear(self.text.out_dim, h), nn.LayerNorm(h))
        self.image_pos = nn.Parameter(torch.zeros(1, config.num_image_tokens, h))  # where each grid cell is
        nn.init.trunc_normal_(self.image_pos, std=0.02)
        self.fusion = FUSION_CLASSES[config.fusion](config)
        self.out_dim = self.fusion.out_dim

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values)  # (B, N, Dv)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text(input_ids, attention_mask)  # (B, T, Dt)

    def forward(
        self,
        pixel_values=None,
        input_ids=None,
        attention_mask=None,
        image_features=None,
        text_features=None,
        output_attentions: bool = False,
        image_index=None,
    ):
        """``image_index`` (B,), optional: question ``b`` is about image ``image_index[b]`` of ``pixel_values`` /
        ``image_features``, which then hold each distinct image once (the tower and projection run per image)."""
        if image_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or image_features")
            image_features = self.encode_image(pixel_values)
        if attention_mask is None:
            raise ValueError("attention_mask is required (the question's token mask)")
        if text_features is None:
            if input_ids is None:
                raise ValueError("pass input_ids or text_features")
            text_features = self.encode_text(input_ids, attention_mask)
        if image_features.shape[1] != self.image_pos.shape[1]:
            raise ValueError(
                f"the vision tower gave {image_features.shape[1]} tokens but the model was built for "
                f"{self.image_pos.shape[1]} (image_size={self.config.vision.image_size}); resize images to that size"
            )
        param_dtype = self.image_pos.dtype
        image_features = image_features.to(param_dtype)
        if self.vision_norm is not None:
            image_features = self.vision_norm(image_features.flatten(0, 1)).view_as(image_features)
        v = self.vision_proj(image_features) + self.image_pos  # (B, N, H)
        q = self.text_proj(text_features.to(param_dtype))  # (B, T, H)
        if getattr(self.fusion, "image_index_aware", False):
            return self.fusion(v, q, attention_mask, output_attentions=output_attentions, image_index=image_index)
        if image_index is not None:  # index_select: a cheaper backward than v[image_index] (see RelationalFusion)
            v = v.index_select(0, image_index)
        return self.fusion(v, q, attention_mask, output_attentions=output_attentions)


class TwoTowerForQuestionAnswering(nn.Module):
    """``TwoTowerModel`` + a classifier over the answer vocabulary (Teney et al.'s two-layer head).

    >>> cfg = TwoTowerConfig(VisionTowerConfig(image_size=64), fusion="gated", id2label={0: "yes", 1: "no"})
    >>> model = TwoTowerForQuestionAnswering(cfg)  # the packaged towers, loaded offline
    >>> ids = torch.tensor([[101, 2003, 2009, 2417, 1029, 102]])
    >>> model(pixel_values=torch.zeros(1, 3, 64, 64), input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape
    torch.Size([1, 2])
    """

    def __init__(self, config: TwoTowerConfig, pretrained_towers: bool = True, tower_dir: str | Path | None = None):
        super().__init__()
        if config.num_answers == 0:
            raise ValueError("config.id2label is empty: build the answer vocabulary first")
        self.config = config
        self.backbone = TwoTowerModel(config, pretrained_towers=pretrained_towers, tower_dir=tower_dir)
        d, h = self.backbone.out_dim, config.hidden_size
        self.classifier = nn.Sequential(
            nn.Linear(d, 2 * h), nn.GELU(), nn.LayerNorm(2 * h), nn.Dropout(config.dropout),
            nn.Linear(2 * h, config.num_answers),
        )  # fmt: skip

    def forward(self, output_attentions: bool = False, **inputs) -> VQAOutput:
        pooled, attentions = self.backbone(output_attentions=output_attentions, **inputs)
        return VQAOutput(logits=self.classifier(pooled), attentions=attentions)

    # -- checkpoint directory (HF style) -------------------------------------------------------------------------

    def save_pretrained(self, save_dir: str | Path, tokenizer=None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the towers' configs / tokenizer files."""
        from safetensors.torch import save_file

        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self.config.save_json(save_dir)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(save_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        if hasattr(self.backbone.vision, "config"):  # an HF vision tower: keep its architecture
            self.backbone.vision.config.save_pretrained(save_dir / "vision_tower")
        self.backbone.text.model.config.save_pretrained(save_dir / "text_tower")
        if tokenizer is not None:
            tokenizer.save_pretrained(save_dir / "text_tower")
        return save_dir

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, map_location: str = "cpu") -> "TwoTowerForQuestionAnswering":
        """Rebuild from a checkpoint directory; needs no training code and downloads nothing."""
        checkpoint_dir = Path(checkpoint_dir)
        config = TwoTowerConfig.from_json(checkpoint_dir)
        weights = checkpoint_dir / WEIGHTS_NAME
        state = load_weights(weights, device=map_location)  # before building: a damaged file fails fast
        model = cls(config, pretrained_towers=False, tower_dir=checkpoint_dir)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model.eval()


def _subdir(root, name):
    if root is None:
        return None
    path = Path(root) / name
    return str(path) if (path / CONFIG_NAME).is_file() else None


def vqa_loss(logits: torch.Tensor, soft_targets: torch.Tensor, labels: torch.Tensor, loss: str,
             focal_gamma: float = 0.0) -> torch.Tensor:
    """``bce``: BCE against soft scores, times the number of answers as in ban-vqa / ViLT
    (https://github.com/jnhwkim/ban-vqa/blob/master/train.py); ``ce``: cross-entropy on the majority
    answer (questions whose majority answer is out of vocabulary, label -100, are ignored).

    ``focal_gamma`` > 0 scales each term by how wrong it still is: ``(1 - p_label) ** gamma`` for ``ce`` (focal
    loss, Lin et al., 2017, https://arxiv.org/abs/1708.02002), ``|target - sigmoid| ** gamma`` for ``bce`` (its
    soft-target form, Li et al., 2020, https://arxiv.org/abs/2006.04388)."""
    if loss == "bce":
        if not focal_gamma:
            return F.binary_cross_entropy_with_logits(logits, soft_targets) * soft_targets.shape[1]
        terms = F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none")
        return (terms * (soft_targets - logits.sigmoid()).abs().pow(focal_gamma)).sum(1).mean()
    if loss == "ce":
        if not focal_gamma:
            return F.cross_entropy(logits, labels, ignore_index=-100)
        nll = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none")  # 0 where ignored
        return ((1 - (-nll).exp()).pow(focal_gamma) * nll).sum() / (labels != -100).sum().clamp(min=1)
    raise ValueError(f"loss={loss!r} is not one of {LOSSES}")

