"""Random projections of flattened LoRA gradients, D -> d_proj (ELREA eq. 5.6).

Every random choice (a sign, a bucket) is a pure function of (kind, seed, index): output
number `index` of SplitMix64 seeded with a key derived from (seed, kind). Integer arithmetic
is exact, so a CPU and a GPU, or two torch versions, build the same projection from the same
`ProjectorSpec` (unlike a torch RNG stream, or TRAK's fast_jl whose matrix depends on the
GPU's SM count). The sketches' O(D) tables are built once with numpy
uint64 on the CPU and moved to the device; the dense signs are regenerated on the device
with int64 torch ops (wraparound multiplication, checked against plain integers in the tests).
No projector ever holds a D x d_proj matrix unless it is small (< 64M entries).

All three kinds satisfy E<Px, Py> = <x, y>:
- `rademacher`: the paper's dense JL, R_ij = ±1/sqrt(d_proj), regenerated tile by tile
  on every call; O(D * d_proj) per batch, the faithful but slow reference.
- `countsketch`: coordinate i goes to bucket h(i) with sign s(i); O(D) per example.
- `sparse_jl`: `nnz` independent countsketches summed, scaled by 1/sqrt(nnz).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

KINDS = ("countsketch", "sparse_jl", "rademacher")

_MASK64 = (1 << 64) - 1
_CACHE_LIMIT = 64 * 2**20  # dense R is cached only below this many entries (256 MiB fp32)
_TILE_ENTRIES = 16 * 2**20  # entries of one generated sign tile on an accelerator (64 MiB fp32)
_TILE_ENTRIES_CPU = 2**20  # on CPU a 4 MiB tile stays in cache for the per-row GEMVs
_STREAM = {"countsketch": 1, "sparse_jl": 2, "rademacher": 3}


def _signed(u: int) -> int:
    """The int64 with the same 64 bits as the unsigned integer u."""
    u &= _MASK64
    return u - (1 << 64) if u >= 1 << 63 else u


_GOLDEN_U, _M1_U, _M2_U = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB  # splitmix64
_GOLDEN, _M1, _M2 = (_signed(c) for c in (_GOLDEN_U, _M1_U, _M2_U))  # the same bits as int64


def _mix64_(z: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function, in place on int64 z (wraparound = arithmetic mod 2^64).

    torch's >> is arithmetic for signed ints, so each logical shift masks off the copied sign
    bits; `scratch` (same shape) holds the shifted value, so nothing is allocated.
    """
    for shift, mult in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(z, shift, out=scratch).bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(scratch)
        if mult is not None:
            z.mul_(mult)
    return z


def _mix_int(x: int) -> int:
    """splitmix64 on a Python int, used to derive per-stream keys from (seed, kind, repeat)."""
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, kind: str, repeat: int = 0) -> int:
    """64-bit key (as int64) of one random stream; different kinds/repeats never share one."""
    return _signed(_mix_int(_mix_int(_mix_int(seed) ^ _STREAM[kind]) ^ repeat))


def _counter_(index: torch.Tensor, key: int) -> torch.Tensor:
    """In place: int64 index -> SplitMix64 state key + (index + 1) * golden."""
    return index.mul_(_GOLDEN).add_(_signed(key + _GOLDEN))


def hash64(key: int, index: torch.Tensor) -> torch.Tensor:
    """Random 64 bits (as int64) per index: output number `index` of SplitMix64 seeded with `key`.

    That is mix(key + (index + 1) * golden), a counter-based generator, so any entry can be
    produced on its own, on any device, in any order.
    """
    z = _counter_(index.to(torch.int64, copy=True), key)
    return _mix64_(z, torch.empty_like(z))


