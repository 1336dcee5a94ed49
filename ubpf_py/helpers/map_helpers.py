"""Map helpers: element ops (1-3), queue/stack/bloom (87-89), perf output (25), stacks
(27, 67), ring buffers (130-134) and bpf_for_each_map_elem (164).

Return conventions are the kernel's: pointers (lookup, ringbuf reserve) are host
addresses or 0; everything else is 0 or ``-errno``.
"""

from __future__ import annotations

import struct

from ubpf_py.errors import VMFault
from ubpf_py.helpers.context import HelperContext
from ubpf_py.maps import consts as C
from ubpf_py.maps.array import ArrayMap
from ubpf_py.maps.hash import HashMap
from ubpf_py.maps.perf import PerfEventArrayMap
from ubpf_py.maps.queue import BloomFilterMap
from ubpf_py.maps.ringbuf import RingBufMap
from ubpf_py.maps.stack_trace import BUILD_ID_ENTRY, StackTraceMap, build_id_entries
from ubpf_py.vm.env import HelperFn

_M64 = 0xFFFFFFFFFFFFFFFF
_U32 = struct.Struct("<I")


def bind(hc: HelperContext, table: dict[int, HelperFn]) -> None:
    env = hc.env
    maps = env.maps_by_addr
    mem = env.memory
    read = hc.fast_reader()
    get_map = hc.map

    # ---- 1-3: element operations ----------------------------------------------------------
    def map_lookup_elem(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        m = maps.get(r1)
        if m is None:
            m = get_map(r1)
        addr = m.lookup_addr(read(r2, m.key_size), env.hit.cpu)
        if addr and m.holds_maps:
            hc.map(addr)  # make the inner map and its memory reachable
        return addr

    def map_update_elem(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        m = maps.get(r1) or get_map(r1)
        return m.update(read(r2, m.key_size), read(r3, m.value_size), r4, env.hit.cpu)

    def map_delete_elem(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        m = maps.get(r1) or get_map(r1)
        return m.delete(read(r2, m.key_size), env.hit.cpu)

    # ---- 87-89: queue / stack / bloom filter ------------------------------------------------
    def map_push_elem(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        m = maps.get(r1) or get_map(r1)
        return m.push(read(r2, m.value_size), r3)

    def _take(r1: int, r2: int, pop: bool) -> int:
        m = maps.get(r1) or get_map(r1)
        v = m.pop() if pop else m.peek()
        if isinstance(v, int):
            mem.write(r2, bytes(m.value_size))
            return v
        mem.write(r2, v)
        return 0

    def map_pop_elem(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        return _take(r1, r2, True)

    def map_peek_elem(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        m = maps.get(r1) or get_map(r1)
        if isinstance(m, BloomFilterMap):
            return m.peek(read(r2, m.value_size))  # type: ignore[return-value]
        return _take(r1, r2, False)

    # ---- 25: perf_event_output ----------------------------------------------------------------
    def perf_event_output(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        m = maps.get(r2) or get_map(r2)
        if not isinstance(m, PerfEventArrayMap):
            raise VMFault(f"bpf_perf_event_output on map {m.name}, which is not a perf event array")
        return m.output(env.hit.cpu, read(r4, r5) if r5 else b"", r3)

    # ---- 27 / 67: stacks --------------------------------------------------------------------------
    def _user_trace(depth: int) -> list[int] | None:
        unwind = env.hit.unwind_user_stack
        if unwind is None:
            return None
        return list(unwind(depth))[:depth]

    def get_stackid(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        m = maps.get(r2) or get_map(r2)
        if not isinstance(m, StackTraceMap):
            raise VMFault(f"bpf_get_stackid on map {m.name}, which is not a stack trace map")
        flags = r3
        if flags & ~(C.BPF_F_SKIP_FIELD_MASK | C.BPF_F_USER_STACK | C.BPF_F_FAST_STACK_CMP
                     | C.BPF_F_REUSE_STACKID):
            return -C.EINVAL
        skip = flags & C.BPF_F_SKIP_FIELD_MASK
        depth = min(m.max_depth + skip, C.perf_event_max_stack())
        if flags & C.BPF_F_USER_STACK:
            trace = _user_trace(depth)
            if trace is None:
                return -C.EFAULT
        else:
            trace = []  # a uprobe interrupts user mode: there is no kernel call chain
        return m.get_stackid(trace, flags)

    def get_stack(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        buf, size, flags = r2, r3 & 0xFFFFFFFF, r4
        user = bool(flags & C.BPF_F_USER_STACK)
        build_id = bool(flags & C.BPF_F_USER_BUILD_ID)
        err = -C.EINVAL
        elem = BUILD_ID_ENTRY if build_id else 8
        if not (flags & ~(C.BPF_F_SKIP_FIELD_MASK | C.BPF_F_USER_STACK | C.BPF_F_USER_BUILD_ID)
                or (not user and build_id) or size % elem):
            skip = flags & C.BPF_F_SKIP_FIELD_MASK
            num = size // elem
            depth = min(num + skip, C.perf_event_max_stack())
            trace = _user_trace(depth) if user else []
            if trace is None or len(trace) < skip:
                err = -C.EFAULT
            else:
                ips = trace[skip:skip + num]
                data = build_id_entries(ips) if build_id else struct.pack(f"<{len(ips)}Q", *ips)
                mem.write(buf, data + bytes(size - len(data)))
                return len(data)
        if size:
            mem.write(buf, bytes(size))
        return err

    def get_task_stack(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        # the current task's user stack is the probe's (__bpf_get_stack with its user regs);
        # its kernel stack -- the uprobe handler's frames -- has no source here
        ko = hc.kernel_objects
        if ko is None or not ko.is_current(r1):
            raise VMFault(f"bpf_get_task_stack: 0x{r1:x} is not the current task; "
                          "not supported: another task's stack")
        if not r4 & ~C.BPF_F_SKIP_FIELD_MASK:    # a kernel stack (other flag mixes: get_stack's -EINVAL)
            raise VMFault("bpf_get_task_stack without BPF_F_USER_STACK: not supported: "
                          "kernel stacks (the kernel's frames of the uprobe handler)")
        return get_stack(0, r2, r3, r4, 0)

    # ---- 130-134: ring buffer -----------------------------------------------------------------
    def _ringbuf(addr: int) -> RingBufMap:
        m = maps.get(addr) or get_map(addr)
        if not isinstance(m, RingBufMap):
            raise VMFault(f"ring buffer helper on map {m.name}, which is not a ring buffer")
        return m

    def _record_owner(addr: int) -> RingBufMap:
        r = mem.find(addr, 1)
        owner = r.owner if r is not None else None
        if not isinstance(owner, RingBufMap):
            raise VMFault(f"ring buffer submit/discard of 0x{addr:x}, which is not a reserved record")
        return owner

    def ringbuf_output(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        return _ringbuf(r1).output(read(r2, r3) if r3 else b"", r4)

    def ringbuf_reserve(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        rb = _ringbuf(r1)
        if r3:
            return 0
        return rb.reserve(r2)

    def ringbuf_submit(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        rb = _record_owner(r1)
        try:
            rb.commit(r1, False, r2)
        except ValueError as exc:
            raise VMFault(str(exc)) from None
        return 0

    def ringbuf_discard(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        rb = _record_owner(r1)
        try:
            rb.commit(r1, True, r2)
        except ValueError as exc:
            raise VMFault(str(exc)) from None
        return 0

    def ringbuf_query(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        return _ringbuf(r1).query(r2)

    # ---- 164: for_each_map_elem -----------------------------------------------------------------
    def for_each_map_elem(r1: int, r2: int, r3: int, r4: int, r5: int) -> int:
        m = maps.get(r1) or get_map(r1)
        if r4:
            return -C.EINVAL
        call = env.invoke_callback
        if call is None:
            raise VMFault("bpf_for_each_map_elem needs an engine with callback support")
        cpu = env.hit.cpu
        n = 0
        if isinstance(m, HashMap):
            vstride = C.round8(m.value_size) * cpu if m.percpu else 0
            for key, kaddr, vaddr in m.snapshot():
                if m.key_addr(key) != kaddr:
                    continue  # deleted by an earlier callback
                n += 1
                if call(r2, m.handle_addr, kaddr, vaddr + vstride, r3, 0) & _M64:
                    break
            return n
        if isinstance(m, ArrayMap):
            key_addr = hc.scratch.addr
            for i in range(m.max_entries):
                key = _U32.pack(i)
                hc.scratch.view[0:4] = key
                n += 1
                if call(r2, m.handle_addr, key_addr, m.lookup_addr(key, cpu), r3, 0) & _M64:
                    break
            return n
        raise VMFault(f"bpf_for_each_map_elem does not support {m.spec.type_name} map {m.name}")

    table.update({
        1: map_lookup_elem, 2: map_update_elem, 3: map_delete_elem,
        25: perf_event_output, 27: get_stackid, 67: get_stack, 141: get_task_stack,
        87: map_push_elem, 88: map_pop_elem, 89: map_peek_elem,
        130: ringbuf_output, 131: ringbuf_reserve, 132: ringbuf_submit, 133: ringbuf_discard,
        134: ringbuf_query, 164: for_each_map_elem,
    })
