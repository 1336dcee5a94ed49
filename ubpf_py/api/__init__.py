"""The public Python API of ubpf-py (see README "Python API").

``BPFObject`` is one BPF object from open to close on either backend;
``MapView``/``Globals`` read maps and globals as dicts decoded through BTF;
``Record``/``PrintkEvent`` are what buffer and printk callbacks receive.
"""

from ubpf_py.api.events import Record
from ubpf_py.api.maps import Globals, MapView, Struct
from ubpf_py.api.object import BPFObject, Link
from ubpf_py.kernel.events import PrintkEvent

__all__ = ["BPFObject", "Globals", "Link", "MapView", "PrintkEvent", "Record", "Struct"]
