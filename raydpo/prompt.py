"""The one prompt format of raydpo, used by every stage (SFT, generation, DPO, prediction).

A prompt is the instruction followed by the user's history as quoted titles; the response is
the next item's title in double quotes. Stages that talk to a chat model wrap the user message
with the model's chat template and end the response with the tokenizer's real EOS token (see
``raydpo.models``); nothing here appends a literal ``</s>``.
"""

from __future__ import annotations

from typing import Sequence

DEFAULT_INSTRUCTION = (
    "Given a list of books the user recently enjoys, please recommend a new book that the user may like"
)
HISTORY_LEAD = "The user has read: "
QUESTION = "Which book will the user read next? Answer with its title in double quotes."


def format_history(titles: Sequence[str]) -> str:
    return ", ".join(f'"{t}"' for t in titles)


def user_message(history_titles: Sequence[str], instruction: str | None = None) -> str:
    """The text of the user turn: instruction, quoted history, question."""
    return f"{instruction or DEFAULT_INSTRUCTION}\n{HISTORY_LEAD}{format_history(history_titles)}.\n{QUESTION}"


def response_text(title: str) -> str:
    """The assistant turn for an item: its title in double quotes (EOS is added by the tokenizer side)."""
    return f'"{title}"'
