"""ONNX Runtime's C API through ctypes: sessions that share pre-packed weights (no torch).

Only the C API lets sessions share an `OrtPrepackedWeightsContainer`; the Python API has no
way to pass one. All heads and tails of one pruning ratio point into the same
`r{ratio}.weights.bin`: its tensors are mapped once, read-only, and added to each session as
shared initializers, so the ratio's weights are pre-packed (made GEMM-ready) once instead of
once per session. The kernels are the same, so outputs are bit-identical to
`onnxruntime.InferenceSession`. The library is the one inside the onnxruntime wheel.
"""

from __future__ import annotations

import contextlib
import ctypes as C
import glob
import importlib.util
import logging
import mmap
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgetok.models.bundle import BundleError

# onnxruntime 1.31 on Linux records a device id for telemetry unless told not to.
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

log = logging.getLogger(__name__)

# OrtApi version asked for: 16 (ORT 1.16) has every call used here; newer libraries serve it
# unchanged, older ones refuse and the Python API is used instead.
ORT_API_VERSION = 16
# Slots in the OrtApi function table (an append-only ABI; see onnxruntime_c_api.h).
_SLOTS = dict(
    GetErrorMessage=2, CreateEnv=3, DisableTelemetryEvents=6, CreateSession=7, Run=9,
    CreateSessionOptions=10, SetIntraOpNumThreads=24, SetInterOpNumThreads=25,
    SessionGetInputCount=30, SessionGetOutputCount=31, SessionGetInputName=36,
    SessionGetOutputName=37, CreateTensorWithDataAsOrtValue=49, GetTensorMutableData=51,
    GetTensorElementType=60, GetDimensionsCount=61, GetDimensions=62, GetTensorTypeAndShape=65,
    CreateCpuMemoryInfo=69, AllocatorFree=76, GetAllocatorWithDefaultOptions=78,
    ReleaseStatus=93, ReleaseSession=95, ReleaseValue=96, ReleaseTensorTypeAndShapeInfo=99,
    ReleaseSessionOptions=100, AddInitializer=150, CreatePrepackedWeightsContainer=166,
    ReleasePrepackedWeightsContainer=167, CreateSessionWithPrepackedWeightsContainer=168)
# ONNX element types (TensorProto.DataType; ORT uses the same codes) numpy holds natively.
_DTYPES: dict[int, np.dtype[Any]] = {c: np.dtype(t) for c, t in (
    (1, np.float32), (2, np.uint8), (3, np.int8), (5, np.int16), (6, np.int32), (7, np.int64),
    (9, np.bool_), (10, np.float16), (11, np.float64))}
_CODES = {dt: code for code, dt in _DTYPES.items()}
ORT_LOG_WARNING = 2  # the Python API's default: warnings and errors go to stderr


class OrtError(RuntimeError):
    """ONNX Runtime refused a call (bad model, wrong input shape or type)."""


