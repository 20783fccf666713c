r"""Reading completions as the built-in rewards see them: the answer text of a completion and its `\boxed{}` answers.

TRL hands reward functions either plain strings (standard datasets) or message lists (conversational datasets:
`[{"role": "assistant", "content": ...}]`, possibly several messages when tools are called). `split_completion`
turns either into `(reasoning, content)`: `content` is the text of the last assistant message, `reasoning` the
thinking that a chat-template response parser split off into `reasoning_content` / `thinking` (None when nothing
was split off, as for plain strings: the reasoning then stays inside `content`).

`boxed_spans` finds the balanced `\boxed{...}` groups of a text in one linear pass (escaped braces `\{ \}` do not
count, a `\boxed{}` nested in another is part of the outer one, an unclosed one is ignored), so that 100 kB of
adversarial text costs milliseconds, never a regex blow-up. Nothing here parses mathematics: that happens only in
the verifier worker processes (`h1rl.rewards.accuracy`).
"""

from __future__ import annotations

import re
from typing import Any

_BOXED_OPEN = "\\boxed{"
# One token per match: a `\boxed{` opener, any other escaped character (`\{`, `\}`, `\\`, ...), or a bare brace.
_TOKENS = re.compile(r"\\boxed\{|\\.|[{}]", re.DOTALL)


def split_completion(completion: str | list[dict[str, Any]], index: int | None = None) -> tuple[str | None, str]:
    r"""Return `(reasoning, content)` of one completion: a string, or a list of chat messages as TRL passes them.

    `index` only improves the error message for a malformed completion.

    >>> split_completion("<think>hm</think> \\boxed{2}")
    (None, '<think>hm</think> \\boxed{2}')
    >>> split_completion([{"role": "assistant", "content": "\\boxed{2}", "reasoning_content": "1+1"}])
    ('1+1', '\\boxed{2}')
    """
    if isinstance(completion, str):
        return None, completion
    where = "completion" if index is None else f"completion {index}"
    if not isinstance(completion, list) or not all(isinstance(m, dict) for m in completion):
        raise TypeError(
            f"{where} is a {type(completion).__name__}; expected a string or a list of chat messages "
            '([{"role": "assistant", "content": ...}])'
        )
    assistant = [m for m in completion if m.get("role", "assistant") == "assistant"]
    if not assistant:
        return None, ""
    message = assistant[-1]
    reasoning = message.get("reasoning_content") or message.get("thinking") or None
    return reasoning, _text_of(message.get("content"), where)


def _text_of(content: Any, where: str) -> str:
    if content is None:  # e.g. an assistant message that only calls tools
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal content parts: [{"type": "text", "text": ...}, ...]
        parts = [part for part in content if isinstance(part, dict) and part.get("type") == "text"]
        return "".join(part.get("text", "") for part in parts)
    raise TypeError(f"{where}: message content is a {type(content).__name__}; expected a string or content parts")


def boxed_spans(text: str) -> list[tuple[int, int]]:
    r"""`(start, end)` of every outermost balanced `\boxed{...}` in `text`, in order (`text[start:end]` is the group).

    >>> text = "a \\boxed{\\frac{1}{2}} b \\boxed{\\{1\\}} c \\boxed{3"
    >>> [text[s:e] for s, e in boxed_spans(text)]
    ['\\boxed{\\frac{1}{2}}', '\\boxed{\\{1\\}}']
    """
    spans = []
    stack: list[int] = []  # per open brace: the start of its `\boxed{`, or -1 for a plain `{`
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token == _BOXED_OPEN:
            stack.append(match.start())
        elif token == "{":
            stack.append(-1)
        elif token == "}" and stack:
            start = stack.pop()
            if start >= 0:
                spans.append((start, match.end()))
    spans.sort()
    outermost: list[tuple[int, int]] = []
    for start, end in spans:
        if not outermost or start >= outermost[-1][1]:
            outermost.append((start, end))
    return outermost


def last_boxed(text: str) -> str | None:
    r"""The inside of the last outermost `\boxed{...}` of `text`, or None when there is none.

    >>> last_boxed("first \\boxed{3}, then \\boxed{\\sqrt{2}}.")
    '\\sqrt{2}'
    """
    spans = boxed_spans(text)
    if not spans:
        return None
    start, end = spans[-1]
    return text[start + len(_BOXED_OPEN) : end - 1]
