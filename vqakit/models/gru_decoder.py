"""Two towers + fusion + a word-level GRU decoder: free-text answers instead of a fixed answer list.

References:
- Cho et al., 2014, "Learning Phrase Representations using RNN Encoder-Decoder"
  (https://arxiv.org/abs/1406.1078): the GRU, and a decoder whose initial state is the encoder summary.
- Sutskever et al., 2014, "Sequence to Sequence Learning with Neural Networks" (https://arxiv.org/abs/1409.3215):
  teacher forcing during training, beam search at inference.
- Malinowski et al., 2015, "Ask Your Neurons" (https://arxiv.org/abs/1505.01121): VQA answers generated word
  by word from an image+question encoding.
- Wu et al., 2016, GNMT (https://arxiv.org/abs/1609.08144): the beam-search length penalty ``((5 + n) / 6) ** a``.

The image+question vector of :class:`~vqakit.models.two_tower.TwoTowerModel` (``gated`` fusion by default,
seed 003) initialises the GRU's hidden state and is also fed to it at every step, next to the embedding of
the previous word. Answers are normalised (the official VQA normalisation) and split on spaces; the word
vocabulary, the decoding settings (greedy or beam, beams, length penalty, maximum length) and the tower
settings are all in ``config.json``, so a checkpoint decodes the same way wherever it is evaluated.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from vqakit.models.checkpoint import ConfigMixin, as_config, nest_tower_keys
from vqakit.models.checkpoint_files import load_weights
from vqakit.data.answers import normalize_answer
from vqakit.models.two_tower import FUSIONS, Fusion, TwoTowerConfig, TwoTowerModel
from vqakit.towers.text import TextTowerConfig
from vqakit.towers.vision import VisionTowerConfig

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
Decoding = Literal["greedy", "beam"]
DECODINGS = get_args(Decoding)
WEIGHTS_NAME = "model.safetensors"


@dataclass
class GRUDecoderConfig(ConfigMixin):
    """A two-tower encoder and a GRU answer decoder (saved as ``config.json`` with ``model_type: gru_decoder``).

    The encoder is a :class:`~vqakit.models.two_tower.TwoTowerModel` of the same tower configs and fusion settings
    (:meth:`backbone_config`).

    Args:
        vision: the vision tower and its options, as :class:`~vqakit.models.two_tower.TwoTowerConfig`'s (default
            here: 64 px, multi-scale features); ``--gru.vision.image_size 64`` on the command line.
        text: the text tower and its options, as :class:`~vqakit.models.two_tower.TwoTowerConfig`'s
            (``max_length``: questions are truncated to this many tokens; ``pooler``: how ``concat``/``gated``
            pool question tokens).
        fusion: how image and question meet: ``gated`` (seed 003), ``concat`` or ``cross-attention``.
        hidden_size: width of the fusion layers and of the GRU.
        num_fusion_layers: co-attention layers (``cross-attention`` only).
        num_heads: attention heads per fusion layer.
        mlp_ratio: width of the fusion MLPs, as a multiple of ``hidden_size``.
        dropout: dropout in the fusion layers and on the decoder's inputs.
        word_embed_dim: size of the answer word embeddings.
        num_decoder_layers: stacked GRU layers.
        max_answer_length: the most words a generated answer has (without ``<eos>``).
        decoding: ``greedy`` or ``beam``.
        num_beams: beams of ``beam`` decoding.
        length_penalty: GNMT length-penalty exponent of ``beam`` decoding (0: none).
        vocab: answer words, index = word id; the first four are ``<pad> <bos> <eos> <unk>`` (from the data).
        image_mean: per-channel pixel mean (filled from the vision tower).
        image_std: per-channel pixel std (filled from the vision tower).
        num_image_tokens: tokens the vision tower yields at ``vision.image_size`` (filled when built).

    A ``config.json`` or YAML recipe with the earlier flat tower fields (``vision_tower``, ``image_size``,
    ``vision_multiscale``, ``text_tower``, ``max_question_length``, ``text_pooler``) is read through :meth:`upgrade`.
    """

    vision: VisionTowerConfig = field(default_factory=lambda: VisionTowerConfig(image_size=64, multiscale=True))
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    fusion: Fusion = "gated"
    hidden_size: int = 256
    num_fusion_layers: int = 1
    num_heads: int = 4
    mlp_ratio: int = 2
    dropout: float = 0.1
    word_embed_dim: int = 128
    num_decoder_layers: int = 1
    max_answer_length: int = 6
    decoding: Decoding = "greedy"
    num_beams: int = 3
    length_penalty: float = 0.0
    vocab: list[str] = field(default_factory=list)
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    num_image_tokens: int | None = None

    model_type = "gru_decoder"

    def __post_init__(self):
        self.vision = as_config(self.vision, VisionTowerConfig, "--gru.vision")
        self.text = as_config(self.text, TextTowerConfig, "--gru.text")
        if self.fusion not in FUSIONS:
            raise ValueError(f"--gru.fusion={self.fusion!r} is not one of {FUSIONS}")
        if self.decoding not in DECODINGS:
            raise ValueError(f"--gru.decoding={self.decoding!r} is not one of {DECODINGS}")
        if self.num_beams < 1:
            raise ValueError(f"--gru.num_beams={self.num_beams} must be at least 1")
        if self.max_answer_length < 1:
            raise ValueError(f"--gru.max_answer_length={self.max_answer_length} must be at least 1")
        if self.vocab and tuple(self.vocab[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"config vocab must start with {list(SPECIALS)}, got {self.vocab[:4]}")

    def backbone_config(self) -> TwoTowerConfig:
        """The encoder's settings as a :class:`TwoTowerConfig` (its towers, fusion and sizes)."""
        keep = {f.name for f in fields(TwoTowerConfig)} & {f.name for f in fields(self)}
        return TwoTowerConfig(**{k: getattr(self, k) for k in keep})

    @classmethod
    def upgrade_keys(cls, d: dict) -> dict:
        """The flat tower fields of ``d`` (a ``config.json`` or a YAML recipe's ``gru`` section) moved into
        ``vision`` / ``text``."""
        return nest_tower_keys(d)


