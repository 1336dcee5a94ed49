"""What ubpf-run prints: trace_pipe-style printk lines, decoded events, map dumps.

Two writers share one interface (``output.writers``): human text and JSON lines
(one JSON object per line, ``"event"`` naming its kind) for other programs.
"""
