"""Built-in adapters: map an encoder's width to the shared embedding width."""
