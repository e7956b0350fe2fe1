"""pricehub: a real-time energy-market price feed over WebSocket."""

__all__ = ["__version__"]

__version__ = "0.1.0"
