"""The pricehub server: app, settings, runner; http/, socket/, fanout/, policy/."""
