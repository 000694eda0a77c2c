"""Newest-only hand-over from ROS callbacks to the inference worker.

Each kind of work ('queries', 'frame') has one slot: a newer item replaces an unread one, so a
slow model never builds a backlog and always works on the latest frame (the latest-frame worker of
well-liked ROS perception packages).
"""
import threading


class Mailbox:
    """One slot per key, shared condition; put() never blocks on the consumer."""

    def __init__(self):
        self._cond = threading.Condition()
        self._slots = {}
        self._closed = False

    def put(self, key, item):
        """Store item under key and wake the worker; return True when an unread item was replaced."""
        with self._cond:
            replaced = key in self._slots
            self._slots[key] = item
            self._cond.notify()
            return replaced

    def take(self, timeout=None):
        """Wait for work and return all filled slots as a dict ({} on timeout or once closed)."""
        with self._cond:
            self._cond.wait_for(lambda: self._slots or self._closed, timeout)
            if self._closed:
                return {}
            taken, self._slots = self._slots, {}
            return taken

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self):
        return self._closed
