"""How Muon sees a parameter as matrices: one matrix, a flattened conv kernel, a stack, or split blocks.

Plain torch (no Lightning). A *matrix view* is a short string stored per parameter in a Muon
param group (``group["matrix_views"]``), so the optimizer, its state dict and checkpoints carry it:

==========================================  ==========================================================
view                                        the matrices Muon orthogonalises (each scaled on its own)
==========================================  ==========================================================
``"matrix"``                                a 2-D weight as it is
``"flatten"``                               ``(shape[0], rest)``: the default for tensors without module
                                            information (plain tensors or ``(name, tensor)`` pairs)
``"conv"``                                  a conv kernel ``(out, in/groups, *k)`` as ``(out, rest)``
``"conv_transpose"``                        a transposed-conv kernel ``(in, out/groups, *k)`` as
                                            ``(in, rest)``; scaled as the ``(rest, in)`` map it applies
``"conv,groups=G"``                         a grouped conv: ``G`` matrices ``(out/G, rest)``, one per
                                            group (the conv is block-diagonal: each group its own map)
``"stack"``                                 every trailing 2-D slice: ``(E, a, b)`` is ``E`` matrices
                                            ``(a, b)`` (a mixture-of-experts bank, a ``(4, d, d)`` QKVO)
``"stack,split=2"``                         each slice's rows cut in 2: ``(E, 2I, H)`` is ``2 E``
                                            matrices ``(I, H)`` (fused gate/up expert weights)
``"split=3"``                               the rows cut in 3 equal blocks ``[q; k; v]``
``"split=3,heads=H"``                       the same rows, ``(3, H, head_dim)``, stated with ``H`` heads
``"split=3,heads=H,order=heads"``           rows ordered ``(H, 3, head_dim)`` (Megatron, the example
                                            GPT): the 3 blocks gather each head's q, k or v rows
``...,per_head``                            one block per head and part: ``3 H`` blocks ``(head_dim, n)``
``"matrix,transposed"``, ``"split=...,transposed"``
                                            a 2-D weight stored ``(in, out)`` (Hugging Face's
                                            ``Conv1D``: GPT-2): Muon sees its transpose ``(out, in)``,
                                            so scaling, NorMuon's rows and splits read the real map
==========================================  ==========================================================

Newton–Schulz is batched over leading dims, so every view is one ``(count, m, n)`` batch. Row
blocks (``split=P``, ``groups=G``) are always consecutive runs of the rows Muon sees.

Example:
    >>> import torch
    >>> view = MatrixView.parse("split=3,heads=2,order=heads")
    >>> W = torch.arange(12.0).reshape(12, 1).expand(12, 2)  # rows (head, q/k/v, head_dim=2)
    >>> blocks = view.to_matrices(W[None])
    >>> blocks.shape, blocks[0, :, 0].tolist()  # q: rows 0, 1 (head 0) and 6, 7 (head 1)
    (torch.Size([3, 4, 2]), [0.0, 1.0, 6.0, 7.0])
    >>> torch.equal(view.from_matrices(blocks, W.shape)[0], W)
    True
    >>> view.describe(W.shape)
    'split qkv 3 x (4 x 2), rows (head, part, head_dim)'
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MATRIX_RULES", "MatrixView", "matrix_shape", "matrix_view", "matrix_view_for"]

#: Rule names a user can give in ``matrix_rules`` besides ``split=...`` specs.
MATRIX_RULES = ("matrix", "flatten", "conv", "conv_transpose", "stack")
_ORDERS = ("parts", "heads")


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The ``(rows, columns)`` of the matrix Muon sees in a tensor of ``shape``: ``(shape[0], rest)``.

    A conv kernel ``(out, in, kh, kw)`` is the ``(out, in * kh * kw)`` matrix; a 2-D shape is itself.

    Example:
        >>> matrix_shape((64, 3, 7, 7))
        (64, 147)
    """
    if len(shape) < 2:
        raise ValueError(f"matrix_shape: expected a shape with >= 2 dims, got {tuple(shape)}")
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def matrix_view(t: Tensor) -> Tensor:
    """``t`` flattened to :func:`matrix_shape` (a view when the layout allows, else a copy).

    Example:
        >>> import torch
        >>> matrix_view(torch.zeros(16, 8, 3, 3)).shape
        torch.Size([16, 72])
    """
    if t.ndim < 2:
        raise ValueError(f"matrix_view: expected a tensor with >= 2 dims, got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


@dataclass(frozen=True)
class MatrixView:
    """A parameter's matrix view (see the module docstring); build with :meth:`parse`.

    ``parts`` cuts the rows of each matrix into that many consecutive blocks (``split=P``, a grouped
    conv's ``groups=G``, a stack's ``split=P``); ``transposed`` says a 2-D weight is stored
    ``(in, out)``: every other field then reads the ``(out, in)`` matrix Muon sees.
    """

    rule: str  # one of MATRIX_RULES or "split"
    parts: int = 1
    heads: int = 0  # 0: not stated
    order: str = "parts"
    per_head: bool = False
    transposed: bool = False

    @classmethod
    def parse(cls, spec: str | MatrixView) -> MatrixView:
        """A view from its string form; ValueError naming the problem for a malformed one."""
        if isinstance(spec, MatrixView):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"matrix view must be a string such as 'stack' or 'split=3', got {type(spec).__name__}")
        text = spec.replace(" ", "")
        if text in MATRIX_RULES:
            return cls(text)
        head, *options = text.split(",")
        usage = (
            f"expected one of {MATRIX_RULES} or 'split=P[,heads=H][,order=parts|heads][,per_head]', optionally "
            "followed by ',transposed' ('matrix' or 'split'), ',groups=G' ('conv', 'conv_transpose') or ',split=P' "
            "('stack')"
        )
        if head.startswith("split="):
            fields: dict = {"rule": "split", "parts": _positive(head[6:], spec, "split")}
        elif head in MATRIX_RULES:
            fields = {"rule": head}
        else:
            raise ValueError(f"matrix view {spec!r}: {usage}")
        rule = fields["rule"]
        for option in options:
            key, _, value = option.partition("=")
            if rule == "split" and key == "heads" and value:
                fields["heads"] = _positive(value, spec, "heads")
            elif rule == "split" and key == "order" and value in _ORDERS:
                fields["order"] = value
            elif rule == "split" and key == "per_head" and not value:
                fields["per_head"] = True
            elif rule in ("matrix", "split") and key == "transposed" and not value:
                fields["transposed"] = True
            elif (rule in ("conv", "conv_transpose") and key == "groups") or (rule == "stack" and key == "split"):
                fields["parts"] = _positive(value, spec, key)
            else:
                raise ValueError(f"matrix view {spec!r}: unknown option {option!r} for {rule!r}; {usage}")
        if (fields.get("per_head") or fields.get("order") == "heads") and not fields.get("heads"):
            raise ValueError(f"matrix view {spec!r}: per_head and order=heads need heads=H (the number of heads)")
        return cls(**fields)

    def __str__(self) -> str:
        if self.rule != "split":
            out = self.rule
            if self.parts > 1:
                out += f",split={self.parts}" if self.rule == "stack" else f",groups={self.parts}"
        else:
            out = f"split={self.parts}"
            if self.heads:
                out += f",heads={self.heads}"
            if self.order != "parts":
                out += f",order={self.order}"
            if self.per_head:
                out += ",per_head"
        return out + (",transposed" if self.transposed else "")

    # ------------------------------------------------------------------ shapes
    def _seen(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape as Muon sees it: a transposed 2-D weight ``(in, out)`` read as ``(out, in)``."""
        return (shape[1], shape[0]) if self.transposed and len(shape) == 2 else tuple(shape)

    def why_not(self, shape: tuple[int, ...]) -> str | None:
        """Why a tensor of ``shape`` cannot be seen this way, or None."""
        shape = tuple(shape)
        if len(shape) < 2:
            return f"a {len(shape)}-D tensor is not a matrix"
        if self.rule == "matrix" and len(shape) != 2:
            return f"'matrix' is for 2-D weights, this one has shape {shape}"
        if self.transposed and len(shape) != 2:
            return f"'transposed' is for 2-D weights stored (in, out), this one has shape {shape}"
        if self.rule == "split" and len(shape) != 2:
            return f"'split' is for a 2-D fused projection, this one has shape {shape}"
        seen = self._seen(shape)
        rows = seen[-2] if self.rule == "stack" and len(seen) > 2 else seen[0]
        cut = self.parts * (max(self.heads, 1) if self.rule == "split" else 1)
        if rows % cut:
            what = f"{self.parts} parts x {self.heads} heads" if self.heads else f"{self.parts} parts"
            return f"{rows} rows cannot be cut in {what}"
        count, m, n = self.matrices(shape)
        if m < 2 or n < 2:
            return f"its {count} matrices are {m} x {n} (vector-like)"
        return None

    def check(self, shape: tuple[int, ...], where: str) -> None:
        """Raise ValueError if a tensor of ``shape`` cannot be seen this way."""
        if reason := self.why_not(shape):
            raise ValueError(f"Muon: {where} has matrix view {str(self)!r} but {reason}")

    def matrices(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """``(count, m, n)``: how many matrices a tensor of ``shape`` gives, and their shape."""
        shape = self._seen(tuple(shape))
        if self.rule == "stack" and len(shape) > 2:
            lead, rows, cols = math.prod(shape[:-2]), shape[-2], shape[-1]
        else:
            lead, (rows, cols) = 1, matrix_shape(shape)  # the (shape[0], rest) rule
        blocks = self.parts * (self.heads if self.per_head else 1)
        return lead * blocks, rows // blocks, cols

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """``(fan_out, fan_in)`` of each matrix, for ``adjust_lr`` (a transposed conv applies ``(rest, in)``)."""
        _, m, n = self.matrices(tuple(shape))
        return (n, m) if self.rule == "conv_transpose" else (m, n)

    def row_of(self, shape: tuple[int, ...], index: Tensor) -> Tensor:
        """The row of the view (numbered ``0 .. count * m - 1`` in the order :meth:`matrices` lists
        them, storage order before any ``order=heads`` regrouping) that holds each element, given
        the elements' row-major ``index`` in a tensor of ``shape`` (NorMuon's per-row state).

        Example:
            >>> MatrixView.parse("matrix,transposed").row_of((3, 2), torch.arange(6)).tolist()  # (in=3, out=2)
            [0, 1, 0, 1, 0, 1]
        """
        _, _, cols = self.matrices(tuple(shape))
        return index % shape[1] if self.transposed else index // cols

    # ------------------------------------------------------------------ tensors
    def to_matrices(self, X: Tensor) -> Tensor:
        """A batch ``(B, *shape)`` of tensors as one ``(B * count, m, n)`` batch of matrices."""
        if self.transposed:
            X = X.mT
        B, shape = X.shape[0], tuple(X.shape[1:])
        count, m, n = dataclasses.replace(self, transposed=False).matrices(shape)
        if self.rule == "split" and self.order == "heads":
            H, P = self.heads, self.parts
            X = X.reshape(B, H, P, m // (1 if self.per_head else H), n)
            if not self.per_head:  # (B, H, P, hd, n) -> (B, P, H, hd, n): each part gathers its heads
                X = X.transpose(1, 2)
        return X.reshape(B * count, m, n)

    def from_matrices(self, Y: Tensor, shape: tuple[int, ...]) -> Tensor:
        """The inverse of :meth:`to_matrices`: ``(B * count, m, n)`` back to ``(B, *shape)``."""
        shape = tuple(shape)
        seen = self._seen(shape)
        count, m, n = self.matrices(shape)
        B = Y.shape[0] // count
        if self.rule == "split" and self.order == "heads" and not self.per_head:
            H, P = self.heads, self.parts
            Y = Y.reshape(B, P, H, m // H, n).transpose(1, 2)
        out = Y.reshape(B, *seen)
        return out.mT.contiguous() if self.transposed else out

    def part_rows(self, rows: int, part: int) -> Tensor:
        """Global row indices of block ``part`` of a ``split`` view of a weight with ``rows`` rows
        (for q/k/v: 0 the queries, 1 the keys, 2 the values), ordered ``(head, head_dim)``. Rows
        of the matrix Muon sees: the columns of the stored tensor when ``transposed``.

        This is where the row order of a fused projection is defined once: the optimizer's blocks
        (:meth:`to_matrices`) and QK-clip's rows (:func:`lightning_muon.fused_qkv_rows`) both follow it.

        Example:
            >>> MatrixView.parse("split=3,heads=2,order=heads").part_rows(12, 1).tolist()  # keys
            [2, 3, 8, 9]
            >>> MatrixView.parse("split=3,heads=2").part_rows(12, 1).tolist()
            [4, 5, 6, 7]
        """
        if self.rule != "split" or not 0 <= part < self.parts:
            raise ValueError(f"matrix view {str(self)!r} has no block {part} (a 'split=P' view has blocks 0..P-1)")
        heads, parts = max(self.heads, 1), self.parts
        if rows % (parts * heads):
            raise ValueError(f"matrix view {str(self)!r}: {rows} rows cannot be cut in {parts} parts x {heads} heads")
        head_dim = rows // (parts * heads)
        h = torch.arange(heads)[:, None]
        first = (part * heads + h) * head_dim if self.order == "parts" else (parts * h + part) * head_dim
        return (first + torch.arange(head_dim)[None, :]).reshape(-1)

    def describe(self, shape: tuple[int, ...]) -> str:
        """How the routing table says it, e.g. ``"stack of 4 (16 x 16)"``."""
        count, m, n = self.matrices(tuple(shape))
        stored = ", stored (in, out)" if self.transposed else ""
        if self.rule in ("conv", "conv_transpose"):
            rows = "out" if self.rule == "conv" else "in"
            if self.parts > 1:
                return f"{self.rule} per group {count} x ({rows}/groups, rest) {m} x {n}"
            return f"{self.rule} ({rows}, rest) {m} x {n}"
        if self.rule == "flatten":
            return f"flatten (shape[0], rest) {m} x {n}"
        if self.rule == "stack":
            if self.parts > 1:
                return f"stack of {count // self.parts} x {self.parts} row blocks ({m} x {n})"
            return f"stack of {count} ({m} x {n})"
        if self.rule == "matrix":
            return f"matrix {m} x {n}{stored}"
        what = "qkv" if self.parts == 3 else f"in {self.parts}"
        per = " per head" if self.per_head else ""
        rows = ", rows (head, part, head_dim)" if self.order == "heads" else ""
        return f"split {what}{per} {count} x ({m} x {n}){rows}{stored}"


def matrix_view_for(shape: tuple[int, ...], spec: str | MatrixView | None) -> MatrixView:
    """The view of a tensor of ``shape``: ``spec`` parsed, or the default when None (``"matrix"`` for
    2-D, ``"flatten"`` above: what Muon did before views existed, kept for tensors without module
    information).

    Example:
        >>> str(matrix_view_for((6, 2, 3, 3), None)), str(matrix_view_for((8, 8), None))
        ('flatten', 'matrix')
    """
    if spec is None:
        return MatrixView("matrix" if len(shape) == 2 else "flatten")
    return MatrixView.parse(spec)


def _positive(text: str, spec: str, what: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"matrix view {spec!r}: {what} must be a positive integer, got {text!r}")
    return int(text)
