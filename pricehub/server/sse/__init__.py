"""Server-Sent Events: the same feed as the WebSocket over plain HTTP streaming."""
