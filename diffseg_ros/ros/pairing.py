"""Pair messages of two streams by stamp (message_filters is not installable here).

An image and its depth image come on two topics in either order; whichever arrives second completes the
pair. Only short queues are kept and a completed pair drops everything older, so a lost partner costs only
its own frame and old frames are never processed after newer ones (latest-frame policy).
"""


def stamp_seconds(stamp):
    """Return a builtin_interfaces/Time as float seconds."""
    return stamp.sec + stamp.nanosec * 1e-9


class StampPairer:
    """Pair stream 0 and stream 1 items whose stamps differ by at most `tolerance` seconds.

    Called from the executor thread only (not thread-safe).
    """

    def __init__(self, tolerance, keep=4):
        self.tolerance = tolerance
        self.unpaired = 0   # stream 0 items dropped without a partner (e.g. images whose depth never came)
        self._keep = keep
        self._waiting = ([], [])   # per stream: (stamp, item) in arrival order

    def add(self, stream, stamp, item):
        """Add an item of stream 0 or 1; return (item0, item1) when it completes a pair, else None."""
        others = self._waiting[1 - stream]
        gaps = [abs(other_stamp - stamp) for other_stamp, _ in others]
        best = min(range(len(gaps)), key=gaps.__getitem__, default=None)
        if best is None or gaps[best] > self.tolerance:
            self._waiting[stream].append((stamp, item))
            self._keep_only(stream, lambda index, entry: index >= len(self._waiting[stream]) - self._keep)
            return None
        partner = others[best][1]
        self._keep_only(1 - stream, lambda index, entry: index > best, paired=best)
        self._keep_only(stream, lambda index, entry: entry[0] >= stamp)   # older ones: never the newest
        return (item, partner) if stream == 0 else (partner, item)

    def _keep_only(self, stream, keep, paired=None):
        """Keep the entries of a stream for which keep(index, entry) holds; count the dropped images."""
        entries = self._waiting[stream]
        kept = [entry for index, entry in enumerate(entries) if keep(index, entry)]
        dropped = len(entries) - len(kept) - (paired is not None)
        self.unpaired += dropped if stream == 0 else 0
        self._waiting[stream][:] = kept
