"""Composed prompts ("a photo including mug, red bottle, and tree.") and the token span of each query.

The prompt is assembled from separately tokenised pieces. CLIP's BPE never merges across words or
punctuation, so concatenating the pieces' ids gives exactly the tokenisation of the whole prompt and
tells which token positions belong to which query.
"""
from dataclasses import dataclass, field

DEFAULT_BACKGROUND_WORDS = ('tree', 'river', 'sea', 'lake', 'water', 'railway', 'railroad', 'track',
                            'stone', 'rocks')  # T2M's VOC words: they absorb attention, get no channel


@dataclass
class ComposedPrompt:
    text: str
    input_ids: list                      # padded to the tokenizer's max length
    spans: list                          # per kept query: list of token positions
    queries: list                        # the kept queries, in label order
    truncated: list = field(default_factory=list)   # queries dropped for the 77-token limit
    dropped_background: list = field(default_factory=list)


def compose_prompt(tokenizer, queries, prefix='a photo including', background_words=DEFAULT_BACKGROUND_WORDS):
    """Build one prompt naming every query then the background words, within the token limit."""
    limit = tokenizer.model_max_length - 2          # start and end tokens
    ids, text = _ids(tokenizer, prefix), prefix
    spans, kept, truncated, dropped_bg = [], [], [], []
    pieces = [(q, True) for q in queries] + [(w, False) for w in background_words]
    for i, (piece, is_query) in enumerate(pieces):
        sep = '' if i == 0 else (', and' if i == len(pieces) - 1 and i > 1 else ',')
        piece_ids, sep_ids = _ids(tokenizer, piece), _ids(tokenizer, sep)
        if len(ids) + len(sep_ids) + len(piece_ids) + 1 > limit:    # +1 keeps room for the final '.'
            (truncated if is_query else dropped_bg).append(piece)
            continue
        ids += sep_ids
        if is_query:
            spans.append(list(range(len(ids) + 1, len(ids) + 1 + len(piece_ids))))   # +1: start token
            kept.append(piece)
        ids += piece_ids
        text += f'{sep} {piece}'
    ids += _ids(tokenizer, '.')
    text += '.'
    padded = [tokenizer.bos_token_id] + ids + [tokenizer.eos_token_id]
    padded += [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(padded))
    return ComposedPrompt(text, padded, spans, kept, truncated, dropped_bg)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False).input_ids if text else []
