"""Build Stable Diffusion's CLIP tokenizer offline from the BPE file shipped in open-clip-torch.

CLIP's 49,408-token vocabulary is: the 256 byte-level symbols, the same with the end-of-word marker,
one token per BPE merge (48,894 of them), then the start and end tokens (as SD's tokenizer).
"""
import gzip
import importlib.util
import json
import os

from transformers import CLIPTokenizer

N_MERGES = 49152 - 256 - 2
START, END = '<|startoftext|>', '<|endoftext|>'


def byte_symbols():
    """Return the 256 printable symbols byte-level BPE uses for the bytes 0..255, in CLIP's order."""
    printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
                 + list(range(ord('®'), ord('ÿ') + 1)))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def find_bpe_file():
    """Return the path of bpe_simple_vocab_16e6.txt.gz inside the installed open_clip package."""
    spec = importlib.util.find_spec('open_clip')
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError('open-clip-torch is not installed; it ships the CLIP BPE vocabulary file')
    path = os.path.join(list(spec.submodule_search_locations)[0], 'bpe_simple_vocab_16e6.txt.gz')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'CLIP BPE vocabulary not found at {path}')
    return path


def write_clip_tokenizer(out_dir, bpe_path=None):
    """Write vocab.json, merges.txt and the tokenizer config of SD 1.x's CLIPTokenizer to out_dir."""
    with gzip.open(bpe_path or find_bpe_file(), 'rt', encoding='utf-8') as f:
        merges = f.read().split('\n')[1:N_MERGES + 1]
    symbols = byte_symbols()
    tokens = symbols + [s + '</w>' for s in symbols] + [''.join(m.split()) for m in merges] + [START, END]
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'vocab.json'), 'w', encoding='utf-8') as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, 'merges.txt'), 'w', encoding='utf-8') as f:
        f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)
    tokenizer.save_pretrained(out_dir)
    return tokenizer
