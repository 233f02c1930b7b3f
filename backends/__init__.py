"""In-tree backends, one module per software stack (imported as ``hal.backends.<name>``)."""
