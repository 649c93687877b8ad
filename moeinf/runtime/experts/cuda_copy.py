"""Host-to-device copies of expert records on CuPy streams, with one CuPy event per slot.

Two hazards are ordered with events, never with device-wide synchronisation:
- a kernel must not read a slot before its copy lands: the torch compute stream waits on the
  slot's `ready` event before the layer that reads it;
- a copy must not overwrite a slot that an enqueued kernel still reads: when a layer releases its
  slots, an event is recorded on the compute stream, and the next copy into any of those slots
  waits on it on the copy stream.
Each worker thread owns a CuPy stream and a pinned staging buffer.
"""

from __future__ import annotations

import threading

import numpy as np
import torch


def cuda_copies_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import cupy
    except ImportError:
        return False
    return bool(cupy.is_available())


class CudaSlotCopier:
    def __init__(self, records: torch.Tensor, payload_nbytes: int):
        import cupy

        self._cupy = cupy
        # records: [S, record_nbytes] uint8 on the CUDA device
        self._device = cupy.cuda.Device(records.device.index or 0)
        self._base = records.data_ptr()
        self._record_nbytes = records.shape[1]
        self._payload_nbytes = payload_nbytes
        with self._device:
            self._ready = [cupy.cuda.Event(disable_timing=True) for _ in range(records.shape[0])]
        self._released: list[object | None] = [None] * records.shape[0]
        self._local = threading.local()

    def staging(self) -> np.ndarray:
        """This worker thread's pinned staging buffer ([record_nbytes] uint8, page-aligned)."""
        if not hasattr(self._local, "staging"):
            self._local.staging = torch.empty(self._record_nbytes, dtype=torch.uint8, pin_memory=True).numpy()
            with self._device:
                self._local.stream = self._cupy.cuda.Stream(non_blocking=True)
        return self._local.staging

    def copy_to_slot(self, slot: int) -> None:
        """Copies this thread's staging buffer into `slot`; returns once the copy has landed, so
        the staging buffer can take the next record."""
        staging, stream = self.staging(), self._local.stream
        with self._device:
            released = self._released[slot]
            if released is not None:
                stream.wait_event(released)
            self._cupy.cuda.runtime.memcpyAsync(
                self._base + slot * self._record_nbytes,
                staging.ctypes.data,
                self._payload_nbytes,
                self._cupy.cuda.runtime.memcpyHostToDevice,
                stream.ptr,
            )
            self._ready[slot].record(stream)
            self._ready[slot].synchronize()

    def _compute_stream(self):
        return self._cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)

    def compute_waits_for(self, slots: list[int]) -> None:
        with self._device:
            stream = self._compute_stream()
            for slot in slots:
                stream.wait_event(self._ready[slot])

    def compute_released(self, slots: list[int]) -> None:
        with self._device:
            event = self._cupy.cuda.Event(disable_timing=True)
            event.record(self._compute_stream())
            for slot in slots:
                self._released[slot] = event
