"""The binary interfaces this project shares between its sides, defined once.

* ``layout``: a tiny struct-layout description (u64 words and byte arrays) that
  renders itself as Python offsets and as a C header.
* ``kernel``: layouts this project mirrors from the Linux kernel ABI (pt_regs).
* ``runtime``: layouts shared by the tracer (Python), the trampolines it
  generates and the in-target runtime (``runtime/*.c``): the runtime header,
  probe blocks, thread blocks and the hit frame programs are entered with.

``runtime/ubpf_abi.h`` is generated from these (``python -m ubpf_py.abi``); a
test checks the committed header equals the generated one, so a layout is
written in one place only.
"""
