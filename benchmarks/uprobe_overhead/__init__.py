"""Uprobe overhead benchmark: kernel uprobes vs ubpf-py (see README.md)."""
