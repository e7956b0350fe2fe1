"""One WebSocket client: the handler (the lifecycle's adapter), its connection and
encodings, compression."""
