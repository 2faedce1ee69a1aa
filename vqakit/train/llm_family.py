"""The vision-prefixed LLM family in training (LLaVA's two stages).

- stage 1 (``--train.text frozen``): the LM and the vision tower are frozen; only the projector (and the visual
  position embeddings) train. The frozen vision tower's outputs come from the feature cache.
- stage 2 (``--train.text lora --train.init_from <stage-1 checkpoint>``): the projector continues and LoRA adapters
  on the LM train too (``--train.lora_text.*``: rank, alpha, dropout, target_modules; default q_proj, v_proj).

``--train.vision full`` also fine-tunes the vision tower (slow on CPU; ``lora`` / ``partial`` are not offered
for this family).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from vqakit.data.answers import majority_answer
from vqakit.models.llm_prefix import NUM_DRAFT_ANSWERS, LLMPrefixConfig, LLMPrefixForQuestionAnswering
from vqakit.train.datamodule import VQADataset
from vqakit.train.recipes import count_parameters, wrap_lora

KEY = "llm"


def build(cfg: LLMPrefixConfig, train_examples, train):
    device = "cuda" if train.accelerator in ("gpu", "cuda", "auto") and _cuda() else "cpu"
    net = LLMPrefixForQuestionAnswering.build(cfg, device="cpu" if not cfg.load_in_4bit else device)
    if not cfg.draft_answers:  # decoding drafts: the most frequent training answers (saved in config.json)
        counts = Counter(majority_answer(e.answers) for e in train_examples)
        net.set_draft_answers([a for a, _ in counts.most_common(NUM_DRAFT_ANSWERS)])
    if train.init_from:
        _init_projector(net, Path(train.init_from))
    return net, net.processor


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _init_projector(net, checkpoint: Path) -> None:
    """Stage 2 starts from stage 1's projector."""
    from safetensors.torch import load_file

    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"--train.init_from={checkpoint}: {weights} not found")
    state = load_file(str(weights))
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.startswith(("projector.", "visual_pos"))]
    if missing or unexpected:
        raise ValueError(f"--train.init_from={checkpoint} does not match this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def dataset(examples, vocab, net, processor, train, data):
    """Images through the feature cache when the vision tower is frozen; questions raw (the LM reads them)."""
    kwargs = {}
    if train.vision == "frozen":
        root = None if data.cache_dir is None else Path(data.cache_dir) / "features"
        kwargs["image_cache"], kwargs["image_keys"] = net.cache_image_features(
            processor, [e.image for e in examples], root, progress=train.progress)
    return VQADataset(examples, vocab, processor, **kwargs)


def apply_strategies(net, train):
    if train.vision not in ("frozen", "full"):
        raise ValueError(f"--train.vision={train.vision!r}: the LLM-prefix family supports 'frozen' or 'full'")
    if train.text not in ("frozen", "lora"):
        raise ValueError(f"--train.text={train.text!r}: for the LLM-prefix family 'text' is the LM: 'frozen' "
                         f"(stage 1, projector only) or 'lora' (stage 2)")
    net.vision.requires_grad_(train.vision == "full")
    net.lm.requires_grad_(False)
    if train.text == "lora":
        targets = train.lora_text.target_modules or ["q_proj", "v_proj"]
        try:
            net.lm = wrap_lora(net.lm, train.lora_text, targets, task_type="CAUSAL_LM")
        except ValueError as err:
            raise ValueError(f"--train.lora_text.target_modules={targets} do not match the LM "
                             f"{type(net.lm).__name__}: {err}") from err
    return count_parameters(net)


def save(net, processor, ckpt) -> None:
    net.save_pretrained(ckpt)  # the projector is saved in float32; the LM is not copied
