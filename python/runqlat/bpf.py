"""Lifetimes of a libbpf object, its maps and links.

BpfObject follows libbpf's sequence: open -> configure (autoload, map sizes,
rodata) -> load -> attach -> use maps -> close. close() is idempotent and runs
from __exit__; links are destroyed before the object.
"""
from __future__ import annotations

import ctypes

import errno as _errno
import mmap
import os
import struct
from pathlib import Path

from . import _ffi, abi
from ._ffi import ffi
from .errors import LibbpfError, check, error_for

BPF_ANY = 0
LOG_BUF_SIZE = 1 << 22

# what a kernel without batch map operations answers (524: the kernel's ENOTSUPP)
_UNSUPPORTED = {_errno.EINVAL, 524, _errno.ENOSYS, _errno.EOPNOTSUPP}

# enum bpf_map_type values used by probes and the loader (uapi, stable)
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_RINGBUF = 27
BPF_MAP_TYPE_TASK_STORAGE = 29

# batch read buffers: not cleared (the kernel writes what is read back); a big one
# is a fresh mapping whose pages are touched only where the kernel writes
_raw_alloc = ffi.new_allocator(should_clear_after_alloc=False)


def possible_cpus(path: str = "/sys/devices/system/cpu/possible") -> int:
    """Per-CPU map values hold one copy per possible CPU."""
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return os.cpu_count() or 1
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n


