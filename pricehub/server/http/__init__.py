"""HTTP endpoints: the JSON API, /metrics and the dashboard."""
