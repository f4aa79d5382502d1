"""4-bit (and MatMulNBits 8-bit) weight layouts.

Two layouts exist because two consumers read packed weights:

* ONNX INT4/UINT4 tensors (what DequantizeLinear-21 reads, in any runtime): the
  tensor flattened row-major, two elements per byte, first in the low nibble.
  Blocked scales sit beside it in the tensor's own shape ([K, N] weight,
  [ceil(K/block), N] scales).
* onnxruntime's com.microsoft MatMulNBits: the weight transposed to [N, K] and cut
  into blocks along K, each block a contiguous blob of bytes ([N, n_blocks,
  block_size * bits / 8]) so the kernel streams one block per scale. Codes are
  unsigned; the kernel computes (q - zero_point) * scale and, when no zero points
  are given, uses 2^(bits-1): signed symmetric weights are stored shifted by that
  much and need no zero-point input.
"""

from __future__ import annotations

import numpy as np


def pack_int4(values: np.ndarray) -> np.ndarray:
    """ONNX INT4/UINT4 raw layout: flattened, two per byte, first element in the
    low nibble, an odd count padded with 0."""
    v = np.asarray(values).astype(np.int64).ravel()
    if v.size and (v.min() < -8 or v.max() > 15):
        raise ValueError(f"4-bit values must lie in [-8, 15], got [{v.min()}, {v.max()}]")
    v = v & 0xF
    if v.size % 2:
        v = np.append(v, 0)
    return (v[0::2] | (v[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int, *, signed: bool) -> np.ndarray:
    """Inverse of `pack_int4`: the first `count` nibbles, as int8 (sign-extended)
    or uint8."""
    p = np.asarray(packed, dtype=np.uint8).ravel()
    if count > 2 * p.size:
        raise ValueError(f"{p.size} bytes hold at most {2 * p.size} nibbles, asked for {count}")
    v = np.stack([p & 0xF, p >> 4], axis=-1).ravel()[:count]
    if signed:
        return ((v.astype(np.int8) ^ 8) - 8).astype(np.int8)
    return v.astype(np.uint8)


def _check_nbits(bits: int, block_size: int) -> None:
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits packing supports bits 4 and 8, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"MatMulNBits block_size must be a power of two >= 16, got {block_size}")


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis: 4-bit two per byte (even index low)."""
    codes = codes.astype(np.uint8)
    if bits == 8:
        return codes
    if codes.shape[-1] % 2:
        raise ValueError("4-bit rows must hold an even number of codes")
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def matmulnbits_pack(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, *, bits: int,
                     block_size: int, signed: bool) -> dict:
    """A MatMul weight quantized in the ONNX blocked layout (q [K, N], scale and
    zero_point [ceil(K/block_size), N], blocks along K) in MatMulNBits' layout.

    Signed codes are shifted by 2^(bits-1) into the kernel's unsigned range; with
    a zero zero point that shift is exactly the kernel's default and zero_points
    is None. Otherwise zero points are packed like B (4-bit: per row n, two per
    byte, low nibble first, an odd block count padded with the default 8 as
    onnxruntime's own packer does). A last partial block is padded with its zero
    point, so padding dequantizes to 0.
    """
    _check_nbits(bits, block_size)
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"MatMulNBits weights are 2-D [K, N], got shape {list(q.shape)}")
    k, n = q.shape
    n_blocks = -(-k // block_size)
    scale = np.asarray(scale, dtype=np.float32)
    if scale.shape != (n_blocks, n):
        raise ValueError(f"scale of shape {list(scale.shape)} does not fit a [{k}, {n}] weight with "
                         f"block_size {block_size}: expected [{n_blocks}, {n}]")
    offset = 1 << (bits - 1) if signed else 0
    zp = np.zeros((n_blocks, n), np.int64) if zero_point is None else np.asarray(zero_point).astype(np.int64)
    if zp.shape != (n_blocks, n):
        raise ValueError(f"zero_point of shape {list(zp.shape)} does not match scale [{n_blocks}, {n}]")
    codes = q.astype(np.int64) + offset
    zp = zp + offset
    top = (1 << bits) - 1
    for what, arr in (("q", codes), ("zero_point", zp)):
        if arr.size and (arr.min() < 0 or arr.max() > top):
            kind = "signed" if signed else "unsigned"
            raise ValueError(f"{what} out of the {kind} {bits}-bit range")
    omit_zp = signed and not np.any(zp != offset)

    padded = np.repeat(zp, block_size, axis=0)  # the zero point of every row's block
    padded[:k] = codes
    b = _pack_rows(padded.T.reshape(n, n_blocks, block_size), bits)

    zero_points = None
    if not omit_zp:
        zpt = zp.T  # [N, n_blocks]
        if bits == 4 and n_blocks % 2:
            zpt = np.concatenate([zpt, np.full((n, 1), 8, np.int64)], axis=1)
        zero_points = _pack_rows(zpt, bits).ravel()
    return {"B": np.ascontiguousarray(b), "scales": np.ascontiguousarray(scale.T).ravel(),
            "zero_points": zero_points, "K": k, "N": n, "bits": bits, "block_size": block_size}


def matmulnbits_unpack(packed: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q_unsigned [K, N], scale [n_blocks, N], zero_point [n_blocks, N]) from
    `matmulnbits_pack`'s dict, the default zero point filled in when absent."""
    k, n, bits, block_size = packed["K"], packed["N"], packed["bits"], packed["block_size"]
    _check_nbits(bits, block_size)
    n_blocks = -(-k // block_size)
    b = np.asarray(packed["B"], dtype=np.uint8).reshape(n, n_blocks, -1)
    if bits == 4:
        b = np.stack([b & 0xF, b >> 4], axis=-1).reshape(n, n_blocks, block_size)
    q = b.reshape(n, n_blocks * block_size)[:, :k].T
    scale = np.asarray(packed["scales"], dtype=np.float32).reshape(n, n_blocks).T
    zps = packed.get("zero_points")
    if zps is None:
        zp = np.full((n_blocks, n), 1 << (bits - 1), np.uint8)
    elif bits == 4:
        z = np.asarray(zps, dtype=np.uint8).reshape(n, -1)
        zp = np.stack([z & 0xF, z >> 4], axis=-1).reshape(n, -1)[:, :n_blocks].T
    else:
        zp = np.asarray(zps, dtype=np.uint8).reshape(n, n_blocks).T
    return np.ascontiguousarray(q, dtype=np.uint8), np.ascontiguousarray(scale), np.ascontiguousarray(zp)