def answer_words(answer: str) -> list[str]:
    """The words of an answer after the official normalisation.

    >>> answer_words("The Red  circle."), answer_words("two")
    (['red', 'circle'], ['2'])
    """
    return normalize_answer(answer).split()


def build_word_vocab(answers: list[str], min_count: int = 1) -> list[str]:
    """Special tokens, then answer words by frequency (ties alphabetical).

    >>> build_word_vocab(["red circle", "circle", "yes"])
    ['<pad>', '<bos>', '<eos>', '<unk>', 'circle', 'red', 'yes']
    """
    counts = Counter(w for a in answers for w in answer_words(a))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return [*SPECIALS, *words]


@dataclass
class GRUDecoderOutput:
    """logits (B, L, V) of the next word at each position; loss: mean token cross-entropy when labels are given."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    answer_exact: torch.Tensor | None = None  # (B,) every target word (and <eos>) is the argmax


class GRUDecoderForQuestionAnswering(nn.Module):
    """Encoder (towers + fusion) -> GRU decoder over answer words.

    >>> cfg = GRUDecoderConfig(vocab=build_word_vocab(["yes", "no"]))  # 64 px images
    >>> model = GRUDecoderForQuestionAnswering(cfg).eval()  # the packaged towers, loaded offline
    >>> ids = torch.tensor([[101, 2003, 2009, 2417, 1029, 102]])
    >>> len(model.generate(pixel_values=torch.zeros(1, 3, 64, 64), input_ids=ids,
    ...                    attention_mask=torch.ones_like(ids)))
    1
    """

    def __init__(self, config: GRUDecoderConfig, pretrained_towers: bool = True, tower_dir: str | Path | None = None):
        super().__init__()
        if len(config.vocab) <= len(SPECIALS):
            raise ValueError("config.vocab has no answer words: build the word vocabulary first")
        self.config = config
        backbone_cfg = config.backbone_config()
        self.backbone = TwoTowerModel(backbone_cfg, pretrained_towers=pretrained_towers, tower_dir=tower_dir)
        config.image_mean, config.image_std = backbone_cfg.image_mean, backbone_cfg.image_std
        config.num_image_tokens = backbone_cfg.num_image_tokens
        self.word2id = {w: i for i, w in enumerate(config.vocab)}
        d, h, V = self.backbone.out_dim, config.hidden_size, len(config.vocab)
        self.embed = nn.Embedding(V, config.word_embed_dim, padding_idx=0)
        self.init_state = nn.Sequential(nn.Linear(d, config.num_decoder_layers * h), nn.Tanh())
        self.gru = nn.GRU(config.word_embed_dim + d, h, num_layers=config.num_decoder_layers, batch_first=True)
        self.drop = nn.Dropout(config.dropout)
        self.lm_head = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, V))

    # -- words <-> ids -----------------------------------------------------------------------------------------

    def encode_answers(self, answers: list[str]) -> torch.Tensor:
        """Answers -> (B, L+1) word ids ``<bos> w1 .. wn <eos>`` right-padded with ``<pad>`` (truncated to
        ``max_answer_length`` words)."""
        unk, n = self.word2id[UNK], self.config.max_answer_length
        seqs = [[self.word2id[BOS], *(self.word2id.get(w, unk) for w in answer_words(a)[:n]), self.word2id[EOS]]
                for a in answers]
        out = torch.zeros(len(seqs), max(map(len, seqs)), dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s)
        return out

    def decode_ids(self, ids: list[int]) -> str:
        words = []
        for i in ids:
            if i == self.word2id[EOS]:
                break
            if i not in (self.word2id[PAD], self.word2id[BOS]):
                words.append(self.config.vocab[i])
        return " ".join(words)

    # -- model -------------------------------------------------------------------------------------------------

    def encode(self, **inputs) -> torch.Tensor:
        """Image + question -> the fused vector (B, D)."""
        pooled, _ = self.backbone(**inputs)
        return pooled

    def _initial_hidden(self, ctx: torch.Tensor) -> torch.Tensor:
        L, h = self.config.num_decoder_layers, self.config.hidden_size
        return self.init_state(ctx).view(-1, L, h).transpose(0, 1).contiguous()  # (L, B, H)

    def _step(self, words: torch.Tensor, ctx: torch.Tensor, hidden: torch.Tensor):
        """words (B, T), ctx (B, D), hidden (L, B, H) -> logits (B, T, V), hidden."""
        x = torch.cat([self.embed(words), ctx.unsqueeze(1).expand(-1, words.shape[1], -1)], dim=-1)
        out, hidden = self.gru(self.drop(x), hidden)
        return self.lm_head(out), hidden

    def forward(self, answers: list[str] | None = None, answer_ids: torch.Tensor | None = None,
                **inputs) -> GRUDecoderOutput:
        """Teacher forcing on ``answers`` (text) or ``answer_ids`` (B, L+1) from :meth:`encode_answers`:
        predicts ids[1:] from ids[:-1]."""
        if answer_ids is None:
            if answers is None:
                raise ValueError("pass answers (text) or answer_ids")
            answer_ids = self.encode_answers(answers)
        ctx = self.encode(**inputs)  # (B, D)
        answer_ids = answer_ids.to(ctx.device)
        logits, _ = self._step(answer_ids[:, :-1], ctx, self._initial_hidden(ctx))  # (B, L, V)
        targets = answer_ids[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=0)
        exact = ((logits.argmax(-1) == targets) | (targets == 0)).all(1)
        return GRUDecoderOutput(logits=logits, loss=loss, answer_exact=exact)

    def pretrained_modules(self) -> list[nn.Module]:
        """The pretrained towers (their own learning rate when they train)."""
        return [self.backbone.vision, self.backbone.text]

    @torch.no_grad()
    def generate(self, decoding: str | None = None, num_beams: int | None = None, max_answer_length: int | None = None,
                 **inputs) -> list[tuple[str, float]]:
        """Decode one answer per question: ``[(answer, probability of the word sequence incl. <eos>), ...]``.

        Settings default to the checkpoint's (``config.decoding`` / ``num_beams`` / ``max_answer_length``).
        """
        decoding = decoding or self.config.decoding
        if decoding not in DECODINGS:
            raise ValueError(f"decoding={decoding!r} is not one of {DECODINGS}")
        n = max_answer_length or self.config.max_answer_length
        ctx = self.encode(**inputs)
        if decoding == "greedy":
            return self._greedy(ctx, n)
        return self._beam(ctx, num_beams or self.config.num_beams, n)

    def _greedy(self, ctx: torch.Tensor, n: int) -> list[tuple[str, float]]:
        B, eos = ctx.shape[0], self.word2id[EOS]
        hidden = self._initial_hidden(ctx)
        words = torch.full((B, 1), self.word2id[BOS], dtype=torch.long, device=ctx.device)
        logp = torch.zeros(B, device=ctx.device)
        done = torch.zeros(B, dtype=torch.bool, device=ctx.device)
        out = []
        for step in range(n + 1):
            logits, hidden = self._step(words, ctx, hidden)
            lp = logits[:, -1].float().log_softmax(-1)
            if step == n:  # the length limit: end here
                nxt = torch.full((B,), eos, dtype=torch.long, device=ctx.device)
            else:
                lp[:, self.word2id[PAD]] = lp[:, self.word2id[BOS]] = -float("inf")
                nxt = lp.argmax(-1)
            logp = logp + torch.where(done, torch.zeros_like(logp), lp.gather(1, nxt[:, None]).squeeze(1))
            out.append(nxt)
            done = done | (nxt == eos)
            words = nxt[:, None]
            if bool(done.all()):
                break
        ids = torch.stack(out, 1).tolist()
        return [(self.decode_ids(seq), float(p)) for seq, p in zip(ids, logp.exp().tolist())]

    def _beam(self, ctx: torch.Tensor, K: int, n: int) -> list[tuple[str, float]]:
        """Beam search, batched over questions x beams; finished hypotheses ranked by GNMT-penalised log-prob."""
        B, V, eos = ctx.shape[0], len(self.config.vocab), self.word2id[EOS]
        ctx_k = ctx.repeat_interleave(K, 0)  # (B*K, D)
        hidden = self._initial_hidden(ctx_k)
        words = torch.full((B * K, 1), self.word2id[BOS], dtype=torch.long, device=ctx.device)
        scores = torch.full((B, K), -float("inf"), device=ctx.device)
        scores[:, 0] = 0.0  # all beams start identical: keep one
        seqs = torch.zeros(B, K, 0, dtype=torch.long, device=ctx.device)
        finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(B)]
        done = [False] * B
        alpha = self.config.length_penalty

        def penalty(length: int) -> float:
            return ((5 + length) / 6) ** alpha

        for step in range(n + 1):
            logits, hidden = self._step(words, ctx_k, hidden)
            lp = logits[:, -1].float().log_softmax(-1).view(B, K, V)
            lp[..., self.word2id[PAD]] = lp[..., self.word2id[BOS]] = -float("inf")
            if step == n:  # the length limit: only <eos> may follow
                keep = lp[..., eos].clone()
                lp.fill_(-float("inf"))
                lp[..., eos] = keep
            total = (scores.unsqueeze(-1) + lp).view(B, K * V)
            top, idx = total.topk(2 * K, dim=-1)  # 2K: room for K live beams after some end
            beam, word = idx // V, idx % V
            new_scores = torch.full((B, K), -float("inf"), device=ctx.device)
            new_beam = torch.zeros(B, K, dtype=torch.long, device=ctx.device)
            new_word = torch.full((B, K), self.word2id[PAD], dtype=torch.long, device=ctx.device)
            for b in range(B):
                if done[b]:
                    continue
                live = 0
                for j in range(2 * K):
                    s = float(top[b, j])
                    if s == -float("inf") or live == K:
                        break
                    if int(word[b, j]) == eos:
                        seq = seqs[b, int(beam[b, j])].tolist()
                        finished[b].append((s / penalty(len(seq) + 1), s, seq))
                    else:
                        new_scores[b, live], new_beam[b, live], new_word[b, live] = s, beam[b, j], word[b, j]
                        live += 1
                # done when K hypotheses have ended and no live beam can still beat the K-th best: log-probs
                # only fall as words are added, and the largest length penalty bounds the normalised score
                if len(finished[b]) >= K:
                    kth = sorted((f[0] for f in finished[b]), reverse=True)[K - 1]
                    best_live = float(new_scores[b].max())
                    done[b] = best_live == -float("inf") or kth >= best_live / (penalty(n + 1) if best_live < 0 else 1)
            if all(done) or step == n:
                break
            flat = (new_beam + torch.arange(B, device=ctx.device)[:, None] * K).view(-1)
            hidden = hidden[:, flat]
            seqs = torch.cat([seqs[torch.arange(B)[:, None], new_beam], new_word.unsqueeze(-1)], dim=-1)
            scores, words = new_scores, new_word.view(-1, 1)
        results = []
        for b in range(B):
            ranked, logprob, seq = max(finished[b], key=lambda f: f[0]) if finished[b] else (0.0, -float("inf"), [])
            results.append((self.decode_ids(seq), float(torch.tensor(logprob).exp())))
        return results

    # -- serving helpers (used by vqakit.inference.generative.GenerativePredictor) -------------------------------------------

    def decoding_settings(self) -> dict:
        c = self.config
        return {"decoding": c.decoding, "num_beams": c.num_beams, "length_penalty": c.length_penalty,
                "max_answer_length": c.max_answer_length}

    def answer_image(self, processor, image, questions: list[str], device="cpu", **generate_kwargs):
        """One image, several questions: the image is encoded once."""
        return self.answer_images(processor, processor.images([image]), [questions], device, **generate_kwargs)[0]

    def answer_images(self, processor, pixel_values: torch.Tensor, questions: list[list[str]], device="cpu",
                      **generate_kwargs) -> list[list[tuple[str, float]]]:
        """Images (B, 3, S, S) with ``questions[i]`` about image i, decoded in one batch; each image is encoded once."""
        image_features = self.backbone.encode_image(pixel_values.to(device))  # (B, N, D)
        index = torch.tensor([i for i, qs in enumerate(questions) for _ in qs], device=image_features.device)
        text = {k: v.to(device) for k, v in processor.text([q for qs in questions for q in qs]).items()}
        flat = self.generate(image_features=image_features[index], **text, **generate_kwargs)
        return _per_image(flat, questions)

    def batch_inputs(self, processor, examples, use_cache: bool = True, cache_dir=None, progress: bool = True):
        """``(start, end) -> model inputs`` over ``examples``; towers' outputs through the feature cache."""
        questions, paths = [e.question for e in examples], [e.image for e in examples]
        if not use_cache:
            return lambda s, e: {"pixel_values": processor.images(paths[s:e]), **processor.text(questions[s:e])}
        from vqakit.data.features import cache_image_features, cache_text_features

        icache, ikeys = cache_image_features(self, processor, paths, cache_dir, progress=progress)
        tcache, tkeys = cache_text_features(self, processor, questions, cache_dir, progress=progress)

        def inputs(s, e):
            mask = torch.from_numpy(tcache.gather(tkeys[s:e], "mask")).long()
            length = int(mask.sum(1).max())
            return {"image_features": torch.from_numpy(icache.gather(ikeys[s:e], "tokens")),
                    "text_features": torch.from_numpy(tcache.gather(tkeys[s:e], "states"))[:, :length],
                    "attention_mask": mask[:, :length]}

        return inputs

    # -- checkpoint directory (HF style) -------------------------------------------------------------------------

    def save_pretrained(self, save_dir: str | Path, tokenizer=None) -> Path:
        """Write ``config.json``, ``model.safetensors`` and the towers' configs / tokenizer files."""
        from safetensors.torch import save_file

        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self.config.save_json(save_dir)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(save_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        if hasattr(self.backbone.vision, "config"):
            self.backbone.vision.config.save_pretrained(save_dir / "vision_tower")
        self.backbone.text.model.config.save_pretrained(save_dir / "text_tower")
        if tokenizer is not None:
            tokenizer.save_pretrained(save_dir / "text_tower")
        return save_dir

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, map_location: str = "cpu") -> "GRUDecoderForQuestionAnswering":
        """Rebuild from a checkpoint directory; needs no training code and downloads nothing."""
        checkpoint_dir = Path(checkpoint_dir)
        config = GRUDecoderConfig.from_json(checkpoint_dir)
        model = cls(config, pretrained_towers=False, tower_dir=checkpoint_dir)
        weights = checkpoint_dir / WEIGHTS_NAME
        missing, unexpected = model.load_state_dict(load_weights(weights, device=map_location), strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return model.eval()


def _per_image(flat: list, questions: list[list[str]]) -> list[list]:
    """Split answers to the flattened questions back into one list per image."""
    out, k = [], 0
    for qs in questions:
        out.append(flat[k : k + len(qs)])
        k += len(qs)
    return out