class _Api:
    """The OrtApi function table of one loaded libonnxruntime, and the process's env."""

    def __init__(self, lib: C.CDLL) -> None:
        class ApiBase(C.Structure):
            _fields_ = [("GetApi", C.CFUNCTYPE(C.c_void_p, C.c_uint32)),
                        ("GetVersionString", C.CFUNCTYPE(C.c_char_p))]

        lib.OrtGetApiBase.restype = C.POINTER(ApiBase)
        base = lib.OrtGetApiBase().contents
        self.version = (base.GetVersionString() or b"?").decode()
        table = base.GetApi(ORT_API_VERSION)
        if not table:
            raise OSError(f"libonnxruntime {self.version} lacks OrtApi {ORT_API_VERSION}")
        self._table = C.cast(table, C.POINTER(C.c_void_p))
        self._fns: dict[tuple[str, Any], Any] = {}
        self.env = self.new("CreateEnv", C.c_int(ORT_LOG_WARNING), b"edgetok")
        self.call("DisableTelemetryEvents", self.env)
        self.cpu = self.new("CreateCpuMemoryInfo", C.c_int(0), C.c_int(0))
        self.allocator = self.new("GetAllocatorWithDefaultOptions")

    def _fn(self, name: str, restype: Any, *argtypes: Any) -> Any:
        # Callers pass pointers as c_void_p (a bare int would be narrowed to a C int). The
        # bound functions are cached: building one costs about as much as a small head's run.
        fn = self._fns.get((name, restype))
        if fn is None:
            proto = C.CFUNCTYPE(restype, *argtypes)  # releases the GIL during the call
            fn = self._fns[(name, restype)] = proto(self._table[_SLOTS[name]])
        return fn

    def call(self, name: str, *args: Any) -> None:
        """Call a function that returns an OrtStatus; raise OrtError on failure."""
        status = self._fn(name, C.c_void_p)(*args)
        if status:
            msg = self._fn("GetErrorMessage", C.c_char_p, C.c_void_p)(status) or b""
            self.release("ReleaseStatus", status)
            raise OrtError(f"{name}: {msg.decode(errors='replace')}")

    def new(self, name: str, *args: Any) -> C.c_void_p:
        """Call a function whose last argument is an out-pointer; return that handle."""
        out = C.c_void_p()
        self.call(name, *args, C.byref(out))
        return out

    def release(self, name: str, handle: C.c_void_p | int | None) -> None:
        """Release a handle (ORT accepts NULL)."""
        self._fn(name, None, C.c_void_p)(handle)

    def tensor(self, arr: np.ndarray) -> C.c_void_p:
        """An OrtValue over `arr`'s memory (no copy): `arr` must outlive it."""
        code = _CODES.get(arr.dtype)
        if code is None:
            raise OrtError(f"unsupported tensor type {arr.dtype}")
        return self.new("CreateTensorWithDataAsOrtValue", self.cpu, C.c_void_p(arr.ctypes.data),
                        C.c_size_t(arr.nbytes), (C.c_int64 * arr.ndim)(*arr.shape),
                        C.c_size_t(arr.ndim), C.c_int(code))

    def to_numpy(self, value: C.c_void_p) -> np.ndarray:
        """Copy a tensor OrtValue into a new (writable) numpy array."""
        info = self.new("GetTensorTypeAndShape", value)
        try:
            code, n = C.c_int(), C.c_size_t()
            self.call("GetTensorElementType", info, C.byref(code))
            self.call("GetDimensionsCount", info, C.byref(n))
            dims = (C.c_int64 * n.value)()
            self.call("GetDimensions", info, dims, n)
        finally:
            self.release("ReleaseTensorTypeAndShapeInfo", info)
        if code.value not in _DTYPES:
            raise OrtError(f"unsupported output element type {code.value}")
        out = np.empty(tuple(dims), _DTYPES[code.value])
        if out.nbytes:
            C.memmove(out.ctypes.data, self.new("GetTensorMutableData", value), out.nbytes)
        return out

    def name(self, fn: str, session: C.c_void_p, index: int) -> str:
        """An input or output name (allocated by ORT, freed here)."""
        ptr = self.new(fn, session, C.c_size_t(index), self.allocator)
        try:
            return C.string_at(ptr.value or 0).decode()
        finally:
            self.call("AllocatorFree", self.allocator, ptr)


_api: _Api | None = None
_api_tried = False
_api_lock = threading.Lock()


def capi() -> _Api | None:
    """The process-wide C API binding, or None when no usable library is found."""
    global _api, _api_tried
    with _api_lock:
        if not _api_tried:
            _api_tried = True
            # The wheel ships the library next to its Python module; find it without
            # importing onnxruntime (that would load a second copy of ORT for nothing).
            spec = importlib.util.find_spec("onnxruntime")
            roots = list(spec.submodule_search_locations or []) if spec else []
            found = [p for r in roots for p in sorted(glob.glob(f"{r}/capi/libonnxruntime.so*"))]
            try:
                if not found:
                    raise OSError("libonnxruntime.so not found in the onnxruntime package")
                _api = _Api(C.CDLL(found[-1]))
            except (OSError, AttributeError, OrtError) as exc:
                log.warning("ONNX Runtime C API unavailable (%s): weights are not shared "
                            "between sessions", exc)
    return _api


