"""The loaded, running side of an object: live maps, programs and their environment."""

from ubpf_py.live.collection import Collection, LoadedProgram

__all__ = ["Collection", "LoadedProgram"]
