"""One decomposition per matrix per logging step, shared by every monitor on the same Trainer.

Each monitor declares at setup what it will ask of the cache (:class:`CacheRequest`: which
product of which matrices, at which steps) with :func:`declare`; the cache uses the declarations
of all monitors to pick the cheapest way to serve each request (sigma_1 is read off a spectrum
that another monitor asked for at this step, else power iteration), so no monitor needs to know
another. The monitors ask :func:`step_cache` for the trainer's cache at a logging step; it is
emptied when the global step changes (and dropped after the optimizer step). Same-shape matrices
are decomposed together in one batched call.

Matrices are stored per *view*: a parameter is seen as the matrices Muon orthogonalises (its
:class:`~lightning_muon.routing.MatrixView`: one matrix, a conv kernel's ``(out, rest)``, each
expert of a stack, each q/k/v block or head of a fused projection), each under its own key
(:func:`view_keys`): the parameter name for a single matrix, ``<name>/<label>`` for the matrices
of a stack (``experts.w1/3``) or a split (``c_attn.weight/q``, ``c_attn.weight/q.h2``).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..diagnostics.spectral import singular_values, top_frames, top_singular_value
from ..parallel.dtensor import full
from ..routing.matrix_view import MatrixView, matrix_view

_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_REQUESTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # trainer -> {id(owner): requests}

#: what a monitor can ask of the cache per matrix: the whole spectrum, sigma_1 alone, top-k frames
PRODUCTS = ("spectrum", "sigma_max", "frames")
_QKV = ("q", "k", "v")


def view_labels(view: MatrixView, shape: tuple[int, ...]) -> list[str]:
    """The label of each matrix of a tensor of ``shape`` seen as ``view``, in
    :meth:`~lightning_muon.routing.MatrixView.to_matrices` order; ``[""]`` for a single matrix.

    A stack is labelled by its index over the leading dims (``"3"``, or ``"1.3"`` for two leading
    dims); a split by its part (``"q"``, ``"k"``, ``"v"`` for 3 parts, else ``"0"``, ``"1"``, ...),
    per head with ``".h<head>"`` (``"q.h2"``). Only ``_``, ``/``, ``.``, letters and digits: every
    logger keeps the tag as it is (MLflow drops other characters).

    Example:
        >>> view_labels(MatrixView.parse("split=3,heads=2,per_head"), (12, 4))
        ['q.h0', 'q.h1', 'k.h0', 'k.h1', 'v.h0', 'v.h1']
        >>> view_labels(MatrixView.parse("stack"), (2, 3, 4, 4)), view_labels(MatrixView.parse("conv"), (8, 3, 3, 3))
        (['0.0', '0.1', '0.2', '1.0', '1.1', '1.2'], [''])
    """
    shape = tuple(shape)
    count, _, _ = view.matrices(shape)
    if count == 1:
        return [""]
    if view.rule == "stack":
        lead = shape[:-2]
        labels = []
        for i in range(count):
            index, rest = [], i
            for size in reversed(lead):
                index.append(rest % size)
                rest //= size
            labels.append(".".join(str(j) for j in reversed(index)))
        return labels
    parts = [_QKV[p] if view.parts == 3 else str(p) for p in range(view.parts)]
    if not view.per_head:
        return parts
    heads = view.heads
    if view.order == "heads":  # to_matrices order (head, part)
        return [f"{parts[p]}.h{h}" for h in range(heads) for p in range(view.parts)]
    return [f"{parts[p]}.h{h}" for p in range(view.parts) for h in range(heads)]


def view_keys(name: str, view: MatrixView, shape: tuple[int, ...]) -> list[str]:
    """The cache keys (and tag suffixes) of the matrices of parameter ``name``: ``name`` for a
    single matrix, ``name/<label>`` each for a stack or a split (:func:`view_labels`).

    Example:
        >>> view_keys("h.0.attn.c_attn.weight", MatrixView.parse("split=3"), (48, 16))
        ['h.0.attn.c_attn.weight/q', 'h.0.attn.c_attn.weight/k', 'h.0.attn.c_attn.weight/v']
    """
    return [f"{name}/{label}" if label else name for label in view_labels(view, shape)]


@dataclass(frozen=True)
class CacheRequest:
    """What one monitor asks of the shared cache: the ``product`` of the ``kind`` matrices of
    ``names`` (``kind``: ``"weight"``, ``"grad"``, ``"update"``, ...), at every step that is a
    multiple of ``every_n_steps``. Monitors build it with ``MonitorCallback.request``.

    Raises:
        ValueError: ``product`` not one of ``PRODUCTS``, or ``every_n_steps < 1``.

    Example:
        >>> CacheRequest("weight", "spectrum", ("net.0.weight",), every_n_steps=100).product
        'spectrum'
    """

    kind: str
    product: str
    names: tuple[str, ...]
    every_n_steps: int

    def __post_init__(self) -> None:
        if self.product not in PRODUCTS:
            raise ValueError(f"CacheRequest: product must be one of {PRODUCTS}, got {self.product!r}")
        if isinstance(self.every_n_steps, bool) or not isinstance(self.every_n_steps, int) or self.every_n_steps < 1:
            raise ValueError(f"CacheRequest: every_n_steps must be an integer >= 1, got {self.every_n_steps!r}")


def declare(trainer: object, owner: object, requests: Iterable[CacheRequest]) -> None:
    """Record (replacing earlier ones) what ``owner`` will ask of ``trainer``'s cache."""
    _REQUESTS.setdefault(trainer, {})[id(owner)] = tuple(requests)