@dataclass(frozen=True, slots=True)
class Initializer:
    """A tensor stored as ONNX external data: its name, type, and where its bytes are."""

    name: str
    dtype: np.dtype[Any]
    dims: tuple[int, ...]
    location: str
    offset: int
    length: int


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        value |= (buf[i] & 0x7F) << shift
        shift += 7
        i += 1
        if buf[i - 1] < 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) of one protobuf message: ints, or bytes for other wire types."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        value: Any
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 2, 5):
            n, i = (8, i) if wire == 1 else (4, i) if wire == 5 else _varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise BundleError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def external_initializers(model: Path) -> list[Initializer]:
    """The external-data initializers of an ONNX file, read without the `onnx` package.

    Field numbers from onnx.proto3: ModelProto.graph 7, GraphProto.initializer 5; in
    TensorProto dims 1, data_type 2, name 8, external_data 13 (key 1, value 2),
    data_location 14 (1 = EXTERNAL).
    """
    out = []
    for field, graph in _fields(model.read_bytes()):
        for tfield, tensor in _fields(graph) if field == 7 else ():
            if tfield != 5:
                continue
            dims: list[int] = []
            code, name, where, ext = 0, "", 0, {}
            for f, v in _fields(tensor):
                if f == 1 and isinstance(v, int):
                    dims.append(v)
                elif f == 1:  # packed repeated int64
                    j = 0
                    while j < len(v):
                        d, j = _varint(v, j)
                        dims.append(d)
                elif f in (2, 14):
                    code, where = (v, where) if f == 2 else (code, v)
                elif f == 8:
                    name = v.decode()
                elif f == 13:
                    kv = dict(_fields(v))
                    ext[kv.get(1, b"").decode()] = kv.get(2, b"").decode()
            if where != 1 or code not in _DTYPES or "location" not in ext:
                continue  # inline, or a type left to ORT to load itself
            size = int(np.prod(dims, dtype=np.int64)) * _DTYPES[code].itemsize
            out.append(Initializer(name, _DTYPES[code], tuple(dims), ext["location"],
                                   int(ext.get("offset", 0)), int(ext.get("length", size))))
    return out


