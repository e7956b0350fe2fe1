"""One WebSocket client: the handler, its session, its connection, compression."""