class Map:
    """A created map, addressed by fd. Keys and values are bytes."""

    def __init__(self, ptr, name: str, percpu: bool, batch_ops: bool = True):
        l = _ffi.lib()
        self.name = name
        self.fd = l.bpf_map__fd(ptr)
        self.key_size = l.bpf_map__key_size(ptr)
        self.max_entries = l.bpf_map__max_entries(ptr)
        vsize = l.bpf_map__value_size(ptr)
        self.ncpus = possible_cpus() if percpu else 1
        self.value_size = ((vsize + 7) // 8 * 8) * self.ncpus if percpu else vsize
        self._batch_ok = batch_ops  # until the kernel refuses one
        self._last_n = 0

    def mmap_readonly(self) -> mmap.mmap:
        """The values of a BPF_F_MMAPABLE array, mapped read-only: max_entries
        values of value_size (rounded up to 8) bytes, back to back."""
        size = self.max_entries * ((self.value_size + 7) // 8 * 8)
        length = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            return mmap.mmap(self.fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as exc:
            raise error_for(f"mapping map {self.name} into memory", exc.errno or _errno.EINVAL) from None

    @property
    def batch_ok(self) -> bool:
        """Whether batch operations are used (False once the kernel refused one)."""
        return self._batch_ok

    def lookup(self, key: bytes) -> bytes | None:
        val = ffi.new("char[]", self.value_size)
        rc = _ffi.lib().bpf_map_lookup_elem(self.fd, key, val)
        if rc == -_errno.ENOENT:
            return None
        check(rc, f"lookup in map {self.name}")
        return ffi.buffer(val, self.value_size)[:]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        check(_ffi.lib().bpf_map_update_elem(self.fd, key, value, flags), f"update of map {self.name}")

    def push_all(self, values: bytes) -> None:
        """Push values (value_size bytes each, back to back) onto a queue or stack
        map, first to last: the last one is on top of a stack."""
        check(_ffi.push_each(self.fd, values, self.value_size), f"push onto map {self.name}")

    def rows(self, stop: int, start: int = 0) -> bytes:
        """The values of entries start..stop-1 of an array map, back to back (bytes-like)."""
        stop = min(stop, self.max_entries)
        n = stop - start
        if n <= 0:
            return b""
        if self._batch_ok:
            l = _ffi.lib()
            keys, vals = _raw_alloc("char[]", n * self.key_size), _raw_alloc("char[]", n * self.value_size)
            count = ffi.new("uint32_t *", n)
            opts = ffi.new("struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")})
            # the generic batch token is the last key read: the entry before start
            in_b = ffi.new("uint32_t *", start - 1) if start else ffi.NULL
            rc = l.bpf_map_lookup_batch(self.fd, in_b, ffi.new("uint32_t *"), keys, vals, count, opts)
            if rc >= 0 or (rc == -_errno.ENOENT and count[0] == n):
                return memoryview(ffi.buffer(vals, n * self.value_size))
            if -rc not in _UNSUPPORTED:
                check(rc, f"batch lookup in map {self.name}")
            self._batch_ok = False
        return b"".join(self.lookup(struct.pack("<I", i)) for i in range(start, stop))

    def delete(self, key: bytes) -> bool:
        rc = _ffi.lib().bpf_map_delete_elem(self.fd, key)
        if rc == -_errno.ENOENT:
            return False
        check(rc, f"delete from map {self.name}")
        return True

    def keys(self) -> list[bytes]:
        out, prev = [], ffi.NULL
        nxt = ffi.new("char[]", self.key_size)
        l = _ffi.lib()
        while True:
            rc = l.bpf_map_get_next_key(self.fd, prev, nxt)
            if rc == -_errno.ENOENT:
                return out
            check(rc, f"iteration of map {self.name}")
            k = ffi.buffer(nxt, self.key_size)[:]
            out.append(k)
            prev = ffi.new("char[]", k)

    def items(self) -> tuple[bytes, bytes, int]:
        """All entries: (keys, values, n), packed back to back (bytes-like: bytes or memoryview).

        One bpf_map_lookup_batch call per chunk where the kernel supports it
        (5.6+), a get_next_key/lookup walk otherwise (or when the map was made
        with batch_ops=False, for tests).
        """
        if self._batch_ok:
            try:
                return self._items_batch()
            except LibbpfError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self._batch_ok = False
        keys, vals = [], []
        for k in self.keys():
            v = self.lookup(k)
            if v is not None:  # deleted between the two calls
                keys.append(k)
                vals.append(v)
        return b"".join(keys), b"".join(vals), len(keys)

    def _items_batch(self) -> tuple[bytes, bytes, int]:
        """Read straight into fresh buffers that become the result: no copy, and no
        multi-MB buffer kept between reads (its pages would stay resident)."""
        l = _ffi.lib()
        # sized from the last read, so a map of thousands of per-CPU histograms
        # does not cost a buffer for max_entries of them
        chunk = max(1, min(self.max_entries, 4096, self._last_n + self._last_n // 4 + 64))
        token_size = max(self.key_size, 8)
        in_b, out_b = ffi.NULL, ffi.new("char[]", token_size)
        count = ffi.new("uint32_t *")
        opts = ffi.new("struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")})
        kparts, vparts, total = [], [], 0
        while True:
            keys, vals = _raw_alloc("char[]", chunk * self.key_size), _raw_alloc("char[]", chunk * self.value_size)
            count[0] = chunk
            rc = l.bpf_map_lookup_batch(self.fd, in_b, out_b, keys, vals, count, opts)
            n = count[0]
            if rc < 0 and rc != -_errno.ENOENT:
                if rc == -_errno.ENOSPC and chunk < self.max_entries:
                    # one hash bucket holds more than a chunk: retry bigger
                    chunk = min(self.max_entries, chunk * 4)
                    continue
                check(rc, f"batch lookup in map {self.name}")
            # views of the buffers themselves (they live as long as the views do)
            kparts.append(memoryview(ffi.buffer(keys, n * self.key_size)))
            vparts.append(memoryview(ffi.buffer(vals, n * self.value_size)))
            total += n
            if rc == -_errno.ENOENT:
                self._last_n = total
                if len(kparts) == 1:
                    return kparts[0], vparts[0], total
                return b"".join(kparts), b"".join(vparts), total
            if in_b == ffi.NULL:
                in_b = ffi.new("char[]", token_size)
            ffi.memmove(in_b, out_b, token_size)

    def update_batch(self, keys: bytes, values: bytes, n: int) -> None:
        if n == 0:
            return
        if self._batch_ok:
            count = ffi.new("uint32_t *", n)
            opts = ffi.new("struct bpf_map_batch_opts *", {"sz": ffi.sizeof("struct bpf_map_batch_opts")})
            rc = _ffi.lib().bpf_map_update_batch(self.fd, keys, values, count, opts)
            if rc >= 0:
                return
            if -rc not in _UNSUPPORTED:
                check(rc, f"batch update of map {self.name}")
            self._batch_ok = False
        ks, vs = self.key_size, len(values) // n
        for i in range(n):
            self.update(keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs])

    def delete_many(self, keys: list[bytes]) -> None:
        # Individual deletes: ENOENT (the kernel removed an exited process
        # first) must not abort the rest, which a batch delete would.
        for k in keys:
            self.delete(k)


