"""Mail headers that carry names exactly: the policy the Notifier composes with.

Text headers (Subject, the ``X-Watchfolder-*`` ones) get two changes from
Python's own:

* **Folding.** CPython's folder drops the space between two encoded words
  it puts on different lines (``=?utf-8?q?=C3=9Cberlebensrate?=`` CRLF
  ``=?utf-8?q?M=C3=A4use?=`` reads back as "ÜberlebensrateMäuse"): RFC 2047
  decoders ignore the white space between adjacent encoded words, so the
  space that belongs to the text must be inside one of them. :func:`fold_text`
  folds at the white space of the text and puts white space that separates two
  encoded words into the encoded text: every reader decodes the header to the
  text given, runs of spaces included.
* **No decoding on the way in.** Setting a header decodes encoded words
  in the value: a folder named ``=?utf-8?q?a=0ABcc:_x@evil.org?=`` became a
  newline and a forged header line. Here the value is kept as given, and a
  word that looks like an encoded word goes out encoded itself.
"""

from __future__ import annotations

import email.policy
import re
import sys
from email import quoprimime
from email._header_value_parser import UnstructuredTokenList, ValueTerminal
from email.headerregistry import UniqueUnstructuredHeader, UnstructuredHeader

from ..store.base import CachingHeaderRegistry

__all__ = ["MAIL_POLICY", "fold_text"]

#: RFC 2047: an encoded word is at most 75 characters.
EW_MAX = 75
_CHARSET = "utf-8"
_CHROME = len(f"=?{_CHARSET}?q??=")
_TOKENS = re.compile(r"[ \t]+|[^ \t]+")


class _LiteralText:
    """Mixin for the text header classes: kept as given, folded by :func:`fold_text` when it must."""

    @classmethod
    def parse(cls, value, kwds):
        if "=?" not in value:
            super().parse(value, kwds)  # type: ignore[misc]
            return
        # Not parsed as RFC 2047: what looks like an encoded word is the text itself.
        kwds["parse_tree"] = UnstructuredTokenList([ValueTerminal(value, "vtext")])
        kwds["decoded"] = value

    def fold(self, *, policy):
        value = str(self)
        if "=?" not in value and (policy.utf8 or value.isascii()):
            return super().fold(policy=policy)  # type: ignore[misc]
        return fold_text(self.name, value, policy)  # type: ignore[attr-defined]


class _Text(_LiteralText, UnstructuredHeader):
    pass


class _UniqueText(_LiteralText, UniqueUnstructuredHeader):
    pass


class _Registry(CachingHeaderRegistry):
    """The default header registry with :class:`_LiteralText` text headers, each header class
    built once (:class:`~watchfolder.store.base.CachingHeaderRegistry`)."""

    def __init__(self) -> None:
        super().__init__(default_class=_Text)
        for name, cls in list(self.registry.items()):
            if cls is UniqueUnstructuredHeader:
                self.registry[name] = _UniqueText
            elif cls is UnstructuredHeader:
                self.registry[name] = _Text


#: The policy to compose mails with: :data:`email.policy.default` with the text headers above.
MAIL_POLICY = email.policy.default.clone(header_factory=_Registry())


def _q_length(text: str) -> int:
    return quoprimime.header_length(text.encode(_CHARSET, "replace"))


def _encoded_word(text: str) -> str:
    return quoprimime.header_encode(text.encode(_CHARSET, "replace"), charset=_CHARSET)


def _must_encode(word: str, policy, maxlen: int) -> bool:
    return (
        (not policy.utf8 and not word.isascii())
        or "=?" in word  # would be decoded by the reader
        or len(word) + 1 > maxlen  # cannot be folded onto a line of its own
    )


def fold_text(name: str, value: str, policy) -> str:
    """``name: value`` folded for ``policy`` so that every RFC 2047 reader gets ``value`` back.

    The value is cut into words and white space. Words that need encoding (not
    ASCII for a 7-bit policy, looking like an encoded word, too long for a line)
    and the white space between two of them form one run, written as encoded
    words of at most 75 characters; white space next to plain text stays as it is.
    Lines break only before white space (unfolding removes just the line break) or
    between two encoded words of a run (decoders ignore the space added there).
    """
    maxlen = policy.max_line_length or sys.maxsize
    if maxlen < _CHROME + 16:  # an encoded word of one character (up to 12) and its separator
        raise ValueError(f"max_line_length {maxlen} is too small to fold a header")
    tokens = _TOKENS.findall(value)
    if tokens and tokens[0].isspace():
        # A reader strips the blanks after "Name:": leading ones go into the first encoded word.
        tokens[:2] = ["".join(tokens[:2])]
        lead_encoded = True
    else:
        lead_encoded = False
    # (separator before, text, encoded?) with the white space of encoded runs inside their text.
    items: list[list] = []
    sep = ""
    for token in tokens:
        if token.isspace():
            sep = token
            continue
        encode = _must_encode(token, policy, maxlen) or (lead_encoded and not items)
        if encode and items and items[-1][2]:
            items[-1][1] += sep + token
        else:
            items.append([sep, token, encode])
        sep = ""
    if sep and items and items[-1][2]:
        items[-1][1] += sep  # trailing blanks after an encoded word: inside it
        sep = ""
    trailing = sep
    label = f"{name}:"
    lines = [label]
    for index, (sep, text, encode) in enumerate(items):
        if index == 0:
            sep = " "
        if not encode:
            if len(lines[-1]) + len(sep) + len(text) > maxlen and lines[-1] != label:
                lines.append("")
            lines[-1] += sep + text
            continue
        while text:
            room = min(EW_MAX, maxlen - len(lines[-1]) - len(sep))
            size, used = 0, _CHROME
            for char in text:
                used += _q_length(char)
                if used > room:
                    break
                size += 1
            fresh = lines[-1] == ""
            if size == 0 or (size < len(text) and size < 8 and not fresh and lines[-1] != label):
                if fresh:
                    raise ValueError(f"cannot fold {name}: a character does not fit in an encoded word")
                lines.append("")  # too little room left on this line: go on with the next one
                continue
            lines[-1] += sep + _encoded_word(text[:size])
            text = text[size:]
            sep = " "  # between two encoded words: ignored by readers, a place to fold
    lines[-1] += trailing
    return policy.linesep.join(lines) + policy.linesep
