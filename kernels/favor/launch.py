"""Every Triton launch the FAVOR+ forward and backward make, decided in one place.

`launches(D, Dv, m, dtype)` says, for head dim ``D``, value dim ``Dv``, ``m`` features and the
input dtype, each kernel's constexprs (block sizes, operand dtypes), ``num_warps``,
``num_stages`` and the Triton type of every runtime argument. `triton_ops` launches the kernels
of `triton_forward` and `triton_backward` through it, and the compile check (`aot.py`,
tests/test_favor_compile.py) compiles exactly these launches for sm_90 without a GPU, so what is
checked is what runs.

Operand dtypes (every dot accumulates in fp32; S, z and all partial sums stay fp32 in memory):

- ``X_OP``, the projection ``x W^T``: bf16 / fp16 inputs multiply on the tensor cores in their
  own dtype, so x enters unrounded; ``W`` is split into ``hi + lo`` of that dtype (two dots) since
  rounding W once was measured to double dq's error. fp32 inputs: one TF32 dot (measured with
  the tensor cores' truncation emulated: 7e-4 output, 2.7e-3 dq/dk error, against ~1e-6 in
  fp32; the interpreter multiplies fp32 exactly, so CPU tests keep 1e-4). Rounding operands to
  the nearest TF32 before the dot gave 3e-4 / 2.1e-3 but made fp32 D=128 kernels spill.
- ``F_OP``, the feature-side dots (features times v / S / gradients, ``dU W``): fp32 operands,
  TF32 products, for every input dtype. Rounding them to bf16 was measured (interpreter emulation,
  bf16 inputs, D=64, m=256, lengths 300 and 17) at 0.8% error in the output and 1.4-1.5% in
  dq/dk/dv (1.9% for dq of the 300-row sequence) against the float64 reference, over the 1e-2
  bound: dA = dnum S^T + dden z^T cancels to a small difference of large terms, and so does
  dq' = dU W - rowsum(dU) q'. With TF32 operands (low mantissa bits truncated, the worst case)
  it is 0.4% / 0.5-0.6%, also at L=4096; splitting them into bf16 hi + lo (three dots) gained
  only ~0.1%. fp16 would have the precision but not the range (S, g / den). So of the 11 dots
  per row block over the five kernels, the 5 projections run at the bf16 rate (as 2 dots each,
  hi and lo) and the 6 feature-side ones at the TF32 rate (half of it).
- For the same cancellation the backward uses the output the forward computed in fp32, not the
  bf16/fp16 one it returned: the forward also writes the rounding error ``out_lo`` (bf16,
  ``O_LO``). Without it a one-token sequence, whose dq is exactly 0, got ~1% of the others' dq.

Under Triton's interpreter (``TRITON_INTERPRET=1``, the CPU tests) ``EMULATE`` is set: the kernels
round each operand to the same operand dtype and then multiply in fp32, because the interpreter's
own bf16/fp16 ``tl.dot`` is wrong. A product of two bf16 (or fp16) numbers is exact in fp32, so
the interpreter computes what the tensor cores compute up to the order of the fp32 sums. For
half-precision inputs it also truncates fp32 operands to TF32 (``EMULATE=2``); for fp32 inputs it
does not, so their CPU tests check the math to 1e-4 (GPU: ~1e-3). So the CPU tests check which
values are rounded, where and how much; the compile check (aot.py) that the GPU code uses wgmma
and fits; the GPU tests the compiled numbers themselves.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from . import triton_backward as B
from . import triton_forward as F

CHUNK = 1024  # most rows per program of the per-chunk kernels (`_key_state`, `_query_grad_state`)

# (head dim) -> (rows per tile BL, features per block BM, num_warps, num_stages), chosen with
# `python -m kernels.favor.aot` so that no kernel spills on sm_90 (table: benchmarks/favor_notes.md).
# BM=64 at D=64 left `_key_grad` at 255 registers with a 24 B spill (fp32, m=128); BM=32 gives
# headroom (<= 255, no spill) and <= 82 KB shared. D=128 needs 8 warps for its [64, 128] fp32
# accumulators (4 warps spill), and BM=32 to stay under ~164 KB shared (BM=64: 246-262 KB, over
# the 227 KB limit). num_stages=1 was tried: less shared memory but more registers, and spills.
BLOCKS = {16: (64, 64, 4, 2), 32: (64, 64, 4, 2), 64: (64, 32, 4, 2), 128: (64, 32, 8, 2)}

_TRITON_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_TL_DTYPE = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
# the feature-side operand dtype per input dtype (see the module docstring for why not bf16)
_FEATURE_OP = {"fp32": "fp32", "bf16": "fp32", "fp16": "fp32"}

# What every runtime argument of the kernels is. Pointers: "io" = the input dtype (q, k, v, the
# output and the gradients), "x" / "f" = the operand dtypes X_OP / F_OP (the projection copies),
# else a fixed type. Integers that are strides are multiples of 16 elements at every call (head
# dims are powers of two >= 16), which Triton also specializes on at run time.
_ARG_KIND = {
    **{p: "io" for p in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "g_ptr", "dq_ptr", "dk_ptr", "dv_ptr")},
    "w_ptr": "x", "wf_ptr": "f", "olo_ptr": "olo",
    **{p: "*i32" for p in ("chunk_start_ptr", "chunk_len_ptr", "tile_start_ptr", "tile_len_ptr",
                           "tile_seq_ptr")},
    **{p: "*fp32" for p in ("s_ptr", "z_ptr", "mx_ptr", "vsum_ptr", "den_ptr", "qmax_ptr", "ds_ptr",
                            "dz_ptr")},
    "n_heads": "i32", "n_fblocks": "i32",
    "scale_in": "fp32", "eps": "fp32", "feat_scale": "fp32",
}


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (then ``EMULATE`` is set, see above)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``kernel[grid](*runtime_args, **constexprs, num_warps, num_stages)``.
    ``arg_types``: the Triton type of each runtime argument, in order ("*bf16", "i32", "fp32")."""

    kernel: triton.runtime.JITFunction
    constexprs: dict
    num_warps: int
    num_stages: int
    arg_types: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def __call__(self, grid, *args):
        if len(args) != len(self.arg_types):
            raise TypeError(f"{self.name} takes {len(self.arg_types)} runtime arguments "
                            f"({', '.join(self.arg_types)}), got {len(args)}")
        return self.kernel[grid](*args, **self.constexprs, num_warps=self.num_warps, num_stages=self.num_stages)

    def signature(self) -> tuple[dict, dict]:
        """``(signature, attrs)`` for ``triton.compiler.ASTSource``: pointers 16-byte aligned and
        strides multiples of 16 (as Triton specializes them at run time for our tensors)."""
        sig, attrs = {}, {}
        for i, name in enumerate(self.kernel.arg_names):
            if name in self.constexprs:
                sig[name] = "constexpr"
                continue
            sig[name] = self.arg_types[name]
            if sig[name].startswith("*") or name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, attrs


