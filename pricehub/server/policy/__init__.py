"""Who may do what and for how long: auth, admission, rate limits, heartbeat, resume."""