class BpfObject:
    """An opened (then loaded and attached) BPF object file."""

    def __init__(self, path: Path, btf_custom_path: str | None = None, batch_ops: bool = True):
        """btf_custom_path: BTF to use for CO-RE relocations instead of the kernel's
        (tests use it to make the object meet an older task_struct). batch_ops:
        False makes the maps walk entries one by one, as without kernel support."""
        l = _ffi.lib()
        self.path = Path(path)
        self._batch_ops = batch_ops
        self._links: list = []
        self._log_bufs: dict[str, object] = {}
        _ffi.take_messages()
        opts = ffi.NULL
        if btf_custom_path:
            self._btf_path = ffi.new("char[]", str(btf_custom_path).encode())
            opts = ffi.new("struct bpf_object_open_opts *",
                           {"sz": ffi.sizeof("struct bpf_object_open_opts"), "btf_custom_path": self._btf_path})
        obj = l.bpf_object__open_file(str(self.path).encode(), opts)
        if obj == ffi.NULL:
            err = _ffi.errno()
            raise error_for(f"opening BPF object {self.path}", err or _errno.EINVAL, _last_message())
        self._obj = obj
        self._progs = {}
        p = l.bpf_object__next_program(obj, ffi.NULL)
        while p != ffi.NULL:
            self._progs[ffi.string(l.bpf_program__name(p)).decode()] = p
            p = l.bpf_object__next_program(obj, p)
        self._map_ptrs = {}
        m = l.bpf_object__next_map(obj, ffi.NULL)
        while m != ffi.NULL:
            self._map_ptrs[ffi.string(l.bpf_map__name(m)).decode()] = m
            m = l.bpf_object__next_map(obj, m)
        self._maps: dict[str, Map] = {}
        self.loaded = False

    # -- configure (before load) --
    @property
    def program_names(self) -> list[str]:
        return list(self._progs)

    def set_autoload(self, name: str, on: bool) -> None:
        check(_ffi.lib().bpf_program__set_autoload(self._progs[name], on), f"set_autoload({name})")

    def set_max_entries(self, name: str, n: int) -> None:
        check(_ffi.lib().bpf_map__set_max_entries(self._map_ptrs[name], n), f"sizing map {name}")

    def map_flags(self, name: str) -> int:
        return _ffi.lib().bpf_map__map_flags(self._map_ptrs[name])

    def set_map_flags(self, name: str, flags: int) -> None:
        check(_ffi.lib().bpf_map__set_map_flags(self._map_ptrs[name], flags), f"setting flags of map {name}")

    def set_autocreate(self, name: str, on: bool) -> None:
        check(_ffi.lib().bpf_map__set_autocreate(self._map_ptrs[name], on), f"set_autocreate({name})")

    def stand_in_array(self, name: str) -> None:
        """Make a map a one-entry array: for a map type this kernel lacks whose
        programs' uses sit behind a false rodata switch (the verifier drops them)."""
        l, ptr = _ffi.lib(), self._map_ptrs[name]
        check(l.bpf_map__set_type(ptr, BPF_MAP_TYPE_ARRAY), f"retyping map {name}")
        check(l.bpf_map__set_key_size(ptr, 4), f"retyping map {name}")
        check(l.bpf_map__set_value_size(ptr, 8), f"retyping map {name}")
        check(l.bpf_map__set_max_entries(ptr, 1), f"retyping map {name}")

    def _section_map(self, section: str):
        for name, ptr in self._map_ptrs.items():
            if name == section or name.endswith(section):
                return name, ptr
        raise KeyError(section)

    def write_initial(self, section: str, offset: int, data: bytes) -> None:
        """Write into a global data section (.rodata, .data.live) before load."""
        _, ptr = self._section_map(section)
        size = ffi.new("size_t *")
        base = _ffi.lib().bpf_map__initial_value(ptr, size)
        if base == ffi.NULL or offset + len(data) > size[0]:
            raise LibbpfError(f"writing {section}", _errno.EINVAL, "no such data section")
        ffi.memmove(ffi.cast("char *", base) + offset, data, len(data))

    # -- load and attach --
    def load(self) -> None:
        l = _ffi.lib()
        for name, p in self._progs.items():
            if l.bpf_program__autoload(p):
                buf = ffi.new("char[]", LOG_BUF_SIZE)
                self._log_bufs[name] = buf
                l.bpf_program__set_log_buf(p, buf, LOG_BUF_SIZE)
        _ffi.take_messages()
        rc = l.bpf_object__load(self._obj)
        if rc < 0:
            log = ""
            failed = ""
            for name, buf in self._log_bufs.items():
                text = ffi.string(buf).decode(errors="replace")
                if text.strip():
                    log, failed = text, name
            detail = f"program {failed} rejected by the verifier" if failed else _last_message()
            raise error_for("loading BPF programs", -rc, detail, log)
        self._log_bufs.clear()  # 4 MiB each: free them
        self.loaded = True

    def attach(self, name: str) -> None:
        l = _ffi.lib()
        link = l.bpf_program__attach(self._progs[name])
        if link == ffi.NULL:
            raise error_for(f"attaching {name}", _ffi.errno() or _errno.EINVAL, _last_message())
        self._links.append((name, link))

    @property
    def attached(self) -> list[str]:
        return [n for n, _ in self._links]

    def map(self, name: str) -> Map:
        if name not in self._maps:
            ptr = self._map_ptrs[name] if name in self._map_ptrs else self._section_map(name)[1]
            percpu = name in abi.PERCPU_MAPS
            self._maps[name] = Map(ptr, name, percpu, self._batch_ops)
        return self._maps[name]

    def prog_stats(self, name: str) -> tuple[int, int, int]:
        """(prog id, run_time_ns, run_cnt); the last two stay 0 unless kernel.bpf_stats_enabled=1."""
        fd = _ffi.lib().bpf_program__fd(self._progs[name])
        info = ffi.new("struct bpf_prog_info *")
        ln = ffi.new("uint32_t *", ffi.sizeof(info[0]))
        check(_ffi.lib().bpf_obj_get_info_by_fd(fd, info, ln), f"reading info of program {name}")
        return info.id, info.run_time_ns, info.run_cnt

    # -- lifetime --
    def close(self) -> None:
        l = _ffi.lib()
        while self._links:
            _, link = self._links.pop()
            l.bpf_link__destroy(link)
        if self._obj is not None:
            l.bpf_object__close(self._obj)
            self._obj = None
            self._maps.clear()

    def __enter__(self) -> "BpfObject":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # backstop only; close() is the contract
        try:
            self.close()
        except Exception:
            pass


