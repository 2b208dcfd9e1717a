"""What a piece of PyTorch code asks of the device: its operator dispatches, and those that make the host wait for
the device (host synchronisations, which also break a CUDA graph capture).

    with DeviceAudit() as audit:          # count
        step()
    audit.dispatches, audit.syncs         # Counter of operators, Counter of synchronising ones
    audit.views                           # how many dispatches only made a view (no kernel on a GPU)

    with DeviceAudit(strict=True):        # fail at the first synchronisation, naming it
        step()

A TorchDispatchMode sees every ATen operator: reading a value (`.item()`, `bool(t)`, `int(t)`: the operator
`_local_scalar_dense`, or `is_nonzero`), the operators whose output shape depends on the data (`nonzero`, masked
select, boolean indexing, `unique`, ...) and copies to the CPU. `.tolist()`, `.numpy()` and `.cpu()` of a CPU tensor
reach no operator, so they are counted here by wrapping them. This works on a CPU: the same code on CUDA would
synchronise at the same places. Used by server_test.py (the decode step makes none) and bench/bench.py engine.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators that read a value on the host, or whose output shape depends on the values.
SYNCHRONISING = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default, aten.equal.default,
    aten.allclose.default, aten.nonzero.default, aten.nonzero_static.default, aten.masked_select.default,
    aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten.bincount.default,
    aten.repeat_interleave.Tensor, aten.histc.default,
}
# Tensor methods that read values on the host without dispatching an operator (for a CPU tensor).
HOST_READS = ("tolist", "numpy", "cpu")


class HostSync(RuntimeError):
    """Raised by a strict DeviceAudit at the first host synchronisation."""


def _is_bool_index(func: Any, args: tuple) -> bool:
    """t[mask] and t[mask] = v with a boolean mask: a nonzero() inside, so a synchronisation on CUDA."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


def _copies_to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    if func is aten._to_copy.default:
        device = kwargs.get("device")
        return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"
    if func is aten.copy_.default:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class DeviceAudit(TorchDispatchMode):
    """Counts operator dispatches and host synchronisations inside its `with` block; strict: raise HostSync."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict
        self.dispatches: Counter = Counter()
        self.views = 0                     # dispatches that only make a view (no kernel on a GPU)
        self.syncs: Counter = Counter()
        self._saved: dict[str, Any] = {}

    def _sync(self, name: str) -> None:
        self.syncs[name] += 1
        if self.strict:
            raise HostSync(f"host synchronisation: {name}")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        self.dispatches[str(func)] += 1
        self.views += bool(getattr(func, "is_view", False))
        if func in SYNCHRONISING or _is_bool_index(func, args) or _copies_to_host(func, args, kwargs):
            self._sync(str(func))
        return func(*args, **kwargs)

    def __enter__(self) -> DeviceAudit:
        for name in HOST_READS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def read(tensor: torch.Tensor, *args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
                self._sync(f"Tensor.{_name}")
                return _original(tensor, *args, **kw)

            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()

    @property
    def total_dispatches(self) -> int:
        return sum(self.dispatches.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())