class Weights:
    """One weights file mapped read-only, its tensors as OrtValues, and a prepack container."""

    def __init__(self, api: _Api, path: Path) -> None:
        self.api = api
        with path.open("rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.container = api.new("CreatePrepackedWeightsContainer")
        self.values: dict[tuple[int, str, tuple[int, ...]], C.c_void_p] = {}
        self._arrays: list[np.ndarray] = []
        weakref.finalize(self, _free_weights, api, self.container, self.values, self._arrays,
                         self.map)

    def value(self, t: Initializer) -> C.c_void_p | None:
        """The shared OrtValue of one tensor; None if it cannot be used in place."""
        key = (t.offset, t.dtype.str, t.dims)
        if key not in self.values:
            count = int(np.prod(t.dims, dtype=np.int64))
            if (t.offset % t.dtype.itemsize or t.length != count * t.dtype.itemsize
                    or t.offset + t.length > len(self.map)):
                return None  # ORT then reads this one itself
            arr = np.frombuffer(self.map, t.dtype, count, t.offset).reshape(t.dims)
            self._arrays.append(arr)
            self.values[key] = self.api.tensor(arr)
        return self.values[key]

    def drop_pages(self) -> None:
        """Drop the mapping's resident pages from this process (clean: re-read on demand).

        Pre-packing reads each GEMM weight once and the packed copy is what runs; left
        resident, the file pages would count the weights twice in RSS.
        """
        self.map.madvise(mmap.MADV_DONTNEED)


def _free_weights(api: _Api, container: C.c_void_p, values: dict[Any, C.c_void_p],
                  arrays: list[np.ndarray], mapping: mmap.mmap) -> None:
    for v in values.values():
        api.release("ReleaseValue", v)
    api.release("ReleasePrepackedWeightsContainer", container)
    arrays.clear()
    with contextlib.suppress(BufferError):  # a view is still alive; the GC unmaps later
        mapping.close()


@dataclass(frozen=True, slots=True)
class IOName:
    """An input or output of a session (the part of ORT's NodeArg that callers use)."""

    name: str


class Session(Protocol):
    """What callers use of a session; both CSession and ORT's InferenceSession have it."""

    def get_inputs(self) -> Sequence[Any]: ...
    def get_outputs(self) -> Sequence[Any]: ...
    def run(self, output_names: Sequence[str] | None, input_feed: dict[str, Any]) -> list[Any]:
        ...


class CSession:
    """One ORT session opened through the C API; released when garbage-collected."""

    def __init__(self, api: _Api, model: Path, threads: int,
                 shared: Sequence[tuple[Weights, Initializer]] = ()) -> None:
        self.api = api
        self._name_arrays: dict[tuple[str, ...], Any] = {}
        opts = api.new("CreateSessionOptions")
        weights = list({id(w): w for w, _ in shared}.values())
        try:
            api.call("SetIntraOpNumThreads", opts, C.c_int(threads))
            api.call("SetInterOpNumThreads", opts, C.c_int(1))
            for w, t in shared:
                value = w.value(t)
                if value is not None:
                    api.call("AddInitializer", opts, t.name.encode(), value)
            path = str(model).encode()
            if len(weights) == 1:  # one container per weights file
                self.handle = api.new("CreateSessionWithPrepackedWeightsContainer", api.env,
                                      path, opts, weights[0].container)
            else:
                self.handle = api.new("CreateSession", api.env, path, opts)
        finally:
            api.release("ReleaseSessionOptions", opts)
        # The finalizer holds the weights, so they outlive the session that points into them.
        weakref.finalize(self, _free_session, api, self.handle, weights)
        n = C.c_size_t()
        api.call("SessionGetInputCount", self.handle, C.byref(n))
        self.inputs = [IOName(api.name("SessionGetInputName", self.handle, i))
                       for i in range(n.value)]
        api.call("SessionGetOutputCount", self.handle, C.byref(n))
        self.outputs = [IOName(api.name("SessionGetOutputName", self.handle, i))
                        for i in range(n.value)]

    def _names(self, names: tuple[str, ...]) -> Any:
        """A C array of names, built once per distinct tuple (a per-run cost otherwise)."""
        arr = self._name_arrays.get(names)
        if arr is None:
            arr = self._name_arrays[names] = (C.c_char_p * len(names))(
                *(n.encode() for n in names))
        return arr

    def get_inputs(self) -> list[IOName]:
        """The model's inputs, in order."""
        return self.inputs

    def get_outputs(self) -> list[IOName]:
        """The model's outputs, in order."""
        return self.outputs

    def run(self, output_names: Sequence[str] | None,
            input_feed: dict[str, Any]) -> list[np.ndarray]:
        """As InferenceSession.run: the named outputs (all if None) as numpy arrays."""
        api = self.api
        in_names = self._names(tuple(input_feed))
        out_names = self._names(tuple(output_names or (o.name for o in self.outputs)))
        arrays = [np.ascontiguousarray(a) for a in input_feed.values()]
        ins, outs = (C.c_void_p * len(arrays))(), (C.c_void_p * len(out_names))()
        try:
            for i, a in enumerate(arrays):
                ins[i] = api.tensor(a)
            api.call("Run", self.handle, None, in_names, ins, C.c_size_t(len(arrays)),
                     out_names, C.c_size_t(len(out_names)), outs)
            return [api.to_numpy(C.c_void_p(v)) for v in outs]
        finally:
            for v in (*ins, *outs):
                if v:
                    api.release("ReleaseValue", v)


def _free_session(api: _Api, handle: C.c_void_p, weights: list[Weights]) -> None:
    api.release("ReleaseSession", handle)
    weights.clear()


_libc = C.CDLL(None) if os.name == "posix" else None


def malloc_trim() -> None:
    """Hand the heap freed by an evicted session back to the OS (glibc; else a no-op)."""
    trim = getattr(_libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
