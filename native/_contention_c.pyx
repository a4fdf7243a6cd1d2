# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Live contention sketch, compiled twin of stockhold.contention.Sketch's recording half.

Import `stockhold.contention`, not this: it picks this module or the pure `Sketch`.

`LiveSketch` is the weighted space-saving summary that one process records into (since start
and the current sub-window), with the pure Sketch's answers for every stream: the same keys
kept, the same figures, the same evictions (the lightest key by (weight, key), the same
errors and floor), the same `to_json`. What differs is where the figures live: per-key
counters and a dense wait histogram in C arrays, a key -> slot dict, and a C min-heap of
(weight, slot) with the same lazy repair. Recording a request for a tracked key is a dict
lookup and a few adds; admitting a new key into a full sketch costs O(log capacity) in C.
Nothing is allocated per request, so recording adds no work for the garbage collector.

Reads (`to_json`) build the pure Sketch's JSON form; everything else (merges, reports,
snapshots of closed sub-windows) runs on the pure classes.

Counters are 64-bit: a sum of waits overflows after about 2.9e5 years of waiting, which
`ContentionStats` cannot reach (each wait is capped at 1e6 s).
"""

from cpython.dict cimport PyDict_DelItem, PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM
from cpython.long cimport PyLong_AsSsize_t
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_Compare
from libc.stdint cimport int32_t, int64_t, uint64_t
from libc.string cimport memset

# Per-key counters, in the order of KeyStats's fields (and of its JSON row).
cdef enum:
    F_REQUESTS = 0
    F_CONTENDED = 1
    F_TIMEOUTS = 2
    F_INSUFFICIENT = 3
    F_ERRORS = 4
    F_WAIT = 5
    F_WAIT_MAX = 6
    F_SCRIPT = 7
    F_ERROR = 8
    NF = 9

# At most this many wait buckets (two 64-bit masks per key); WaitGrid has at most 84.
cdef enum:
    MAX_BUCKETS = 128

# Outcome codes (anything but these three is an error, as in Sketch.add).
cdef enum:
    O_OK = 0
    O_TIMEOUT = 1
    O_INSUFFICIENT = 2
    O_ERROR = 3


cdef inline int _outcome_code(object outcome) except -1:
    if outcome == "ok":
        return O_OK
    if outcome == "timeout":
        return O_TIMEOUT
    if outcome == "insufficient":
        return O_INSUFFICIENT
    return O_ERROR


cdef class LiveSketch:
    """Weighted space-saving summary of at most `capacity` keys (see stockhold.contention).

    `buckets` is the number of wait-histogram buckets (WaitGrid.buckets): every bucket
    recorded must be below it.
    """

    cdef readonly Py_ssize_t capacity
    cdef readonly Py_ssize_t buckets
    cdef int64_t _floor
    cdef int64_t _total
    cdef Py_ssize_t _n
    cdef dict _index  # key -> slot (an int of _slot_ids)
    cdef list _keys  # slot -> key
    cdef list _skus  # slot -> sku
    cdef list _slot_ids  # slot -> the int object stored in _index
    cdef int64_t *_f  # slot * NF + field
    cdef int64_t *_hist  # slot * buckets + bucket, valid where its bit in _mask is set
    cdef uint64_t *_mask  # slot * 2 + bucket // 64: buckets this key has a count in
    cdef int64_t *_hw  # heap: weight when pushed
    cdef int32_t *_hs  # heap: slot

    def __cinit__(self, Py_ssize_t capacity, Py_ssize_t buckets):
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if capacity > 2**31 - 1 or buckets < 1 or buckets > MAX_BUCKETS:
            raise ValueError(f"capacity or buckets out of range (buckets: 1..{MAX_BUCKETS})")
        self.capacity = capacity
        self.buckets = buckets
        self._floor = 0
        self._total = 0
        self._n = 0
        self._index = {}
        self._keys = [None] * capacity
        self._skus = [None] * capacity
        self._slot_ids = list(range(capacity))
        self._f = <int64_t *> PyMem_Malloc(capacity * NF * sizeof(int64_t))
        self._hist = <int64_t *> PyMem_Malloc(capacity * buckets * sizeof(int64_t))
        self._mask = <uint64_t *> PyMem_Malloc(capacity * 2 * sizeof(uint64_t))
        self._hw = <int64_t *> PyMem_Malloc(capacity * sizeof(int64_t))
        self._hs = <int32_t *> PyMem_Malloc(capacity * sizeof(int32_t))
        if not self._f or not self._hist or not self._mask or not self._hw or not self._hs:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self._f)
        PyMem_Free(self._hist)
        PyMem_Free(self._mask)
        PyMem_Free(self._hw)
        PyMem_Free(self._hs)

    @property
    def floor(self):
        """Upper bound of the true weight of any key not held (0: nothing was dropped)."""
        return self._floor

    @property
    def total(self):
        """Sum of every weight recorded (tracked or not): wait µs + requests."""
        return self._total

    def __len__(self):
        return self._n

    def __contains__(self, key):
        return key in self._index

    # -- the heap: entries (weight when pushed, slot), ordered as (weight, key) tuples --------
    cdef inline bint _less(self, Py_ssize_t i, Py_ssize_t j) except -1:
        cdef int64_t wi = self._hw[i], wj = self._hw[j]
        if wi != wj:
            return wi < wj
        return PyUnicode_Compare(
            <object> PyList_GET_ITEM(self._keys, self._hs[i]),
            <object> PyList_GET_ITEM(self._keys, self._hs[j]),
        ) < 0

    cdef int _sift_down_from_top(self) except -1:
        """Restore the heap after its top entry grew (heapq's _siftup)."""
        cdef Py_ssize_t n = self._n, pos = 0, child
        cdef int64_t w = self._hw[0]
        cdef int32_t s = self._hs[0]
        while True:
            child = 2 * pos + 1
            if child >= n:
                break
            if child + 1 < n and self._less(child + 1, child):
                child += 1
            if not self._less_entry(child, w, s):
                break
            self._hw[pos] = self._hw[child]
            self._hs[pos] = self._hs[child]
            pos = child
        self._hw[pos] = w
        self._hs[pos] = s
        return 0

    cdef inline bint _less_entry(self, Py_ssize_t i, int64_t w, int32_t s) except -1:
        """Heap entry i < (w, key of slot s)."""
        cdef int64_t wi = self._hw[i]
        if wi != w:
            return wi < w
        return PyUnicode_Compare(
            <object> PyList_GET_ITEM(self._keys, self._hs[i]),
            <object> PyList_GET_ITEM(self._keys, s),
        ) < 0

    cdef int _push(self, int64_t w, int32_t s) except -1:
        """Append (w, slot s) at position _n - 1 (already counted) and sift it up."""
        cdef Py_ssize_t pos = self._n - 1, parent
        while pos > 0:
            parent = (pos - 1) >> 1
            if not self._entry_less(w, s, parent):
                break
            self._hw[pos] = self._hw[parent]
            self._hs[pos] = self._hs[parent]
            pos = parent
        self._hw[pos] = w
        self._hs[pos] = s
        return 0

    cdef inline bint _entry_less(self, int64_t w, int32_t s, Py_ssize_t i) except -1:
        """(w, key of slot s) < heap entry i."""
        cdef int64_t wi = self._hw[i]
        if w != wi:
            return w < wi
        return PyUnicode_Compare(
            <object> PyList_GET_ITEM(self._keys, s),
            <object> PyList_GET_ITEM(self._keys, self._hs[i]),
        ) < 0

    cdef inline int64_t _weight(self, Py_ssize_t slot) noexcept:
        cdef int64_t *row = self._f + slot * NF
        return row[F_WAIT] + row[F_REQUESTS] + row[F_ERROR]

    cdef Py_ssize_t _admit(self, str key, object sku, int64_t weight) except -1:
        """Track a new key whose first request weighs `weight`, evicting the lightest if full."""
        cdef Py_ssize_t slot
        cdef int64_t low, current
        cdef int32_t victim
        if self._n < self.capacity:
            slot = self._n
            self._n += 1
            memset(self._f + slot * NF, 0, NF * sizeof(int64_t))
            self._mask[2 * slot] = self._mask[2 * slot + 1] = 0
            self._keys[slot] = key
            self._skus[slot] = sku
            self._push(weight, <int32_t> slot)
        else:
            while True:  # repair entries of keys that grew since they were pushed
                low = self._hw[0]
                victim = self._hs[0]
                current = self._weight(victim)
                if current == low:
                    break
                self._hw[0] = current
                self._sift_down_from_top()
            slot = victim
            PyDict_DelItem(self._index, self._keys[slot])
            self._floor = low
            # The histogram is not cleared: its buckets count only once their bit is set.
            memset(self._f + slot * NF, 0, NF * sizeof(int64_t))
            self._mask[2 * slot] = self._mask[2 * slot + 1] = 0
            self._f[slot * NF + F_ERROR] = low
            self._keys[slot] = key
            self._skus[slot] = sku
            self._hw[0] = low + weight
            self._sift_down_from_top()
        PyDict_SetItem(self._index, key, self._slot_ids[slot])
        return slot

    cdef int _add(
        self,
        object key,
        object sku,
        int64_t wait_us,
        int64_t script_us,
        Py_ssize_t bucket,
        bint contended,
        int outcome,
    ) except -1:
        cdef int64_t weight = wait_us + 1
        cdef Py_ssize_t slot
        cdef PyObject *found = PyDict_GetItem(self._index, key)
        if found is NULL:
            if type(key) is not str:
                raise TypeError("a key must be a str")
            slot = self._admit(<str> key, sku, weight)
        else:
            slot = PyLong_AsSsize_t(<object> found)
        cdef int64_t *row = self._f + slot * NF
        row[F_REQUESTS] += 1
        row[F_WAIT] += wait_us
        if wait_us > row[F_WAIT_MAX]:
            row[F_WAIT_MAX] = wait_us
        row[F_SCRIPT] += script_us
        cdef uint64_t *mask = self._mask + 2 * slot + (bucket >> 6)
        cdef uint64_t bit = (<uint64_t> 1) << (bucket & 63)
        if mask[0] & bit:
            self._hist[slot * self.buckets + bucket] += 1
        else:
            mask[0] |= bit
            self._hist[slot * self.buckets + bucket] = 1
        if contended:
            row[F_CONTENDED] += 1
        if outcome == O_TIMEOUT:
            row[F_TIMEOUTS] += 1
        elif outcome == O_INSUFFICIENT:
            row[F_INSUFFICIENT] += 1
        elif outcome == O_ERROR:
            row[F_ERRORS] += 1
        self._total += weight
        return 0

    cdef int _check(self, int64_t wait_us, int64_t script_us, Py_ssize_t bucket) except -1:
        if wait_us < 0 or script_us < 0:
            raise ValueError("waits and script times are µs >= 0")
        if not 0 <= bucket < self.buckets:
            raise ValueError(f"bucket {bucket} outside 0..{self.buckets - 1}")
        return 0

    def add(
        self,
        key,
        sku,
        int64_t wait_us,
        int64_t script_us,
        Py_ssize_t bucket,
        bint contended,
        outcome,
    ):
        """Count one request of `key` (as Sketch.add)."""
        self._check(wait_us, script_us, bucket)
        self._add(key, sku, wait_us, script_us, bucket, contended, _outcome_code(outcome))

    def add_units(
        self,
        units,
        contended,
        int64_t wait_us,
        int64_t script_us,
        Py_ssize_t bucket,
        outcome,
    ):
        """Count one request for each of its units (`unit_id`, `sku`); `contended[i]` is
        units[i]'s flag (as Sketch.add_units)."""
        cdef Py_ssize_t i, n = len(units)
        if len(contended) != n:
            raise ValueError("one contended flag per unit")
        self._check(wait_us, script_us, bucket)
        cdef int code = _outcome_code(outcome)
        for i in range(n):
            u = units[i]
            self._add(u.unit_id, u.sku, wait_us, script_us, bucket, contended[i], code)

    cdef list _row(self, Py_ssize_t slot):
        cdef int64_t *row = self._f + slot * NF
        cdef int64_t *hist = self._hist + slot * self.buckets
        cdef uint64_t *mask = self._mask + 2 * slot
        cdef Py_ssize_t b
        cdef list flat = []
        for b in range(self.buckets):
            if mask[b >> 6] & ((<uint64_t> 1) << (b & 63)):
                flat.append(b)
                flat.append(hist[b])
        return [
            self._keys[slot],
            self._skus[slot],
            row[F_REQUESTS],
            row[F_CONTENDED],
            row[F_TIMEOUTS],
            row[F_INSUFFICIENT],
            row[F_ERRORS],
            row[F_WAIT],
            row[F_WAIT_MAX],
            row[F_SCRIPT],
            row[F_ERROR],
            flat,
        ]

    def to_json(self, limit=None):
        """Sketch.to_json: {"floor", "total", "keys": rows}; with `limit`, only the heaviest
        `limit` keys, the floor raised to the weight of the heaviest one left out."""
        cdef Py_ssize_t slot, keep
        cdef object floor = self._floor
        cdef list rows
        if limit is not None and limit < self._n:
            ranked = sorted(
                [(self._weight(slot), self._keys[slot], slot) for slot in range(self._n)],
                reverse=True,
            )
            keep = max(limit, 0)
            rows = [self._row(entry[2]) for entry in ranked[:keep]]
            floor = max(self._floor, ranked[keep][0])
        else:
            rows = [self._row(slot) for slot in range(self._n)]
        return {"floor": floor, "total": self._total, "keys": rows}



cdef inline int64_t _to_us(double seconds) noexcept:
    """contention._to_us: integer µs; negative or NaN reads as 0, absurd values are capped."""
    if seconds > 0.0:
        if seconds < 1e6:
            return <int64_t> (seconds * 1e6 + 0.5)
        return 1000000000000
    return 0


cdef Py_ssize_t _bisect_left(tuple edges, int64_t value) except -1:
    """bisect.bisect_left(edges, value) for a tuple of floats (value < 2**53: exact)."""
    cdef Py_ssize_t lo = 0, hi = len(edges), mid
    cdef double v = <double> value
    while lo < hi:
        mid = (lo + hi) >> 1
        if <double> edges[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


def record_pair(
    LiveSketch since,
    LiveSketch current,
    units,
    contended,
    double waited_s,
    double script_s,
    outcome,
    tuple edges,
):
    """Count one request for each of its units in both sketches (stockhold.contention's
    _record_pair: the waits to µs, the wait's bucket on `edges`, then add_units to each)."""
    cdef int64_t wait_us = _to_us(waited_s)
    cdef int64_t script_us = _to_us(script_s)
    cdef Py_ssize_t bucket = _bisect_left(edges, wait_us)
    cdef Py_ssize_t i, n = len(units)
    if len(contended) != n:
        raise ValueError("one contended flag per unit")
    since._check(wait_us, script_us, bucket)
    current._check(wait_us, script_us, bucket)
    cdef int code = _outcome_code(outcome)
    cdef bint busy
    for i in range(n):
        u = units[i]
        key = u.unit_id
        sku = u.sku
        busy = contended[i]
        since._add(key, sku, wait_us, script_us, bucket, busy, code)
        current._add(key, sku, wait_us, script_us, bucket, busy, code)


cdef class ContentionTracker:
    """stockhold.contention.PyContentionTracker, compiled: which keys have a request queued
    or in flight in this process, for `contended`."""

    cdef dict _inflight

    def __cinit__(self):
        self._inflight = {}

    def __len__(self):
        return len(self._inflight)

    cdef inline bint _begin(self, object key) except -1:
        cdef PyObject *found = PyDict_GetItem(self._inflight, key)
        if found is NULL:
            self._inflight[key] = 1
            return False
        self._inflight[key] = (<object> found) + 1
        return True

    cdef inline int _end(self, object key) except -1:
        cdef PyObject *found = PyDict_GetItem(self._inflight, key)
        if found is NULL:
            return 0
        count = <object> found
        if count > 1:
            self._inflight[key] = count - 1
        else:
            PyDict_DelItem(self._inflight, key)
        return 0

    def begin(self, key):
        """A request for `key` starts; True when another one for it is already under way."""
        return self._begin(key)

    def end(self, key):
        """A request for `key` is done (an unmatched end is ignored: stats never raise)."""
        self._end(key)

    def begin_units(self, units):
        """`begin` for each unit's `unit_id`: the request's contended flags, in order."""
        cdef Py_ssize_t i, n = len(units)
        cdef list flags = [None] * n
        for i in range(n):
            flags[i] = self._begin(units[i].unit_id)
        return flags

    def end_units(self, units):
        """`end` for each unit's `unit_id`."""
        for u in units:
            self._end(u.unit_id)
