"""Bundled config.json files of well-known MoE models, so they resolve with no network.

Each ``<org>--<name>.json`` holds the MoE-relevant fields of the Hub's ``config.json`` for ``<org>/<name>``, spelled as
the Hub spells them, plus ``_source`` (where the numbers come from) and optionally ``_aliases`` (other Hub ids with
the same config). Lookups ignore case, the org, and release suffixes such as ``-Instruct``, ``-Base``, ``-0324``.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

_DIR = Path(__file__).parent

# Release suffixes that do not change a model's MoE shape: chat/base variants, dated refreshes ("-0324", "-2507"),
# Mistral's "-v0.1". "-Thinking" is not here: Kimi-K2-Thinking is INT4, unlike Kimi-K2-Instruct.
_SUFFIX = re.compile(r"-(instruct|base|chat|hf|\d{4}|v0\.\d+)$")


def normalize(name: str) -> str:
    """The lookup key of a model name: lower case, no org, release suffixes stripped (a trailing ``-fp8`` is kept).

    Example:
        >>> normalize("Qwen/Qwen3-30B-A3B-Instruct-2507-FP8")
        'qwen3-30b-a3b-fp8'
        >>> normalize("mistralai/Mixtral-8x7B-Instruct-v0.1")
        'mixtral-8x7b'
    """
    key = name.strip().rstrip("/").rsplit("/", 1)[-1].lower()
    fp8 = key.endswith("-fp8")
    if fp8:
        key = key[: -len("-fp8")]
    while (stripped := _SUFFIX.sub("", key)) != key:
        key = stripped
    return key + ("-fp8" if fp8 else "")


@functools.lru_cache(maxsize=None)
def _entries() -> dict[str, dict[str, Any]]:
    entries = {}
    for path in sorted(_DIR.glob("*.json")):
        org, _, name = path.stem.partition("--")
        entries[f"{org}/{name}"] = json.loads(path.read_text())
    return entries


@functools.lru_cache(maxsize=None)
def _index() -> dict[str, tuple[str, frozenset[str]]]:
    """normalized name -> (model id, orgs that publish it)."""
    index: dict[str, tuple[str, frozenset[str]]] = {}
    for model_id, config in _entries().items():
        aliases = [model_id, *config.get("_aliases", [])]
        orgs = frozenset(alias.split("/")[0].lower() for alias in aliases if "/" in alias)
        for alias in aliases:
            key = normalize(alias)
            if key in index and index[key][0] != model_id:
                raise RuntimeError(f"catalogue names {index[key][0]} and {model_id} both normalize to {key!r}")
            index[key] = (model_id, orgs)
    return index


def model_ids() -> list[str]:
    """The Hub ids of the bundled models, sorted.

    Example:
        >>> "deepseek-ai/DeepSeek-V3" in model_ids()
        True
    """
    return sorted(_entries(), key=str.lower)


def lookup(model: str) -> tuple[str, dict[str, Any]] | None:
    """The bundled ``(model id, config)`` for ``model``, or None when it is not bundled.

    An org, when given, must be one that publishes the model, so ``someone/DeepSeek-V3`` (a fine-tune, maybe
    quantized differently) is not mistaken for DeepSeek's own.

    Example:
        >>> lookup("DeepSeek-V3-0324")[0]
        'deepseek-ai/DeepSeek-V3'
        >>> lookup("someone/DeepSeek-V3") is None
        True
    """
    org = model.strip().rsplit("/", 1)[0].lower() if "/" in model.strip().rstrip("/") else None
    hit = _index().get(normalize(model))
    if hit is None or (org is not None and org not in hit[1]):
        return None
    model_id, _ = hit
    return model_id, copy.deepcopy(_entries()[model_id])
