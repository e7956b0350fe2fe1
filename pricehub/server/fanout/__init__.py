"""Fan-out: one encode per update and encoding, one write per connection per tick. It
knows encodings (``encoding.py``), never a transport: ``socket/`` and ``sse/`` build on it."""
