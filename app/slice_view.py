"""One MPR slice view (axial, coronal or sagittal): VTK image slices inside a Qt widget.

The CT and the region label bits are uploaded to VTK once per study (``vtkImageData`` sharing the
numpy memory); a slice step only changes ``vtkImageSliceMapper.SetSliceNumber`` and recomputes the
2D region outlines of that one slice, so stepping never re-uploads a volume. Window/level is applied by
``vtkImageProperty``; region fills by a 1024-entry lookup table over the 10 region bits (regions
overlap — the mediastinum contains the heart — so a plain label map could not show them).
Mouse and keys follow 3D Slicer / ITK-SNAP: wheel or arrows scroll, left-drag window/level, click sets
the crosshair, right-drag or Ctrl+wheel zoom, middle-drag pan, ``r`` resets, double-click maximises.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QPoint, Qt, QTimer, Signal
from vtkmodules.util.numpy_support import numpy_to_vtk
from vtkmodules.vtkCommonCore import vtkLookupTable, vtkPoints
from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkImageData, vtkPolyData
from vtkmodules.vtkInteractionStyle import vtkInteractorStyleUser
from vtkmodules.vtkRenderingCore import (
    vtkActor,
    vtkImageProperty,
    vtkImageSlice,
    vtkImageSliceMapper,
    vtkPolyDataMapper,
    vtkRenderer,
    vtkTextActor,
)
import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers the OpenGL back end)
import vtkmodules.vtkRenderingFreeType  # noqa: F401  (text)

from reg2rg.engine.regions import REGIONS

from .display import VIEW_NAMES, compose_slice, orientation_letters, slice_of, window_slice, window_table
from .document import RegionStyle, ViewerDocument
from .render_widget import RenderWidget

# Camera direction of projection and view-up per fixed display axis (RAS+ display axes). With
# right = dop x up this puts the patient's left on the screen's right (radiological convention) and
# anterior on the left of the sagittal view.
CAMERA = {
    2: ((0.0, 0.0, 1.0), (0.0, 1.0, 0.0)),    # axial: from the feet, anterior up
    1: ((0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),   # coronal: from the front, superior up
    0: ((1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),    # sagittal: from the patient's left, superior up
}
# Screen x and y as display axes (+1: index grows to the right / up; -1: the other way).
SCREEN_AXES = {2: ((0, -1), (1, 1)), 1: ((0, -1), (2, 1)), 0: ((1, -1), (2, 1))}
VIEW_COLORS = {2: (0.86, 0.30, 0.30), 1: (0.35, 0.75, 0.35), 0: (0.90, 0.80, 0.30)}  # Slicer's red/green/yellow

N_LABEL_CODES = 1 << len(REGIONS)
LINKED_VIEW_DELAY_MS = 120             # a linked view's crosshair follows once scrolling pauses this long
# The heat layer's peak: a ring with four ticks (a target reticle, its centre left open so the anatomy at the
# peak stays visible) in magenta, which none of the colour maps, the crosshair's yellow or a region colour uses.
PEAK_COLOR = (1.0, 0.2, 1.0)
PEAK_RING_PX = 11.0                    # ring radius on screen (kept at any zoom); the ticks reach 1.9x that
PEAK_RING_SEGMENTS = 32


def region_lookup_table(styles: dict[str, RegionStyle], outline: bool) -> np.ndarray:
    """RGBA (1024, 4) uint8: the colour of every combination of region bits.

    Overlapping regions are composited with the "over" operator in the published region order.
    """
    codes = np.arange(N_LABEL_CODES)
    rgb = np.zeros((N_LABEL_CODES, 3))
    alpha = np.zeros(N_LABEL_CODES)
    for i, region in enumerate(REGIONS):
        style = styles[region]
        a = style.outline_opacity if outline else style.fill_opacity
        if not style.visible or a <= 0:
            continue
        has = (codes >> i) & 1 == 1
        c = np.asarray(style.color, dtype=np.float64)
        rgb[has] = c * a + rgb[has] * (1 - a)
        alpha[has] = a + alpha[has] * (1 - a)
    # rgb above is premultiplied; VTK blends straight alpha.
    straight = np.where(alpha[:, None] > 0, rgb / np.maximum(alpha[:, None], 1e-6), 0)
    out = np.zeros((N_LABEL_CODES, 4), dtype=np.uint8)
    out[:, :3] = np.clip(straight, 0, 255).astype(np.uint8)
    out[:, 3] = np.clip(alpha * 255, 0, 255).astype(np.uint8)
    return out


def _vtk_lut(table: np.ndarray, lut: vtkLookupTable | None = None) -> vtkLookupTable:
    lut = lut or vtkLookupTable()
    lut.SetNumberOfTableValues(len(table))
    lut.SetTableRange(-0.5, len(table) - 0.5)  # integer code v -> entry v
    for v, (r, g, b, a) in enumerate(table / 255.0):
        lut.SetTableValue(v, r, g, b, a)
    lut.Modified()
    return lut


def image_from_array(array: np.ndarray, spacing, extent_start=(0, 0, 0)) -> vtkImageData:
    """Wrap a Fortran-ordered 3D numpy array as vtkImageData without copying (keeps a reference)."""
    assert array.flags.f_contiguous, "VTK images need axis 0 varying fastest"
    image = vtkImageData()
    e = extent_start
    image.SetExtent(e[0], e[0] + array.shape[0] - 1, e[1], e[1] + array.shape[1] - 1, e[2], e[2] + array.shape[2] - 1)
    image.SetSpacing(*spacing)
    image.SetOrigin(0.0, 0.0, 0.0)
    scalars = numpy_to_vtk(array.ravel(order="F"), deep=False)
    image.GetPointData().SetScalars(scalars)
    image._numpy_ref = array  # type: ignore[attr-defined]  # VTK does not own numpy memory
    return image


class CornerText:
    """Text in the four corners (vtkCornerAnnotation's ``SetText(corner, text)`` API: 0 lower left,
    1 lower right, 2 upper left, 3 upper right) as plain text actors of a fixed size.

    vtkCornerAnnotation fits its font to the viewport on every render, which costs more than the
    whole slice when the slice number changes each step; fixed-size actors re-rasterise only the
    text that changed.
    """

    POSITIONS = {0: (0.008, 0.012, 0, 0), 1: (0.992, 0.012, 2, 0), 2: (0.008, 0.988, 0, 2), 3: (0.992, 0.988, 2, 2)}

    def __init__(self, renderer: vtkRenderer, size: int = 14) -> None:
        self.actors: dict[int, vtkTextActor] = {}
        for corner, (x, y, hj, vj) in self.POSITIONS.items():
            t = vtkTextActor()
            t.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
            t.GetPositionCoordinate().SetValue(x, y)
            p = t.GetTextProperty()
            p.SetFontSize(size)
            p.SetColor(0.85, 0.85, 0.85)
            p.ShadowOn()
            p.SetJustification(hj)
            p.SetVerticalJustification(vj)
            t.SetInput("")
            renderer.AddViewProp(t)
            self.actors[corner] = t

    def SetText(self, corner: int, text: str) -> None:  # noqa: N802  (VTK's spelling)
        if self.actors[corner].GetInput() != text:
            self.actors[corner].SetInput(text)

    def GetText(self, corner: int) -> str:  # noqa: N802
        return self.actors[corner].GetInput() or ""


class SliceView(RenderWidget):
    """An MPR view of one display axis; observes a ViewerDocument, requests changes through it."""

    hovered = Signal(object)            # display voxel under the mouse, or None
    maximiseToggled = Signal()
    resetRequested = Signal()

    def __init__(self, document: ViewerDocument, axis: int, parent=None) -> None:
        super().__init__(parent)
        self.document = document
        self.axis = axis
        self.setObjectName(f"view_{VIEW_NAMES[axis].lower()}")
        self.setMinimumSize(160, 160)
        self.setMouseTracking(True)
        self.setFocusPolicy(Qt.StrongFocus)

        self.renderer = vtkRenderer()
        self.renderer.SetBackground(0.0, 0.0, 0.0)
        rw = self.GetRenderWindow()
        # Multisampling buys nothing for axis-aligned image slices and costs ~40 % of a frame on
        # software OpenGL (llvmpipe): off.
        rw.SetMultiSamples(0)
        rw.AddRenderer(self.renderer)
        self.GetRenderWindow().GetInteractor().SetInteractorStyle(vtkInteractorStyleUser())
        self.renderer.GetActiveCamera().ParallelProjectionOn()

        # One image layer: the slice's picture composed in numpy (CT through a window table, region
        # fills and outlines, heatmap) into a persistent RGB buffer that VTK shows as is. A slice
        # step costs one gather per layer and one texture upload; nothing is resliced or re-mapped
        # by VTK, and only the buffer of this view changes.
        self._mapper = vtkImageSliceMapper()
        self._mapper.SetOrientation(axis)
        self._mapper.BorderOn()  # pixels fill their whole voxel, as in the clinical viewers
        prop = vtkImageProperty()
        prop.SetColorWindow(255.0)        # RGB uint8 shown unchanged
        prop.SetColorLevel(127.5)
        prop.SetInterpolationTypeToLinear()
        self._slice_actor = vtkImageSlice()
        self._slice_actor.SetMapper(self._mapper)
        self._slice_actor.SetProperty(prop)
        self._slice_actor.VisibilityOff()
        self.renderer.AddViewProp(self._slice_actor)
        self._image: vtkImageData | None = None
        self._rgb: np.ndarray | None = None          # (n0, n1, 3) view into the image's buffer
        self._grey_table: np.ndarray | None = None
        self._fill_table: np.ndarray | None = None
        self._outline_table: np.ndarray | None = None
        self._heat_codes: np.ndarray | None = None   # display-order uint8 heat volume
        self._heat_table: np.ndarray | None = None
        self._heat_opacity = 0.0

        self._cross = vtkPolyData()
        cross_mapper = vtkPolyDataMapper()
        cross_mapper.SetInputData(self._cross)
        self._cross_actor = vtkActor()
        self._cross_actor.SetMapper(cross_mapper)
        # Opaque (a darker yellow instead of 75 % opacity): translucent geometry would add a
        # translucent render pass to every frame.
        self._cross_actor.GetProperty().SetColor(0.80, 0.68, 0.18)
        self._cross_actor.GetProperty().SetOpacity(1.0)
        self._cross_actor.GetProperty().SetLineWidth(1.0)
        self._cross_actor.PickableOff()
        self.renderer.AddActor(self._cross_actor)

        self._peak: tuple[int, int, int] | None = None   # display voxel of the heat layer's maximum
        self._peak_poly = vtkPolyData()
        peak_mapper = vtkPolyDataMapper()
        peak_mapper.SetInputData(self._peak_poly)
        self._peak_actor = vtkActor()
        self._peak_actor.SetMapper(peak_mapper)
        self._peak_actor.GetProperty().SetColor(*PEAK_COLOR)
        self._peak_actor.GetProperty().SetLineWidth(2.0)
        self._peak_actor.PickableOff()
        self._peak_actor.VisibilityOff()
        self.renderer.AddActor(self._peak_actor)

        self._letters = {}
        for edge, pos in {"left": (0.012, 0.5), "right": (0.988, 0.5), "top": (0.5, 0.985), "bottom": (0.5, 0.015)}.items():
            t = vtkTextActor()
            t.GetPositionCoordinate().SetCoordinateSystemToNormalizedViewport()
            t.GetPositionCoordinate().SetValue(*pos)
            p = t.GetTextProperty()
            p.SetFontSize(15)
            p.BoldOn()
            p.SetColor(0.95, 0.80, 0.35)
            p.SetJustification({"left": 0, "right": 2}.get(edge, 1))
            p.SetVerticalJustification({"top": 2, "bottom": 0}.get(edge, 1))
            self.renderer.AddViewProp(t)
            self._letters[edge] = t
        for edge, letter in orientation_letters(axis).items():
            self._letters[edge].SetInput(letter)
        self._corner = CornerText(self.renderer)
        self._corner.SetText(2, VIEW_NAMES[axis])

        self._press_pos: QPoint | None = None
        self._press_button = Qt.NoButton
        self._dragged = False
        self._has_volume = False
        self._shown_slice: int | None = None   # the slice index drawn now
        # Linked views: when only the crosshair moved here (another view scrolled), redraw once the
        # scrolling pauses instead of on every step, so the scrolled view gets the whole frame budget.
        self.lazy_links = True
        self._link_timer = QTimer(self)
        self._link_timer.setSingleShot(True)
        self._link_timer.setInterval(LINKED_VIEW_DELAY_MS)
        self._link_timer.timeout.connect(self.request_render)

        document.studyChanged.connect(self._on_study)
        document.cursorChanged.connect(self._on_cursor)
        document.windowLevelChanged.connect(self._on_window_level)
        document.regionStylesChanged.connect(self._on_region_styles)

    # -- pipeline ----------------------------------------------------------------------------
    def _on_study(self) -> None:
        vol = self.document.volume
        self._has_volume = vol is not None
        self._slice_actor.VisibilityOff()
        self._cross_actor.SetVisibility(vol is not None)
        self._shown_slice = None
        self._heat_codes = None
        self._peak = None
        self._peak_actor.VisibilityOff()
        if vol is None:
            self._corner.SetText(0, "")
            self.request_render()
            return
        # The slice buffer: a one-voxel-thick image on this view's plane, moved along the axis per step.
        dims = list(vol.shape)
        dims[self.axis] = 1
        buf = np.zeros((dims[0] * dims[1] * dims[2], 3), dtype=np.uint8)
        self._image = vtkImageData()
        self._image.SetDimensions(*dims)
        self._image.SetSpacing(*vol.spacing)
        self._image.SetOrigin(0.0, 0.0, 0.0)
        self._image.GetPointData().SetScalars(numpy_to_vtk(buf, deep=False))
        self._image._numpy_ref = buf  # type: ignore[attr-defined]
        in_plane = [n for a, n in enumerate(vol.shape) if a != self.axis]
        # VTK point order: the first in-plane axis varies fastest -> an (n0, n1, 3) view of the buffer
        self._rgb = buf.reshape(in_plane[1], in_plane[0], 3).transpose(1, 0, 2)
        self._mapper.SetInputData(self._image)
        self._slice_actor.VisibilityOn()
        self._on_window_level(self.document.window, self.document.level, render=False)
        self._on_region_styles(render=False)
        self.reset_camera()
        self._on_cursor(self.document.cursor)

    def reset_camera(self) -> None:
        """Fit the whole slice in the view (keeps the slice and the window/level)."""
        vol = self.document.volume
        if vol is None:
            return
        size = np.array(vol.shape) * np.array(vol.spacing)
        centre = (size - np.array(vol.spacing)) / 2.0
        dop, up = CAMERA[self.axis]
        cam = self.renderer.GetActiveCamera()
        dist = float(np.linalg.norm(size)) * 2.0
        cam.SetFocalPoint(*centre)
        cam.SetPosition(*(centre - np.array(dop) * dist))
        cam.SetViewUp(*up)
        (xa, _), (ya, _) = SCREEN_AXES[self.axis]
        w, h = max(self.width(), 1), max(self.height(), 1)
        cam.SetParallelScale(max(size[ya] / 2.0, size[xa] / 2.0 * h / w) * 1.04)
        cam.SetClippingRange(dist * 0.25, dist * 2.0)
        self._update_peak_marker()
        self.request_render()

    def resizeEvent(self, ev) -> None:  # noqa: N802
        super().resizeEvent(ev)
        if self._has_volume and not getattr(self, "_user_zoomed", False):
            self.reset_camera()
        elif self._has_volume:
            self._update_peak_marker()           # the same zoom over another height: the ring keeps its size

    def _on_window_level(self, window: float, level: float, render: bool = True) -> None:
        self._grey_table = window_table(window, level)
        self._corner.SetText(3, f"W {window:.0f}  L {level:.0f}")
        if render:
            self._refresh_slice()

    def _on_region_styles(self, render: bool = True) -> None:
        styles = self.document.region_styles
        fill = region_lookup_table(styles, outline=False)
        outline = region_lookup_table(styles, outline=True)
        self._fill_table = fill if fill[:, 3].any() else None
        self._outline_table = outline if outline[:, 3].any() else None
        if render:
            self._refresh_slice()

    def _refresh_slice(self) -> None:
        """Recompose the shown slice (a display setting changed) and render."""
        if self._has_volume and self._shown_slice is not None:
            self._compose(self._shown_slice)
        self.request_render()

    def _compose(self, k: int) -> None:
        """Compose slice ``k`` into the image buffer and place the image on that slice."""
        vol = self.document.volume
        heat = slice_of(self._heat_codes, self.axis, k) if self._heat_codes is not None else None
        grey = window_slice(slice_of(vol.ct, self.axis, k), self.document.window, self.document.level,
                            self._grey_table)
        compose_slice(grey, slice_of(vol.labels, self.axis, k), self._fill_table, self._outline_table,
                      heat, self._heat_table, self._heat_opacity, out=self._rgb)
        origin = [0.0, 0.0, 0.0]
        origin[self.axis] = k * vol.spacing[self.axis]
        self._image.SetOrigin(*origin)
        self._image.GetPointData().GetScalars().Modified()
        self._image.Modified()

    def _on_cursor(self, ijk) -> None:
        vol = self.document.volume
        if vol is None:
            return
        k = int(ijk[self.axis])
        self._update_crosshair(ijk)
        if k == self._shown_slice and self.lazy_links:
            self._link_timer.start()             # only the crosshair moved: coalesce
            return
        if k != self._shown_slice:
            self._shown_slice = k
            self._compose(k)
            self._corner.SetText(0, f"Slice {k + 1}/{vol.shape[self.axis]}")
            self._update_peak_marker()
        self._link_timer.stop()
        self.request_render()

    def _update_crosshair(self, ijk) -> None:
        vol = self.document.volume
        sp = np.array(vol.spacing)
        size = np.array(vol.shape) * sp
        p = np.array(ijk, dtype=np.float64) * sp
        dop, _ = CAMERA[self.axis]
        p = p - np.array(dop) * sp[self.axis] * 0.5   # in front of the slice, towards the camera
        (xa, _), (ya, _) = SCREEN_AXES[self.axis]
        gap = 0.03 * float(max(size[xa], size[ya]))
        points = vtkPoints()
        lines = vtkCellArray()
        for a in (xa, ya):
            lo, hi = p.copy(), p.copy()
            lo[a], hi[a] = -sp[a] / 2, size[a] - sp[a] / 2
            g1, g2 = p.copy(), p.copy()
            g1[a] -= gap
            g2[a] += gap
            for seg in ((lo, g1), (g2, hi)):
                i0 = points.InsertNextPoint(*seg[0])
                i1 = points.InsertNextPoint(*seg[1])
                lines.InsertNextCell(2)
                lines.InsertCellPoint(i0)
                lines.InsertCellPoint(i1)
        self._cross.SetPoints(points)
        self._cross.SetLines(lines)
        self._cross.Modified()

    # -- heatmap (attention) layer, fed by the attention panel ---------------------------------
    def set_heatmap(self, codes: np.ndarray | None, table: np.ndarray | None = None, opacity: float = 0.5) -> None:
        """Show a heatmap over the CT: ``codes`` uint8 in display order (the volume's shape), ``table``
        RGBA (256, 4) per code (its alpha fades weak values out), times ``opacity``. None hides it."""
        if codes is not None and tuple(codes.shape) != tuple(self.document.volume.shape):
            raise ValueError(f"heatmap shape {codes.shape} is not the display volume's {self.document.volume.shape}")
        self._heat_codes = codes
        if table is not None:
            self._heat_table = table
        self._heat_opacity = float(opacity) if codes is not None else 0.0
        self._refresh_slice()

    def set_peak(self, ijk) -> None:
        """Mark the heat layer's maximum (a display voxel; None removes the mark). The mark is drawn while
        this view shows the peak's slice."""
        self._peak = None if ijk is None else tuple(int(v) for v in ijk)
        self._update_peak_marker()
        self.request_render()

    def peak_marker_shown(self) -> bool:
        """Whether the peak's mark is drawn in this view now."""
        return bool(self._peak_actor.GetVisibility())

    def _update_peak_marker(self) -> None:
        vol = self.document.volume
        peak = self._peak
        if vol is None or peak is None or self._shown_slice != peak[self.axis]:
            self._peak_actor.VisibilityOff()
            return
        sp = np.array(vol.spacing, dtype=np.float64)
        (xa, _), (ya, _) = SCREEN_AXES[self.axis]
        # mm per screen pixel (parallel projection: the view's height spans twice the parallel scale)
        mm_per_px = 2.0 * self.renderer.GetActiveCamera().GetParallelScale() / max(self.height(), 1)
        radius = PEAK_RING_PX * mm_per_px
        dop, _ = CAMERA[self.axis]
        centre = np.array(peak, dtype=np.float64) * sp - np.array(dop) * sp[self.axis] * 0.6   # above the crosshair
        points = vtkPoints()
        lines = vtkCellArray()
        angles = np.linspace(0.0, 2.0 * np.pi, PEAK_RING_SEGMENTS, endpoint=False)
        ring = []
        for a in angles:
            q = centre.copy()
            q[xa] += radius * np.cos(a)
            q[ya] += radius * np.sin(a)
            ring.append(points.InsertNextPoint(*q))
        lines.InsertNextCell(len(ring) + 1)
        for i in ring + ring[:1]:
            lines.InsertCellPoint(i)
        for axis in (xa, ya):                 # ticks outside the ring, pointing at the peak
            for sign in (-1.0, 1.0):
                a, b = centre.copy(), centre.copy()
                a[axis] += sign * radius * 1.0
                b[axis] += sign * radius * 1.9
                lines.InsertNextCell(2)
                lines.InsertCellPoint(points.InsertNextPoint(*a))
                lines.InsertCellPoint(points.InsertNextPoint(*b))
        self._peak_poly.SetPoints(points)
        self._peak_poly.SetLines(lines)
        self._peak_poly.Modified()
        self._peak_actor.VisibilityOn()

    # -- picking -----------------------------------------------------------------------------
    def voxel_at(self, pos: QPoint) -> tuple[int, int, int] | None:
        """Display voxel under a widget position (the fixed axis is the current slice)."""
        vol = self.document.volume
        if vol is None:
            return None
        ratio = self.devicePixelRatioF()
        x = pos.x() * ratio
        y = (self.height() - pos.y() - 1) * ratio
        self.renderer.SetDisplayPoint(x, y, 0.0)
        self.renderer.DisplayToWorld()
        wx, wy, wz, ww = self.renderer.GetWorldPoint()
        world = np.array([wx, wy, wz]) / (ww or 1.0)
        ijk = np.rint(world / np.array(vol.spacing)).astype(int)
        ijk[self.axis] = self.document.cursor[self.axis]
        return tuple(int(v) for v in ijk) if vol.contains(ijk) else None

    def world_to_widget(self, ijk) -> QPoint:
        """Widget position of a display voxel's centre (used by tests and by hover synchronisation)."""
        vol = self.document.volume
        p = np.array(ijk, dtype=np.float64) * np.array(vol.spacing)
        self.renderer.SetWorldPoint(p[0], p[1], p[2], 1.0)
        self.renderer.WorldToDisplay()
        x, y, _ = self.renderer.GetDisplayPoint()
        ratio = self.devicePixelRatioF()
        return QPoint(int(round(x / ratio)), int(round(self.height() - 1 - y / ratio)))

    # -- interaction -------------------------------------------------------------------------
    def zoom(self, factor: float) -> None:
        cam = self.renderer.GetActiveCamera()
        cam.SetParallelScale(cam.GetParallelScale() / factor)
        self._user_zoomed = True
        self._update_peak_marker()
        self.request_render()

    def pan_pixels(self, dx: float, dy: float) -> None:
        cam = self.renderer.GetActiveCamera()
        per_px = 2.0 * cam.GetParallelScale() / max(self.height(), 1)
        dop, up = CAMERA[self.axis]
        right = np.cross(dop, up)
        shift = (-dx * right + dy * np.array(up)) * per_px
        cam.SetFocalPoint(*(np.array(cam.GetFocalPoint()) + shift))
        cam.SetPosition(*(np.array(cam.GetPosition()) + shift))
        self._user_zoomed = True
        self.request_render()

    def wheelEvent(self, ev) -> None:  # noqa: N802
        steps = ev.angleDelta().y() / 120.0
        if steps == 0:
            return
        if ev.modifiers() & Qt.ControlModifier:
            self.zoom(1.1 ** steps)
        else:
            self.document.step_slice(self.axis, 1 if steps > 0 else -1)
        ev.accept()

    def keyPressEvent(self, ev) -> None:  # noqa: N802
        key = ev.key()
        step = {Qt.Key_Up: 1, Qt.Key_Right: 1, Qt.Key_Down: -1, Qt.Key_Left: -1,
                Qt.Key_PageUp: 10, Qt.Key_PageDown: -10}.get(key)
        if step is not None:
            self.document.step_slice(self.axis, step)
        elif key == Qt.Key_R:
            self.resetRequested.emit()
        else:
            ev.ignore()
            return
        ev.accept()

    def keyReleaseEvent(self, ev) -> None:  # noqa: N802
        ev.ignore()

    def mousePressEvent(self, ev) -> None:  # noqa: N802
        self.setFocus()
        self._press_pos = ev.position().toPoint()
        self._last_pos = self._press_pos
        self._press_button = ev.button()
        self._dragged = False
        self._press_wl = (self.document.window, self.document.level)
        if ev.button() == Qt.LeftButton and ev.modifiers() & Qt.ShiftModifier:
            self._set_cursor_at(self._press_pos)
        ev.accept()

    def mouseMoveEvent(self, ev) -> None:  # noqa: N802
        pos = ev.position().toPoint()
        self.hovered.emit(self.voxel_at(pos))
        if self._press_pos is None:
            return
        if (pos - self._press_pos).manhattanLength() > 3:
            self._dragged = True
        if not self._dragged:
            return
        dx, dy = pos.x() - self._last_pos.x(), pos.y() - self._last_pos.y()
        self._last_pos = pos
        if self._press_button == Qt.LeftButton:
            if ev.modifiers() & Qt.ShiftModifier:
                self._set_cursor_at(pos)
            else:
                w0, l0 = self._press_wl
                tx, ty = pos.x() - self._press_pos.x(), pos.y() - self._press_pos.y()
                # Proportional to the starting width, as in ITK-SNAP: fine control in narrow windows.
                self.document.set_window_level(w0 * float(np.exp(tx / 200.0)), l0 + ty * max(w0, 50.0) / 400.0)
        elif self._press_button == Qt.RightButton:
            self.zoom(float(np.exp(-dy / 150.0)))
        elif self._press_button == Qt.MiddleButton:
            self.pan_pixels(dx, dy)

    def mouseReleaseEvent(self, ev) -> None:  # noqa: N802
        if self._press_pos is not None and not self._dragged and self._press_button == Qt.LeftButton:
            self._set_cursor_at(ev.position().toPoint())
        self._press_pos = None
        self._press_button = Qt.NoButton
        ev.accept()

    def mouseDoubleClickEvent(self, ev) -> None:  # noqa: N802
        self._press_pos = None
        self.maximiseToggled.emit()
        ev.accept()

    def leaveEvent(self, ev) -> None:  # noqa: N802
        self.hovered.emit(None)
        super().leaveEvent(ev)

    def _set_cursor_at(self, pos: QPoint) -> None:
        ijk = self.voxel_at(pos)
        if ijk is not None:
            self.document.set_cursor(ijk)
