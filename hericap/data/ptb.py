"""A pure-Python version of the coco-caption toolkit's caption tokenisation.

The toolkit runs Stanford's ``PTBTokenizer`` (Java, ``-preserveLines -lowerCase``) and then drops
the punctuation tokens in :data:`PUNCTUATIONS`. Starting a JVM per batch is what makes research-code
SCST slow, so rewards and per-epoch validation use :func:`ptb_tokenize` instead. It implements the
rules of the PTB lexer that matter for caption text: clitics (``it 's``, ``is n't``), hyphenated
words and numbers kept whole (``close-up``, ``11:44``, ``1,000``), acronyms kept whole (``t.v.``),
``cannot`` / ``gonna`` style splits, punctuation split off and removed. A test compares it with the
Java tokeniser on every real caption in ``$HERICAP_REALDATA``.
"""

from __future__ import annotations

import re

__all__ = ["PUNCTUATIONS", "ptb_tokenize", "ptb_tokens"]

# Tokens the toolkit removes after PTB tokenisation (pycocoevalcap.tokenizer.ptbtokenizer).
PUNCTUATIONS = frozenset(
    "'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;".split()  # noqa: SIM905
)

# Contractions the PTB lexer splits into two words (lowercase form -> split point).
_SPLIT_WORDS = {
    "cannot": 3,
    "gonna": 3,
    "gotta": 3,
    "wanna": 3,
    "lemme": 3,
    "gimme": 3,
    "dunno": 2,
}
_CLITIC = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ve|'d|'m|'ll|’s)$")
# ASCII whitespace only: the lexer keeps a no-break space inside a token ("22\u00a03/4").
_WHITESPACE = re.compile(r"[ \t\n\r\f\v]+")
_FRACTION = re.compile(r"^[0-9]+/[0-9]+")
_NUMBER = re.compile(r"^[0-9][0-9,.:/]*[0-9]$")
_LEADING = "\"'`([{<.-#"
_TRAILING = "\"'`)]}>,;:?!.-/"
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
# Abbreviations the lexer keeps whole with their period (checked lowercase, without the period).
_ABBREVIATIONS = frozenset(
    (  # noqa: SIM905
        "mr mrs ms dr st ave blvd rd jr sr ft mt vs etc inc co corp ltd no jan feb mar apr jun"
        " jul aug sep sept oct nov dec gen gov sen rep prof sgt capt lt col hwy ln pl ct"
    ).split()
)
# Punctuation that the lexer separates even inside a word (``red,white`` -> ``red , white``).
_INNER_SPLIT = re.compile(r"([,;!?\"()\[\]{}=#]|\.\.\.+|--+)")


def _split_inner(chunk: str) -> list[str]:
    """Split punctuation that may sit inside a whitespace chunk, keeping numbers whole."""
    if _NUMBER.match(chunk):
        return [chunk]
    parts = [piece for piece in _INNER_SPLIT.split(chunk) if piece]
    # re-join digit groups split at commas: "1" "," "000" -> "1,000"
    merged: list[str] = []
    for p in parts:
        if (
            len(merged) >= 2
            and merged[-1] == ","
            and merged[-2][-1:].isdigit()
            and p[:1].isdigit()
            and len(p) >= 3
        ):
            merged[-2:] = [merged[-2] + "," + p]
        else:
            merged.append(p)
    return merged


def _word(token: str) -> list[str]:
    """Tokens of one punctuation-free-at-the-edges word."""
    if not token:
        return []
    low = token.lower()
    if low in _SPLIT_WORDS:
        k = _SPLIT_WORDS[low]
        return [token[:k], token[k:]]
    m = _CLITIC.match(token)
    if m and m.group(1) not in ("'", "`"):
        return [*_word(m.group(1)), m.group(2)]
    if token.startswith("$") and len(token) > 1:
        return ["$", *_word(token[1:])]
    if token.endswith("%") and len(token) > 1:
        return [*_word(token[:-1]), "%"]
    return [token]


def _keeps_period(word: str, last: bool) -> bool:
    """Whether the lexer keeps ``word``'s final period (acronyms and known abbreviations)."""
    if re.match(r"^(?:[A-Za-z]\.){2,}$", word):
        return True  # t.v., u.s.a.
    if re.match(r"^[A-Za-z]\.$", word):
        return not last  # an initial ("W. Centre"), but a sentence-final letter loses it
    return word[:-1].lower() in _ABBREVIATIONS


def _chunk(chunk: str, last: bool) -> list[str]:
    """PTB tokens of one whitespace-delimited chunk (``last``: the line's final chunk)."""
    if chunk.upper() in _BRACKETS.values():
        return [chunk]  # an already-escaped bracket ("-lrb-") is one word
    lead: list[str] = []
    trail: list[str] = []
    while chunk and chunk[0] in _LEADING:
        if chunk.startswith("``"):
            lead.append("``")
            chunk = chunk[2:]
            continue
        if chunk[0] == "'" and (_CLITIC.match("x" + chunk) or chunk.lower() == "'n'"):
            break  # a clitic on its own ("'s"), or "'n'"
        lead.append(chunk[0])
        chunk = chunk[1:]
    while chunk and chunk[-1] in _TRAILING:
        if chunk.endswith("..."):
            trail.insert(0, "...")
            chunk = chunk[:-3]
            continue
        if chunk[-1] == "." and _keeps_period(chunk, last):
            break
        if chunk.lower() == "'n'":
            break
        if chunk[-1] == "'" and chunk[:-1].lower().endswith("s") and len(chunk) > 2:
            trail.insert(0, "'")  # plural possessive: "men's'" / "dogs'"
            chunk = chunk[:-1]
            continue
        trail.insert(0, chunk[-1])
        chunk = chunk[:-1]
    middle: list[str] = []
    for piece in _split_inner(chunk):
        if len(piece) == 1 and not piece.isalnum():
            middle.append(piece)
        else:
            middle.extend(_word(piece))
    return [*lead, *middle, *trail]


def ptb_tokens(caption: str) -> list[str]:
    """The toolkit's tokens of ``caption``: PTB-tokenised, lowercased, punctuation removed."""
    out: list[str] = []
    chunks = _WHITESPACE.split(caption.strip(" \t\n\r\f\v"))
    chunks = [c for c in chunks if c]
    # a mixed fraction is one token, joined by a no-break space: "22 3/4" -> "22\u00a03/4"
    i = 0
    while i < len(chunks) - 1:
        if chunks[i].isdigit() and _FRACTION.match(chunks[i + 1]):
            chunks[i : i + 2] = [chunks[i] + "\u00a0" + chunks[i + 1]]
        i += 1
    for i, chunk in enumerate(chunks):
        for tok in _chunk(chunk, last=i == len(chunks) - 1):
            tok = _BRACKETS.get(tok, tok)
            if tok == '"':
                tok = "''"
            tok = tok.lower()  # the toolkit lowercases first, so "-lrb-" survives the filter
            if tok not in PUNCTUATIONS:
                out.append(tok)
    return out


def ptb_tokenize(caption: str) -> str:
    """:func:`ptb_tokens` joined by spaces: the string the toolkit scores."""
    return " ".join(ptb_tokens(caption))
