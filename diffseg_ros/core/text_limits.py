"""Bounds on untrusted text (topics anyone may publish on) and on how much of it reaches logs and reports."""
MAX_LOG_CHARS = 80   # of any user-given text quoted in a log line, status or diagnostics report


def shorten(text, limit=MAX_LOG_CHARS):
    """Return text cut to its first `limit` characters (with '...' and the full length when cut)."""
    text = str(text)
    return text if len(text) <= limit else f'{text[:limit]}... ({len(text)} characters)'


def check_size(text, limit, what):
    """Raise ValueError when text is longer than limit bytes (UTF-8); the message quotes only its start."""
    size = len(text.encode('utf-8', errors='surrogatepass'))
    if size > limit:
        raise ValueError(f'{what} of {size} bytes refused (limit {limit} bytes): {shorten(text)!r}')
