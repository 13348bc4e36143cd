"""The benchmarks' `--quantization` list and row names, shared by bench methods, quality, headlines and
quantization; torch-free, so a bench's argument checks run before anything heavy is imported."""
from __future__ import annotations

from typing import List, Type

from unipt_scale.config import QUANTIZATION_SCHEMES as SCHEMES


def parse_schemes(text: str, flag: str = "--quantization", error: Type[Exception] = ValueError) -> List[str]:
    """A comma list of quantization schemes, each once, in the order given; `error` carries the one-line message."""
    schemes = [q.strip() for q in text.split(",") if q.strip()]
    bad = [q for q in schemes if q not in SCHEMES]
    if bad or not schemes:
        raise error(f"{flag}: unknown {bad or 'empty list'}; choose from {', '.join(SCHEMES)}")
    if len(set(schemes)) != len(schemes):
        raise error(f"{flag} lists a scheme twice: {text}")
    return schemes


def label(name: str, scheme: str = "none") -> str:
    """The printed name of a (method, scheme) row: LoRA on a quantized base is QLoRA."""
    if scheme == "none":
        return name
    return f"{'QLoRA' if name == 'lora' else name}@{scheme}"
