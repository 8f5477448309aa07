"""The region panel: the 10 Reg2RG regions with colour, visibility, fill/outline opacity and volume."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor, QFont, QIcon, QPixmap
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QColorDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from reg2rg.engine.regions import REGIONS

from .document import ViewerDocument

COL_SHOW, COL_NAME, COL_VOLUME, COL_FILL, COL_OUTLINE = range(5)


def _swatch(color: tuple[int, int, int]) -> QIcon:
    pix = QPixmap(14, 14)
    pix.fill(QColor(*color))
    return QIcon(pix)


def _slider(value: float) -> QSlider:
    s = QSlider(Qt.Horizontal)
    s.setRange(0, 100)
    s.setValue(int(round(value * 100)))
    s.setFixedWidth(64)
    return s


class RegionPanel(QWidget):
    """Shows and edits ViewerDocument.region_styles; clicking a region centres the views on it."""

    regionActivated = Signal(str)

    def __init__(self, document: ViewerDocument, parent=None) -> None:
        super().__init__(parent)
        self.document = document
        self.setObjectName("region_panel")
        self.table = QTableWidget(len(REGIONS), 5, self)
        self.table.setHorizontalHeaderLabels(["", "Region", "Volume", "Fill", "Outline"])
        self.table.verticalHeader().hide()
        # Compact rows: all ten regions fit in the dock above the draft without scrolling.
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.Fixed)
        self.table.verticalHeader().setDefaultSectionSize(23)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setShowGrid(False)
        self.table.setAlternatingRowColors(True)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(COL_NAME, QHeaderView.Stretch)
        for c in (COL_SHOW, COL_VOLUME, COL_FILL, COL_OUTLINE):
            header.setSectionResizeMode(c, QHeaderView.ResizeToContents)
        self.checkboxes: dict[str, QCheckBox] = {}
        self.fill_sliders: dict[str, QSlider] = {}
        self.outline_sliders: dict[str, QSlider] = {}
        for row, region in enumerate(REGIONS):
            style = document.region_styles[region]
            box = QCheckBox()
            box.setChecked(style.visible)
            box.setToolTip(f"Show {region}")
            box.toggled.connect(lambda on, r=region: self.document.set_region_style(r, visible=on))
            holder = QWidget()
            lay = QHBoxLayout(holder)
            lay.setContentsMargins(4, 0, 0, 0)
            lay.addWidget(box)
            self.table.setCellWidget(row, COL_SHOW, holder)
            self.checkboxes[region] = box
            item = QTableWidgetItem(_swatch(style.color), region)
            item.setToolTip("Click: centre the views on this region. Double-click the colour to change it.")
            self.table.setItem(row, COL_NAME, item)
            self.table.setItem(row, COL_VOLUME, QTableWidgetItem("—"))
            self.table.item(row, COL_VOLUME).setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
            for col, attr, store in ((COL_FILL, "fill_opacity", self.fill_sliders),
                                     (COL_OUTLINE, "outline_opacity", self.outline_sliders)):
                s = _slider(getattr(style, attr))
                s.valueChanged.connect(lambda v, r=region, a=attr: self.document.set_region_style(r, **{a: v / 100.0}))
                self.table.setCellWidget(row, col, s)
                store[region] = s
        self.table.cellClicked.connect(self._on_click)
        self.table.cellDoubleClicked.connect(self._on_double_click)
        self.summary = QLabel("No study open")
        self.summary.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.table)
        layout.addWidget(self.summary)
        document.studyChanged.connect(self.refresh)
        document.regionStylesChanged.connect(self._sync_styles)

    def refresh(self) -> None:
        """Volumes and present/absent state of the open study's masks."""
        study = self.document.study
        present = set(study.regions_present) if study is not None else set()
        for row, region in enumerate(REGIONS):
            name = self.table.item(row, COL_NAME)
            vol = self.table.item(row, COL_VOLUME)
            font = QFont(name.font())
            font.setItalic(region not in present)
            name.setFont(font)
            if region in present:
                vol.setText(f"{study.region_volume_ml(region):,.0f} mL")
                name.setForeground(self.palette().text())
                source = study.mask_sources.get(region, "")
                name.setToolTip(f"{region}: present" + (f" ({source})" if source else ""))
            else:
                vol.setText("absent" if study is not None else "—")
                name.setForeground(QColor(130, 130, 130))
                name.setToolTip(f"{region}: no mask in this study")
            self.checkboxes[region].setEnabled(region in present)
        if study is None:
            self.summary.setText("No study open")
        else:
            self.summary.setText(f"{len(present)} of {len(REGIONS)} regions present")

    def _sync_styles(self) -> None:
        for row, region in enumerate(REGIONS):
            style = self.document.region_styles[region]
            for widget, value in ((self.checkboxes[region], style.visible),
                                  (self.fill_sliders[region], int(round(style.fill_opacity * 100))),
                                  (self.outline_sliders[region], int(round(style.outline_opacity * 100)))):
                widget.blockSignals(True)
                widget.setChecked(value) if isinstance(widget, QCheckBox) else widget.setValue(value)
                widget.blockSignals(False)
            self.table.item(row, COL_NAME).setIcon(_swatch(style.color))

    def _on_click(self, row: int, col: int) -> None:
        if col in (COL_NAME, COL_VOLUME):
            region = REGIONS[row]
            if self.document.centre_on_region(region):
                self.regionActivated.emit(region)

    def _on_double_click(self, row: int, col: int) -> None:
        if col != COL_NAME:
            return
        region = REGIONS[row]
        color = QColorDialog.getColor(QColor(*self.document.region_styles[region].color), self, f"Colour of {region}")
        if color.isValid():
            self.document.set_region_style(region, color=(color.red(), color.green(), color.blue()))