# int (*)(void *ctx, void *data, size_t size)
_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class RingBuffer:
    """A BPF ring buffer read with libbpf's ring_buffer__poll; on_sample(bytes)
    is called for each record, in the thread that polls. close() is safe twice
    but must not race a poll (the owner stops its polling thread first)."""

    def __init__(self, m: Map, on_sample):
        self._on_sample = on_sample
        self._errors = 0

        def cb(_ctx, data, size):
            try:
                self._on_sample(ctypes.string_at(data, size))
            except Exception:  # a bad record or consumer must not end the poll loop
                self._errors += 1
            return 0

        # a ctypes function, not an ffi.callback: see _ffi (MemoryDenyWriteExecute)
        self._cb = _SAMPLE_FN(cb)  # kept alive as long as libbpf may call it
        fn = ffi.cast("ring_buffer_sample_fn", ctypes.cast(self._cb, ctypes.c_void_p).value)
        rb = _ffi.lib().ring_buffer__new(m.fd, fn, ffi.NULL, ffi.NULL)
        if rb == ffi.NULL:
            raise error_for(f"opening ring buffer {m.name}", _ffi.errno() or _errno.EINVAL, _last_message())
        self._rb = rb

    @property
    def callback_errors(self) -> int:
        return self._errors

    def poll(self, timeout_ms: int) -> int:
        """Records consumed (0 after the timeout); EINTR is not an error."""
        if self._rb is None:
            return 0
        rc = _ffi.lib().ring_buffer__poll(self._rb, timeout_ms)
        if rc == -_errno.EINTR:
            return 0
        check(rc, "polling a ring buffer")
        return rc

    def close(self) -> None:
        if self._rb is not None:
            _ffi.lib().ring_buffer__free(self._rb)
            self._rb = None


def _last_message() -> str:
    msgs = [m for m in _ffi.take_messages() if m]
    return msgs[-1] if msgs else ""


def probe_map_type(map_type: int) -> bool:
    return _ffi.lib().libbpf_probe_bpf_map_type(map_type, ffi.NULL) == 1


def probe_mmapable_array() -> bool:
    """Does the kernel create BPF_F_MMAPABLE arrays (5.5+)?"""
    l = _ffi.lib()
    opts = ffi.new("struct bpf_map_create_opts *",
                   {"sz": ffi.sizeof("struct bpf_map_create_opts"), "map_flags": abi.BPF_F_MMAPABLE})
    fd = l.bpf_map_create(BPF_MAP_TYPE_ARRAY, b"rq_mmap_probe", 4, 8, 1, opts)
    if fd < 0:
        return False
    os.close(fd)
    return True