def withdraw(trainer: object, owner: object) -> None:
    """Forget what ``owner`` declared (at teardown)."""
    _REQUESTS.get(trainer, {}).pop(id(owner), None)


def _planned(trainer: object, step: int, product: str) -> frozenset[tuple[str, str]]:
    """``(kind, name)`` of the matrices whose ``product`` some monitor declared for ``step``."""
    return frozenset(
        (r.kind, n)
        for requests in _REQUESTS.get(trainer, {}).values()
        for r in requests
        if r.product == product and step % r.every_n_steps == 0
        for n in r.names
    )


class SpectralCache:
    """Matrices (gathered, flattened, fp32) and their spectra, frames and sigma_1 for one step.

    ``kind`` names what the matrix is (``"weight"``, ``"grad"``, ``"update"``); the key a layer
    (:meth:`matrix`: the whole tensor as ``(shape[0], rest)``) or one matrix of its view (:meth:`matrices`).
    """

    def __init__(self, step: int, planned_spectra: Iterable[tuple[str, str]] = ()) -> None:
        self.step = step
        self.planned_spectra = frozenset(planned_spectra)  # (kind, name): a monitor asks for the spectrum this step
        self._matrices: dict[tuple[str, str], Tensor] = {}
        self._owners: dict[str, str] = {}  # view key -> parameter name (what monitors declare requests for)
        self._spectra: dict[tuple[str, str], Tensor] = {}
        self._frames: dict[tuple[str, str, int], tuple[Tensor, Tensor]] = {}

    def matrix(self, kind: str, name: str, tensor: Tensor | None = None) -> Tensor:
        """The fp32 ``(out, rest)`` matrix of ``tensor``, stored under ``(kind, name)`` on first use."""
        key = (kind, name)
        if key not in self._matrices:
            if tensor is None:
                raise KeyError(f"no {kind} matrix stored for {name!r}")
            self._matrices[key] = matrix_view(full(tensor.detach())).float()
        return self._matrices[key]

    def matrices(self, kind: str, name: str, tensor: Tensor, view: MatrixView) -> dict[str, Tensor]:
        """The fp32 matrices of ``tensor`` as ``view`` sees them, by key (:func:`view_keys`), each
        stored under ``(kind, key)`` on first use (a sharded tensor is gathered: every rank)."""
        keys = view_keys(name, view, tuple(tensor.shape))
        if any((kind, key) not in self._matrices for key in keys):
            stacked = view.to_matrices(full(tensor.detach())[None]).float()
            for key, M in zip(keys, stacked):
                self._matrices.setdefault((kind, key), M)
                self._owners[key] = name
        return {key: self._matrices[(kind, key)] for key in keys}

    def _planned_key(self, kind: str, key: str) -> bool:
        """Whether a monitor declared the spectrum of ``key``'s parameter (or of ``key``) for this step."""
        return (kind, key) in self.planned_spectra or (kind, self._owners.get(key, key)) in self.planned_spectra

    def _missing_by_shape(self, kind: str, names: Iterable[str], done: Callable[[str], bool]) -> dict[tuple, list[str]]:
        """Names whose result is not cached yet (``done(name)`` is False), grouped by matrix shape."""
        buckets: dict[tuple, list[str]] = defaultdict(list)
        for name in names:
            if not done(name):
                buckets[tuple(self._matrices[(kind, name)].shape)].append(name)
        return buckets

    def spectra(self, kind: str, names: Iterable[str]) -> dict[str, Tensor]:
        """Singular values (descending) of each stored matrix, batched by shape."""
        names = list(names)
        for bucket in self._missing_by_shape(kind, names, lambda n: (kind, n) in self._spectra).values():
            s = singular_values(torch.stack([self._matrices[(kind, n)] for n in bucket]))
            for n, row in zip(bucket, s):
                self._spectra[(kind, n)] = row
        return {n: self._spectra[(kind, n)] for n in names}

    def sigma_max(
        self, kind: str, names: Iterable[str], vectors: dict[str, Tensor], num_iters: int
    ) -> dict[str, Tensor]:
        """sigma_1 per matrix: from the spectrum when one is cached or declared for this step
        (computed now, batched, and kept for the monitor that declared it), else warm-started
        power iteration (``vectors`` holds and receives the start vectors)."""
        names = list(names)
        self.spectra(kind, [n for n in names if self._planned_key(kind, n)])
        out = {n: self._spectra[(kind, n)][0] for n in names if (kind, n) in self._spectra}
        for bucket in self._missing_by_shape(kind, names, out.__contains__).values():
            X = torch.stack([self._matrices[(kind, n)] for n in bucket])
            v0 = None
            if all(n in vectors and vectors[n].shape[-1] == X.shape[-1] for n in bucket):
                v0 = torch.stack([vectors[n] for n in bucket]).to(X.device)
            sigma, v = top_singular_value(X, num_iters if v0 is not None else 4 * num_iters, v0)
            for n, s_n, v_n in zip(bucket, sigma, v):
                out[n] = s_n
                vectors[n] = v_n.detach().cpu()
        return out

    def frames(self, kind: str, names: Iterable[str], k: int) -> dict[str, tuple[Tensor, Tensor]]:
        """Top-``k`` left/right singular frames per matrix (``k`` clipped to ``min(m, n)``)."""
        names = list(names)
        missing = self._missing_by_shape(kind, names, lambda n: (kind, n, k) in self._frames)
        for shape, bucket in missing.items():
            U, V = top_frames(torch.stack([self._matrices[(kind, n)] for n in bucket]), min(k, *shape))
            for n, u, v in zip(bucket, U, V):
                self._frames[(kind, n, k)] = (u, v)
        return {n: self._frames[(kind, n, k)] for n in names}


def drop_cache(trainer: object) -> None:
    """Free the stored matrices (after the optimizer step: they may be views of live tensors)."""
    _CACHES.pop(trainer, None)


def step_cache(trainer: object, step: int) -> SpectralCache:
    """The cache of ``trainer`` for ``step`` (a fresh one when the step has moved on)."""
    cache = _CACHES.get(trainer)
    if cache is None or cache.step != step:
        cache = SpectralCache(step, _planned(trainer, step, "spectrum"))
        _CACHES[trainer] = cache
    return cache
