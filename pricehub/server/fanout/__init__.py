"""Fan-out: one encode per update, one write per connection per tick."""
