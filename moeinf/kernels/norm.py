"""RMSNorm, optionally fused with the residual add before it (Liger-Kernel style).

    h = x + residual                    rounded to x's dtype, as the unfused add would be
    normed = weight * (h * rsqrt(mean(h^2) + eps)).to(x.dtype)

Statistics are float32 whatever the input dtype; a program normalises a block of rows held whole in
registers (D up to 65536 elements).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_BLOCK_D = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # x: [T, D]
    residual_ptr,  # residual: [T, D], read only when HAS_RESIDUAL
    weight_ptr,  # weight: [D]
    out_ptr,  # out: [T, D]
    h_ptr,  # h: [T, D] the new residual, written only when HAS_RESIDUAL
    num_rows,
    hidden,
    eps,
    stride_xt,
    stride_xd,
    stride_rt,
    stride_rd,
    stride_ot,
    stride_od,
    stride_ht,
    stride_hd,
    HAS_RESIDUAL: tl.constexpr,
    SCALE_IN_FP32: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < num_rows)[:, None] & (cols < hidden)[None, :]
    h = tl.load(x_ptr + rows[:, None] * stride_xt + cols[None, :] * stride_xd, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows[:, None] * stride_rt + cols[None, :] * stride_rd, mask=mask, other=0.0)
        # the sum is rounded to the activation dtype first, so the statistics are those of the
        # residual stream the next layer will read
        h = (h.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + rows[:, None] * stride_ht + cols[None, :] * stride_hd, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(hf * hf, axis=1) / hidden + eps)
    normed = hf * rstd[:, None]
    if not SCALE_IN_FP32:
        # rounded to x's dtype before the weight, as the reference (and transformers) do
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + rows[:, None] * stride_ot + cols[None, :] * stride_od,
        (normed * w[None, :]).to(out_ptr.dtype.element_ty),
        mask=mask,
    )


# ---------------------------------------------------------------------------------------- launcher


def _out_dtype(x: torch.Tensor, weight: torch.Tensor, scale_in_fp32: bool) -> torch.dtype:
    return x.dtype if scale_in_fp32 else torch.promote_types(x.dtype, weight.dtype)


def _expect_like(t: torch.Tensor, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(
            f"{name}: expected {list(shape)} {dtype} on {device}, found {list(t.shape)} {t.dtype} on {t.device}"
        )


def rms_norm_into(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    residual: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
    scale_in_fp32: bool = False,
) -> None:
    """rms_norm on x [T, D] writing into out [T, D] (dtype of weight * x; x's with scale_in_fp32)
    and, with residual [T, D], the new residual x + residual into residual_out [T, D] (x's dtype)."""
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"x: expected a [T, D] tensor with D > 0, found shape {list(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype: expected float16, bfloat16 or float32, found {x.dtype}")
    T, D = x.shape
    if D > _MAX_BLOCK_D:
        raise ValueError(f"x: expected D <= {_MAX_BLOCK_D} (a row is normalised in registers), found {D}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"weight dtype: expected float16, bfloat16 or float32, found {weight.dtype}")
    _expect_like(weight, "weight", (D,), weight.dtype, x.device)
    _expect_like(out, "out", (T, D), _out_dtype(x, weight, scale_in_fp32), x.device)
    if (residual is None) != (residual_out is None):
        raise ValueError("residual and residual_out: expected both or neither, found one")
    if residual is not None:
        _expect_like(residual, "residual", (T, D), x.dtype, x.device)
        _expect_like(residual_out, "residual_out", (T, D), x.dtype, x.device)
    if T == 0:
        return
    block_d = triton.next_power_of_2(D)
    block_t = max(1, min(triton.next_power_of_2(T), 4096 // block_d))  # about 4096 elements a program
    # without a residual the kernel never touches these two, x and out stand in for them
    r, h = (residual, residual_out) if residual is not None else (x, out)
    _rms_norm_kernel[(triton.cdiv(T, block_t),)](
        x, r, weight, out, h, T, D, float(eps),
        x.stride(0), x.stride(1), r.stride(0), r.stride(1), out.stride(0), out.stride(1), h.stride(0), h.stride(1),
        HAS_RESIDUAL=residual is not None, SCALE_IN_FP32=scale_in_fp32, BLOCK_T=block_t, BLOCK_D=block_d,
        num_warps=4 if block_d <= 2048 else 8,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- public


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    scale_in_fp32: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x: [..., D], weight: [D]. Without residual: rms_norm_reference(x, weight, eps, scale_in_fp32).
    With residual [..., D] (x's shape and dtype): (normed, x + residual), the contract of
    rms_norm_residual_reference. The output dtype is that of weight * x, as in the reference (x's
    with scale_in_fp32: the weight scales the float32 rows before the one rounding)."""
    if x.dim() < 1:
        raise ValueError("x: expected a [..., D] tensor, found a scalar")
    D = x.shape[-1]
    x2 = x.reshape(-1, D)  # [T, D], a view where x's rows are evenly strided
    out = torch.empty(x2.shape, dtype=_out_dtype(x, weight, scale_in_fp32), device=x.device)
    if residual is None:
        rms_norm_into(x2, weight, eps, out, scale_in_fp32=scale_in_fp32)
        return out.view(x.shape)
    if residual.shape != x.shape:
        raise ValueError(f"residual: expected shape {list(x.shape)} (as x), found {list(residual.shape)}")
    h = torch.empty_like(x2)
    rms_norm_into(x2, weight, eps, out, residual.reshape(-1, D), h, scale_in_fp32)
    return out.view(x.shape), h.view(x.shape)