@dataclass(frozen=True)
class ProjectorSpec:
    """Everything that defines a projection; stored in `bundle.json` so test features match."""

    kind: str  # "countsketch" | "sparse_jl" | "rademacher"
    d_in: int  # D, the flattened LoRA gradient length
    d_proj: int  # output dimension (paper: 8192)
    seed: int = 0
    nnz: int = 4  # non-zeros per input coordinate, sparse_jl only
    block_size: int = 1024  # output columns generated per tile, rademacher only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ProjectorSpec.kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("d_in", "d_proj", "nnz", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProjectorSpec.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_proj >= 2**31:
            raise ValueError(f"ProjectorSpec.d_proj must be < 2**31, got {self.d_proj}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"ProjectorSpec.seed must be in [0, 2**63), got {self.seed}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ProjectorSpec":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"ProjectorSpec.from_dict got unknown keys {sorted(unknown)}")
        return cls(**d)


class Projector:
    """Maps gradients [B, D] (or [D]) to float32 [B, d_proj] (or [d_proj]) on their own device."""

    spec: ProjectorSpec

    def __init__(self, spec: ProjectorSpec, device: torch.device | str = "cpu") -> None:
        self.spec, self.device = spec, torch.device(device)

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        if grads.shape[-1] != self.spec.d_in or grads.dim() not in (1, 2):
            raise ValueError(
                f"grads must have shape [B, {self.spec.d_in}] or [{self.spec.d_in}], got {list(grads.shape)}"
            )
        x = grads.to(torch.float32)
        out = self._project(x.unsqueeze(0) if x.dim() == 1 else x)
        return out[0] if grads.dim() == 1 else out

    def _project(self, x: torch.Tensor) -> torch.Tensor:  # x [B, D] float32
        raise NotImplementedError


def _sketch_tables(key: int, d_in: int, d_proj: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Bucket [D] int32 in [0, d_proj) and sign [D] float32 in {-1, +1} for one countsketch.

    h = hash64(key, i); sign = 1 - 2 * (h & 1); bucket = ((h >> 32) * d_proj) >> 32, Lemire's
    multiply-shift on the high 32 bits (uniform without a modulo). Built with numpy uint64 on
    the CPU, in chunks with reused buffers, then moved: numpy is single-threaded, and torch's
    many small parallel ops were 5-20x slower on a 2-core machine that other processes shared
    (measured: D = 5e7 took 0.7 s single-threaded, 4-15 s with 2 contended OpenMP threads).
    """
    buckets = np.empty(d_in, dtype=np.int32)
    signs = np.empty(d_in, dtype=np.float32)
    step = min(d_in, 1 << 18)
    offsets = np.arange(1, step + 1, dtype=np.uint64) * np.uint64(_GOLDEN_U) + np.uint64(key & _MASK64)
    z, t = np.empty(step, dtype=np.uint64), np.empty(step, dtype=np.uint64)
    for lo in range(0, d_in, step):
        n = min(step, d_in - lo)
        h, tn = z[:n], t[:n]
        # SplitMix64 state key + (i + 1) * golden, i = lo + offset (uint64 arithmetic wraps mod 2^64).
        np.add(offsets[:n], np.uint64((lo * _GOLDEN_U) & _MASK64), out=h)
        for shift, mult in ((30, _M1_U), (27, _M2_U), (31, None)):
            np.bitwise_xor(h, np.right_shift(h, np.uint64(shift), out=tn), out=h)
            if mult is not None:
                np.multiply(h, np.uint64(mult), out=h)
        signs[lo : lo + n] = np.bitwise_and(h, np.uint64(1), out=tn)
        signs[lo : lo + n] *= -2.0
        signs[lo : lo + n] += 1.0
        np.right_shift(h, np.uint64(32), out=tn)
        np.multiply(tn, np.uint64(d_proj), out=tn)
        buckets[lo : lo + n] = np.right_shift(tn, np.uint64(32), out=tn)
    return torch.from_numpy(buckets).to(device), torch.from_numpy(signs).to(device)


class SketchProjector(Projector):
    """countsketch (nnz=1) and sparse_jl (nnz sketches summed, scaled by 1/sqrt(nnz)); O(nnz * D)."""

    def __init__(self, spec: ProjectorSpec, device: torch.device | str = "cpu") -> None:
        super().__init__(spec, device)
        repeats = 1 if spec.kind == "countsketch" else spec.nnz
        self.tables = [
            _sketch_tables(stream_key(spec.seed, spec.kind, r), spec.d_in, spec.d_proj, self.device)
            for r in range(repeats)
        ]
        self.scale = 1.0 / math.sqrt(repeats)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.spec.d_proj, dtype=torch.float32, device=x.device)
        for buckets, signs in self.tables:
            buckets, y = buckets.to(x.device), x * signs.to(x.device)
            if x.device.type == "cpu":
                # One 1-D scatter per row: torch's CPU index_add_ along dim 1 of a [B, d_proj]
                # output was 3.4x slower (measured, D = 2.4M, B = 8, 2 threads: 206 vs 60 ms),
                # and each row is then summed on its own, whatever the batch size.
                for i in range(x.shape[0]):
                    out[i].index_add_(0, buckets, y[i])
            else:
                out.index_add_(1, buckets, y)
        return out * self.scale if self.scale != 1.0 else out


_BYTE_SIGNS_CACHE: dict[torch.device, torch.Tensor] = {}


def _byte_signs(device: torch.device) -> torch.Tensor:
    """[256, 8] float32: entry [b, k] = +1 if bit k of byte b is 0 else -1."""
    if device not in _BYTE_SIGNS_CACHE:
        bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
        _BYTE_SIGNS_CACHE[device] = 1.0 - 2.0 * bits.to(torch.float32)
    return _BYTE_SIGNS_CACHE[device]


def _rowwise_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [B, K] @ m [K, N] -> [B, N]; on CPU one GEMV per row.

    MKL's GEMM sums a row in an order that depends on the batch size (measured: the rows of
    x @ R and x[i:i+1] @ R differ by ~1e-7 relative), so on CPU each row is multiplied alone,
    which makes a feature independent of its batch; at B = 8 this was also faster than GEMM.
    """
    if x.device.type != "cpu":
        return x @ m
    return torch.cat([x[i : i + 1] @ m for i in range(x.shape[0])])


class RademacherProjector(Projector):
    """Dense JL with R_ij = ±1/sqrt(d_proj) (ELREA eq. 5.6), never stored unless small.

    Sign R_ij is bit (j mod 64) of hash64(key, i * W + j // 64), W = ceil(d_proj / 64): one
    hash gives 64 signs. The matrix is a function of the spec alone; `block_size` only sets
    the tile width, so changing it changes memory and speed, not the result.
    """

    def __init__(self, spec: ProjectorSpec, device: torch.device | str = "cpu") -> None:
        super().__init__(spec, device)
        self.key = stream_key(spec.seed, spec.kind)
        self.words_per_row = -(-spec.d_proj // 64)
        self._cached: torch.Tensor | None = None
        if spec.d_in * spec.d_proj < _CACHE_LIMIT:
            self._cached = self.signs(0, spec.d_in, 0, spec.d_proj, self.device)

    def signs(self, row0: int, row1: int, col0: int, col1: int, device: torch.device) -> torch.Tensor:
        """The unscaled ±1 tile R[row0:row1, col0:col1] as float32 [rows, cols]."""
        w0, w1 = col0 // 64, -(-col1 // 64)
        rows = torch.arange(row0, row1, dtype=torch.int64, device=device).unsqueeze(1)
        words = hash64(self.key, rows * self.words_per_row + torch.arange(w0, w1, device=device))
        # Bytes of each word, low byte first; each byte looks its 8 signs up (~2 ns/entry on CPU).
        byte_idx = (words.unsqueeze(-1) >> torch.arange(0, 64, 8, device=device)) & 255
        tile = torch.nn.functional.embedding(byte_idx, _byte_signs(device)).reshape(row1 - row0, -1)
        return tile[:, col0 - w0 * 64 : col1 - w0 * 64]

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        spec, scale = self.spec, 1.0 / math.sqrt(self.spec.d_proj)
        if self._cached is not None:
            return _rowwise_matmul(x, self._cached.to(x.device)) * scale
        out = torch.zeros(x.shape[0], spec.d_proj, dtype=torch.float32, device=x.device)
        cols = min(spec.block_size, spec.d_proj)
        rows = max(1, (_TILE_ENTRIES_CPU if x.device.type == "cpu" else _TILE_ENTRIES) // cols)
        for c0 in range(0, spec.d_proj, cols):
            c1 = min(c0 + cols, spec.d_proj)
            for r0 in range(0, spec.d_in, rows):
                r1 = min(r0 + rows, spec.d_in)
                out[:, c0:c1] += _rowwise_matmul(x[:, r0:r1], self.signs(r0, r1, c0, c1, x.device))
        return out * scale


def make_projector(spec: ProjectorSpec, device: torch.device | str = "cpu") -> Projector:
    """The projector for `spec`, with its tables (if any) built on `device`."""
    cls = RademacherProjector if spec.kind == "rademacher" else SketchProjector
    return cls(spec, device)
