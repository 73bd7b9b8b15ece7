"""Pure tensor functions (no state, no I/O) that a reviewer can check against the papers."""
