"""Built-in data that needs no network."""