@dataclass(frozen=True)
class FavorLaunches:
    """The launches of one (D, Dv, m, dtype): forward ``key_state``, ``query_out``; backward
    ``query_grad_state``, ``query_grad``, ``key_grad``. ``w_dtype`` / ``wf_dtype``: the torch
    dtypes of the projection copies the kernels read (``w_ptr`` / ``wf_ptr``)."""

    key_state: Launch
    query_out: Launch
    query_grad_state: Launch
    query_grad: Launch
    key_grad: Launch
    w_dtype: torch.dtype
    wf_dtype: torch.dtype
    chunk_rows: int = CHUNK

    def projection_operands(self, projection: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w, wf)``: the projection [m, D] as the kernels read it. ``w`` [2, m, D] in ``X_OP``
        (hi, lo with ``W = hi + lo``) for half-precision inputs, [1, m, D] fp32 otherwise;
        ``wf`` [m, D] in ``F_OP``."""
        w32 = projection.to(device=device, dtype=torch.float32)
        if self.w_dtype == torch.float32:
            w = w32[None].contiguous()
        else:
            hi = w32.to(self.w_dtype)
            w = torch.stack([hi, (w32 - hi.float()).to(self.w_dtype)]).contiguous()
        return w, w32.to(self.wf_dtype).contiguous()

    def all(self) -> list[Launch]:
        return [self.key_state, self.query_out, self.query_grad_state, self.query_grad, self.key_grad]


def feature_block(m: int, most: int = 64) -> int:
    for bm in (128, 64, 32, 16):
        if bm <= most and m % bm == 0:
            return bm
    raise ValueError(f"the number of features m={m} must be a multiple of 16 (draw_projection(m, ...))")


def _types(kernel, io: str, x: str, f: str, constexprs: dict) -> dict:
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            continue
        if name.startswith("stride_"):
            types[name] = "i32"
            continue
        if name not in _ARG_KIND:
            raise KeyError(f"kernel argument {kernel.fn.__name__}.{name} has no type in launch._ARG_KIND: add it")
        kind = _ARG_KIND[name]
        # the output's rounding error: bf16 (small numbers: fp16 would lose them); fp32 inputs
        # pass the output itself, unread
        olo = "*fp32" if io == "fp32" else "*bf16"
        types[name] = {"io": "*" + io, "x": "*" + x, "f": "*" + f, "olo": olo}.get(kind, kind)
    return types


def launches(d: int, dv: int, m: int, dtype: torch.dtype, *, block_rows: int | None = None,
             emulate: bool | None = None) -> FavorLaunches:
    """The launches for q, k [T, H, d], v [T, H, dv], projection [m, d] and inputs of ``dtype``.
    ``block_rows`` overrides the rows per tile (tests use small tiles); ``emulate`` defaults to
    whether Triton's interpreter is on. Cached: every forward and backward asks."""
    return _launches(d, dv, m, dtype, block_rows, interpreting() if emulate is None else bool(emulate))


