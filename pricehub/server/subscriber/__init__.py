"""One subscriber, whatever its transport: its lifecycle, session (sans I/O) and driver."""
