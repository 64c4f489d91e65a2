"""The objects of the segmentation preview: what was computed from which prompts, and the table.

Box mode keeps one :class:`ObjectRecord` per object id: its name and colour (editable in the
table, carried into commits and exports) and the *prompts signature* its preview voxels were
computed from. A run recomputes only objects whose signature changed, so earlier objects stay
in the preview and a cancelled run never wipes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtGui import QColor
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

#: One object's prompts frozen into a comparable value: sorted ``(slice, kind, value)`` items,
#: kind ``"box"`` (value: the rounded box), ``"mask"`` (value: a digest of the keyframe mask) or
#: ``"range"`` (slice -1, value: the inclusive slice range).
Signature = tuple[tuple[int, str, Any], ...]


def prompts_signature(
    boxes_by_slice: Mapping[int, Sequence[float]],
    masks_by_slice: Mapping[int, np.ndarray] | None = None,
    slice_range: tuple[int, int] | None = None,
    points_by_slice: Mapping[int, Sequence[Sequence[float]]] | None = None,
) -> Signature:
    """The comparable form of one object's prompts (boxes and clicks rounded to 1e-3 pixel);
    a slice whose clicks changed counts as a changed keyframe slice."""
    items: list[tuple[int, str, Any]] = [
        (int(z), "box", tuple(round(float(v), 3) for v in box)) for z, box in boxes_by_slice.items()
    ]
    for z, clicks in (points_by_slice or {}).items():
        packed = tuple(
            sorted((round(float(y), 3), round(float(x), 3), int(k)) for y, x, k in clicks)
        )
        items.append((int(z), "points", packed))
    for z, mask in (masks_by_slice or {}).items():
        packed = np.packbits(np.asarray(mask, dtype=bool))
        items.append((int(z), "mask", hashlib.sha1(packed.tobytes()).hexdigest()))
    if slice_range is not None:
        items.append((-1, "range", (int(slice_range[0]), int(slice_range[1]))))
    return tuple(sorted(items))


def changed_keyframes(old: Signature | None, new: Signature) -> tuple[tuple[int, ...], bool]:
    """Keyframe slices that are new or different in ``new``, and whether a keyframe was
    removed or the range changed (then the whole object must be recomputed)."""
    if old is None:
        return tuple(sorted({z for z, kind, _ in new if kind != "range"})), True

    def by_slice(signature: Signature) -> dict[int, set]:
        out: dict[int, set] = {}
        for z, kind, value in signature:
            if kind != "range":
                out.setdefault(z, set()).add((kind, value))
        return out

    # a slice changed when its prompts differ in any way (a box kept while its clicks or mask
    # went away changes that slice too)
    old_by, new_by = by_slice(old), by_slice(new)
    changed = {z for z, prompts in new_by.items() if old_by.get(z) != prompts}
    old_slices = {z for z, kind, _ in old if kind != "range"}
    new_slices = {z for z, kind, _ in new if kind != "range"}
    range_changed = {i for i in old if i[1] == "range"} != {i for i in new if i[1] == "range"}
    return tuple(sorted(changed)), bool(old_slices - new_slices) or range_changed


@dataclass(frozen=True)
class ObjectRecord:
    """One object (box mode) or class (automatic mode) of the preview.

    Attributes
    ----------
    object_id : int
        Its label value.
    name : str
    color : str
        ``#rrggbb``.
    signature : Signature or None
        Prompts the preview voxels were computed from; None for an automatic-mode class or an
        object whose last run did not finish.
    slices : tuple of int
        Slices the object was computed on (its boxed slices; all slices in automatic mode).
    covered : tuple of int
        Slices where the object has voxels in the preview (the table's "slices").
    voxels : int
        Voxels of the object in the preview.
    volume_ml : float or None
        ``voxels`` x voxel volume in mL (volumes only).
    """

    object_id: int
    name: str
    color: str
    signature: Signature | None = None
    slices: tuple[int, ...] = ()
    covered: tuple[int, ...] = ()
    voxels: int = 0
    volume_ml: float | None = None


def changed_objects(
    records: Mapping[int, ObjectRecord], signatures: Mapping[int, Signature]
) -> tuple[list[int], list[int]]:
    """Which objects a box run must recompute, and which disappeared from the prompts.

    Parameters
    ----------
    records : mapping
        The preview's objects.
    signatures : mapping
        Object id -> :func:`prompts_signature` of its current prompts.

    Returns
    -------
    recompute : list of int
        Objects whose signature differs from their record's (or that have no record).
    removed : list of int
        Objects with a record but no prompts any more (their preview voxels must go).
    """
    recompute = [
        int(k)
        for k in sorted(signatures)
        if k not in records or records[k].signature != signatures[k]
    ]
    removed = [int(k) for k in sorted(records) if k not in signatures]
    return recompute, removed


def slices_text(slices: Iterable[int]) -> str:
    """``"3-7 (5)"`` for the slices column; ``"-"`` when none."""
    zs = sorted({int(z) for z in slices})
    if not zs:
        return "-"
    return f"{zs[0]}-{zs[-1]} ({len(zs)})" if len(zs) > 1 else f"{zs[0]} (1)"


def measure(
    labels: np.ndarray, object_ids: Iterable[int], spacing_zyx: Sequence[float] | None
) -> dict[int, tuple[tuple[int, ...], int, float | None]]:
    """Slices covered, voxel count and volume (mL) of each object in ``labels``.

    Parameters
    ----------
    labels : ndarray
        ``(Z, Y, X)`` (or ``(Y, X)``) preview labels.
    object_ids : iterable of int
    spacing_zyx : sequence of 3 float or None
        Voxel size in mm; None: no volume (videos, pictures).
    """
    data = np.asarray(labels)
    if data.ndim == 2:
        data = data[np.newaxis]
    counts = np.bincount(data.ravel().astype(np.int64, copy=False))
    ids = [int(i) for i in object_ids]
    per_slice = {i: np.flatnonzero((data == i).any(axis=(1, 2))) for i in ids if i < counts.size}
    voxel_ml = None if spacing_zyx is None else float(np.prod(spacing_zyx)) / 1000.0
    out = {}
    for i in ids:
        n = int(counts[i]) if i < counts.size else 0
        zs = tuple(int(z) for z in per_slice.get(i, ()))
        out[i] = (zs, n, None if voxel_ml is None else n * voxel_ml)
    return out


class ObjectTable(QTableWidget):
    """The preview's objects: id, editable name and colour, slices covered, voxels, volume.

    Parameters
    ----------
    on_renamed, on_recolored : callable
        Called with ``(object_id, name)`` / ``(object_id, "#rrggbb")`` after the user edits a
        cell (an invalid colour is put back).
    """

    COLUMNS = ("id", "name", "colour", "slices", "voxels", "mL")

    def __init__(
        self,
        on_renamed: Callable[[int, str], None],
        on_recolored: Callable[[int, str], None],
    ) -> None:
        super().__init__(0, len(self.COLUMNS))
        self._on_renamed = on_renamed
        self._on_recolored = on_recolored
        self._records: dict[int, ObjectRecord] = {}
        self._filling = False
        self.setHorizontalHeaderLabels(list(self.COLUMNS))
        self.verticalHeader().setVisible(False)
        header = self.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.setEditTriggers(
            QAbstractItemView.EditTrigger.DoubleClicked
            | QAbstractItemView.EditTrigger.EditKeyPressed
            | QAbstractItemView.EditTrigger.SelectedClicked
        )
        self.setToolTip(
            "Objects of the preview. Double-click a name or a colour (#rrggbb) to change it; "
            "names and colours go with Commit and Export. slices: first-last (count); volume "
            "from the voxel spacing (mL)."
        )
        self.setMaximumHeight(160)
        self.setMinimumWidth(120)
        self.itemChanged.connect(self._item_changed)

    @property
    def records(self) -> dict[int, ObjectRecord]:
        """The records shown, by object id."""
        return dict(self._records)

    def show_records(self, records: Mapping[int, ObjectRecord]) -> None:
        """Show ``records`` (sorted by id); hidden when empty."""
        self._records = dict(records)
        self._filling = True
        try:
            self.setRowCount(len(records))
            for row, rec in enumerate(sorted(records.values(), key=lambda r: r.object_id)):
                ml = "" if rec.volume_ml is None else f"{rec.volume_ml:.3f}"
                cells = (
                    str(rec.object_id),
                    rec.name,
                    rec.color,
                    slices_text(rec.covered),
                    str(rec.voxels),
                    ml,
                )
                for col, text in enumerate(cells):
                    item = QTableWidgetItem(text)
                    item.setData(Qt.ItemDataRole.UserRole, rec.object_id)
                    if col not in (1, 2):
                        item.setFlags(item.flags() & ~Qt.ItemFlag.ItemIsEditable)
                    if col == 2:
                        item.setBackground(QColor(rec.color))
                        item.setForeground(QColor(_readable_on(rec.color)))
                    self.setItem(row, col, item)
        finally:
            self._filling = False
        self.setVisible(bool(records))

    def _item_changed(self, item: QTableWidgetItem) -> None:
        if self._filling:
            return
        object_id = int(item.data(Qt.ItemDataRole.UserRole))
        record = self._records.get(object_id)
        if record is None:
            return
        text = item.text().strip()
        if item.column() == 1:
            if text and text != record.name:
                self._on_renamed(object_id, text)
            elif not text:
                self.show_records(self._records)
        elif item.column() == 2:
            color = QColor(text)
            if not color.isValid():
                self.show_records(self._records)  # put the old colour back
                return
            hex_color = color.name()
            if hex_color != record.color:
                self._on_recolored(object_id, hex_color)


def _readable_on(color: str) -> str:
    c = QColor(color)
    luminance = 0.299 * c.red() + 0.587 * c.green() + 0.114 * c.blue()
    return "#000000" if luminance > 140 else "#ffffff"


def as_napari_table(records: Mapping[int, ObjectRecord]) -> dict[str, Any]:
    """``{"names": [...], "colors": [...]}`` for label values ``1..max id`` (gaps get defaults)."""
    from ._layers import object_color

    top = max(records, default=0)
    names = [records[i].name if i in records else f"object {i}" for i in range(1, top + 1)]
    colors = [records[i].color if i in records else object_color(i) for i in range(1, top + 1)]
    return {"names": names, "colors": colors}
