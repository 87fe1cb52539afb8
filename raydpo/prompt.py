"""The one prompt format of raydpo, used by every stage (SFT, generation, DPO, prediction).

A prompt is the instruction followed by the user's history as quoted titles; the response is
the next item's title in double quotes. Stages that talk to a chat model wrap the user message
with the model's chat template and end the response with the tokenizer's real EOS token (see
``raydpo.models``); nothing here appends a literal ``</s>``.

User text (titles, the instruction) is data, never markup: a title holding the model's control
tokens (``<|im_end|>`` then ``<|im_start|>system``) is tokenised as ordinary characters
(``split_special_tokens``), so a poisoned catalog or preference file cannot forge chat turns. Only
the chat template's own control tokens are encoded as control tokens (:func:`encode_prompt`).
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


_SENTINEL = "\u0000raydpo-user-message\u0000"


def special_token_strings(tokenizer) -> tuple[str, ...]:
    """The text forms of the tokenizer's special (control) tokens."""
    cached = getattr(tokenizer, "_raydpo_special_strings", None)
    if cached is not None:
        return cached
    found = set(getattr(tokenizer, "all_special_tokens", None) or ())
    try:
        for t in tokenizer.added_tokens_decoder.values():
            if getattr(t, "special", False):
                found.add(str(t.content))
    except (AttributeError, TypeError):
        pass
    out = tuple(sorted(t for t in found if t))
    try:
        tokenizer._raydpo_special_strings = out
    except (AttributeError, TypeError):  # pragma: no cover - a tokenizer that refuses attributes
        pass
    return out


def has_special_tokens(tokenizer, text: str) -> bool:
    """Whether ``text`` holds the text form of one of the tokenizer's control tokens."""
    return any(t in text for t in special_token_strings(tokenizer))


def encode_user_text(tokenizer, text: str) -> list[int]:
    """User-controlled text as ordinary tokens: control-token strings in it are split into plain text."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def _template_frame(tokenizer) -> tuple[str, str] | None:
    """``(prefix, suffix)`` the prompt template puts around a user message (None if the template
    does not keep the message verbatim)."""
    key = getattr(tokenizer, "chat_template", None)
    cached = getattr(tokenizer, "_raydpo_template_frame", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    rendered = render_user_message(tokenizer, _SENTINEL)
    frame = tuple(rendered.split(_SENTINEL)) if rendered.count(_SENTINEL) == 1 else None
    try:
        tokenizer._raydpo_template_frame = (key, frame)
    except (AttributeError, TypeError):  # pragma: no cover
        pass
    return frame


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids (the template already holds any BOS/special tokens).

    The template's own control tokens are encoded as control tokens; the user message inside it
    is encoded as ordinary text (a control-token string in a title stays text). A prompt whose
    message holds no control-token string is encoded exactly as before, in one piece."""
    whole = lambda: tokenizer(prompt, add_special_tokens=False)["input_ids"]  # noqa: E731
    if not has_special_tokens(tokenizer, prompt):
        return whole()
    frame = _template_frame(tokenizer)
    if frame is None:
        return whole()
    prefix, suffix = frame
    if not (prompt.startswith(prefix) and prompt.endswith(suffix) and len(prompt) >= len(prefix) + len(suffix)):
        return whole()
    message = prompt[len(prefix): len(prompt) - len(suffix)]
    if not has_special_tokens(tokenizer, message):
        return whole()
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"] if t else []  # noqa: E731
    return enc(prefix) + encode_user_text(tokenizer, message) + enc(suffix)


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
    return encode_user_text(tokenizer, text) + [tokenizer.eos_token_id]
