"""Passages are data, not instructions: neutralising prompt-injection text in retrieved passages.

A retrieved document can carry text aimed at the model rather than the reader ("ignore previous
instructions", a fake ``system:`` turn, chat-template tokens such as ``<|im_start|>``). Fencing
the passages as quoted material and telling the model to ignore instructions inside them
(:mod:`ragops.retrieval.prompts`) is the first defence; a 135M model does not reliably obey
that, so this module is the second:

* chat-template and special-token markup is escaped (``<|im_start|>`` → ``<｜im_start｜>``):
  tokenizers parse special tokens inside plain text, so unescaped they would open a real turn;
* a sentence that addresses the model with instructions is replaced by a marker. It has no
  value as evidence, and removing it is the only defence that does not depend on the model
  resisting it;
* the passage is flagged (``Passage.flags``) so the response can show which sources were
  tampered with.

The patterns aim at instructions to an assistant, not at documentation that mentions
instructions (a README saying "follow the instructions below" is not flagged).
"""

from __future__ import annotations

import re
from dataclasses import replace

from ragops.retrieval.prompts import Passage

#: What replaces a removed instruction-like sentence.
REDACTED = "[instruction-like text removed]"

#: Special-token markup of common chat templates (ChatML, Llama 2/3, Mistral, Gemma, Phi).
_TEMPLATE_TOKEN = re.compile(
    r"<\|[^|<>\n]{1,40}\|>|</?s>|\[/?INST\]|<<\s*/?SYS\s*>>|<\s*/?(?:start_of_turn|end_of_turn)\s*>",
    re.IGNORECASE,
)

_INSTRUCTION_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("override", re.compile(
        r"\b(?:ignore|disregard|forget|override|bypass)\b[^.!?\n]{0,40}\b(?:previous|prior|above|earlier|all|any|your|the system)\b"
        r"[^.!?\n]{0,30}\b(?:instructions?|prompts?|rules|directions|guidelines|context)\b", re.IGNORECASE)),
    ("prompt-leak", re.compile(
        r"\b(?:reveal|print|show|repeat|output|display|tell me|leak)\b[^.!?\n]{0,30}\b(?:system prompt|system message|"
        r"hidden (?:prompt|instructions)|your (?:prompt|instructions))\b", re.IGNORECASE)),
    ("role-play", re.compile(
        r"\b(?:you are now|from now on,? you|act as (?:an?|the) (?:ai|assistant|model|chatbot)|new instructions\s*:)", re.IGNORECASE)),
    ("address", re.compile(
        r"\b(?:AI|language model|LLM|assistant|chatbot)s?\b[^.!?\n]{0,20}\b(?:must|should|shall)\s+(?:now\s+)?"
        r"(?:reply|respond|answer|say|output|ignore)\b", re.IGNORECASE)),
)
_ROLE_MARKER = re.compile(r"^\s*(?:system|assistant|user|human|developer)\s*:", re.IGNORECASE | re.MULTILINE)
_SENTENCE = re.compile(r"[^.!?\n]*(?:[.!?]+|\n|$)")


def escape_template_tokens(text: str) -> str:
    """``text`` with chat-template markup made inert (full-width bars/brackets, same look)."""

    def esc(m: re.Match[str]) -> str:
        return m.group(0).replace("|", "｜").replace("<", "‹").replace(">", "›").replace("[", "［").replace("]", "］")

    return _TEMPLATE_TOKEN.sub(esc, text)


def instruction_kinds(text: str) -> list[str]:
    """The kinds of instruction-like text found in ``text`` (empty when none)."""
    kinds = [kind for kind, pattern in _INSTRUCTION_PATTERNS if pattern.search(text)]
    if _ROLE_MARKER.search(text):
        kinds.append("role-marker")
    return kinds


def neutralize(passage: Passage) -> Passage:
    """The passage with template tokens escaped and instruction-like sentences removed.

    ``flags`` lists what was found: ``template-token``, ``override``, ``prompt-leak``,
    ``role-play``, ``address``, ``role-marker``. A clean passage is returned unchanged.
    """
    flags: list[str] = []
    text = passage.text
    if _TEMPLATE_TOKEN.search(text):
        flags.append("template-token")
        text = escape_template_tokens(text)
    if instruction_kinds(text):
        kept = []
        for m in _SENTENCE.finditer(text):
            sentence = m.group(0)
            if not sentence:
                continue
            found = instruction_kinds(sentence)
            if found:
                flags += [k for k in found if k not in flags]
                lead = sentence[: len(sentence) - len(sentence.lstrip())]
                trail = "\n" if sentence.endswith("\n") else ""
                kept.append(lead + REDACTED + trail)
            else:
                kept.append(sentence)
        text = "".join(kept).strip()
    if not flags:
        return passage
    return replace(passage, text=text, flags=tuple(dict.fromkeys([*passage.flags, *flags])))