@functools.lru_cache(maxsize=256)
def _launches(d: int, dv: int, m: int, dtype: torch.dtype, block_rows: int | None, emulate: bool) -> FavorLaunches:
    if dtype not in _TRITON_DTYPE:
        raise TypeError(f"FAVOR+ kernels take fp32, bf16 or fp16 inputs, not {dtype}: cast q, k, v first")
    if d & (d - 1) or dv & (dv - 1) or d < 16 or dv < 16:
        raise ValueError(f"head dims must be powers of two >= 16 (got D={d}, Dv={dv}); pad the heads")
    io = _TRITON_DTYPE[dtype]
    x, f = io, _FEATURE_OP[io]
    bl, bm_most, warps, stages = BLOCKS.get(max(d, dv), BLOCKS[128])
    if block_rows is not None:
        if block_rows < 16 or block_rows & (block_rows - 1):
            raise ValueError(f"block_rows must be a power of two >= 16, got {block_rows}")
        bl = block_rows
    bm = feature_block(m, bm_most)
    # interpreter: 1 = round half-precision operands as the tensor cores take them; 2 = also cut
    # fp32 operands to TF32, for half-precision inputs only (fp32 inputs keep exact CPU checks)
    emulation = 0 if not emulate else (1 if io == "fp32" else 2)
    consts = dict(D=d, DV=dv, BL=bl, BM=bm, M_FEAT=m, X_OP=_TL_DTYPE[x], F_OP=_TL_DTYPE[f], O_LO=io != "fp32",
                  EMULATE=emulation)

    def make(kernel):
        c = {k: val for k, val in consts.items() if k in kernel.arg_names}
        return Launch(kernel, c, warps, stages, _types(kernel, io, x, f, c))

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return FavorLaunches(make(F._key_state), make(F._query_out), make(B._query_grad_state), make(B._query_grad),
                         make(B._key_grad), torch_dtype[x], torch_dtype[f])


def compile_grid(head_dims=(16, 32, 64, 128), features=(128, 256),
                 dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> list[tuple]:
    """``(dtype, D, m, Launch)`` for every launch the compile check covers (Dv = D)."""
    return [(dt, d, m, launch) for dt in dtypes for d in head_dims for m in features
            for launch in launches(d, d, m, dt, emulate=False).all()]
