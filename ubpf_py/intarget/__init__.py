"""In-target execution: programs, helpers and maps that run inside the traced process."""
