"""Callables for llm_sdxl_tts.yaml.  Each receives the leased model object and the
previous step's output; what it returns is the next step's input."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Any

OUT = Path("chain-output")


def render_image(pipe: Any, prompt: str) -> str:
    """A diffusers pipeline: paint ``prompt``, save the PNG, pass the prompt on."""
    OUT.mkdir(exist_ok=True)
    image = pipe(prompt, num_inference_steps=25).images[0]
    path = OUT / "image.png"
    image.save(path)
    return prompt


def load_tts() -> Any:
    """Factory for the TTS model (the torch provider's ``kind: factory``).  Swap in your own
    (Qwen3-TTS, GPT-SoVITS); this one uses transformers' text-to-speech pipeline."""
    from transformers import pipeline

    return pipeline("text-to-speech", model="suno/bark-small")


def speak(tts: Any, text: str) -> str:
    """Read ``text`` aloud into a WAV file; returns its path."""
    import numpy as np

    OUT.mkdir(exist_ok=True)
    speech = tts(text)
    audio = (np.clip(speech["audio"].squeeze(), -1, 1) * 32767).astype("int16")
    path = OUT / "speech.wav"
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(int(speech["sampling_rate"]))
        f.writeframes(audio.tobytes())
    return str(path)
