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


# --- rendering for a tokenizer -------------------------------------------------------------------

FALLBACK_ASSISTANT_TAG = "\nAnswer: "


def chat_messages(history_titles: Sequence[str], instruction: str | None = None) -> list[dict]:
    return [{"role": "user", "content": user_message(history_titles, instruction)}]


def render_user_message(tokenizer, message: str) -> str:
    """A user message as a full prompt string: the model's chat template (with the assistant turn
    opened) when it has one, else the message followed by ``Answer: ``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                             add_generation_prompt=True)
    return message + FALLBACK_ASSISTANT_TAG


def render_prompt(tokenizer, history_titles: Sequence[str], instruction: str | None = None) -> str:
    """The full prompt string for a history (see :func:`render_user_message`)."""
    return render_user_message(tokenizer, user_message(history_titles, instruction))


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids (the template already holds any BOS/special tokens)."""
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_response(tokenizer, title: str) -> list[int]:
    """Response token ids: the quoted title, tokenised on its own, then the real EOS id.

    Every stage tokenises prompt and response separately and concatenates the ids, so a title
    has the same tokens in SFT, in the candidate trie, in DPO and at prediction time.
    """
    return encode_response_text(tokenizer, response_text(title))


def encode_response_text(tokenizer, text: str) -> list[int]:
    """A response text (e.g. ``'"Title"'``) tokenised on its own, then the real EOS id."""
    if tokenizer.eos_token_id is None:
        from .errors import RaydpoError

        raise RaydpoError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token")
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
