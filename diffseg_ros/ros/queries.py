"""Parse the `query` topic: "my mug; red bottle" -> a clean, bounded list of phrases.

The topic is open to any publisher, so the text is treated as untrusted: control and replacement
characters are removed, whitespace is collapsed, empty parts and duplicates are dropped, and the
message size and number of phrases are bounded before anything reaches the text encoder.
Phrase length and the 77-token CLIP limit are the engine's business (Segmenter.set_queries reports
what it cut).
"""
from collections import deque
from dataclasses import dataclass, field
import unicodedata

from ..core.segmenter import MAX_QUERIES   # the engine also cuts over-long phrases (with a warning)
from ..core.text_limits import shorten

MAX_QUERY_BYTES = 10 * 1024
MAX_PHRASE_CHARS = 300   # well over CLIP's 77 tokens: a longer phrase is cut (the engine cuts it to tokens)
SEPARATOR = ';'


class QueryError(ValueError):
    """A query message refused as a whole; the active queries stay unchanged."""


@dataclass
class ParsedQuery:
    phrases: list
    dropped: list = field(default_factory=list)   # phrases left out (more than MAX_QUERIES)
    warnings: list = field(default_factory=list)  # one human-readable line per problem


def _clean(text):
    """Replace control/format/replacement characters by spaces and collapse whitespace."""
    kept = [' ' if unicodedata.category(ch) in ('Cc', 'Cf', 'Cs', 'Co', 'Cn') or ch == '\ufffd' else ch
            for ch in text]
    return ' '.join(''.join(kept).split())


def parse_query(text):
    """Split a query message into phrases; raise QueryError when the whole message is refused.

    An empty or whitespace-only message yields no phrases (it clears the queries).
    """
    size = len(text.encode('utf-8', errors='surrogatepass'))
    if size > MAX_QUERY_BYTES:
        raise QueryError(f'query message of {size} bytes refused (limit {MAX_QUERY_BYTES} bytes)')
    result = ParsedQuery(phrases=[])
    seen, cleaned_any = set(), False
    for raw in text.split(SEPARATOR):
        phrase = _clean(raw)
        cleaned_any |= phrase != ' '.join(raw.split())
        if len(phrase) > MAX_PHRASE_CHARS:
            result.warnings.append(f'phrase of {len(phrase)} characters cut to {MAX_PHRASE_CHARS}: '
                                   f'{shorten(phrase)!r}')
            phrase = phrase[:MAX_PHRASE_CHARS].rstrip()
        if not phrase or phrase.casefold() in seen:   # CLIP lower-cases: 'Mug' and 'mug' are one query
            continue
        seen.add(phrase.casefold())
        (result.phrases if len(result.phrases) < MAX_QUERIES else result.dropped).append(phrase)
    if cleaned_any:
        result.warnings.append('removed control or invalid characters from the query text')
    if result.dropped:
        dropped = shorten(', '.join(result.dropped))
        result.warnings.append(f'more than {MAX_QUERIES} queries; dropped: {dropped}')
    return result


class SampleFilter:
    """Tell a sample seen for the first time from a repeat by a second subscription."""

    def __init__(self, keep=64):
        self._seen = deque(maxlen=keep)

    def first_time(self, info):
        """Return True the first time a sample (rclpy MessageInfo) is seen."""
        key = (repr(info.get('publisher_gid')), info.get('publication_sequence_number'),
               info['source_timestamp'])
        if key in self._seen:
            return False
        self._seen.append(key)
        return True
