"""The 3D view: region surfaces and a volume rendering of the CT, with the crosshair position marked."""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import QTimer, Signal
from vtkmodules.vtkCommonDataModel import vtkPiecewiseFunction, vtkPolyData
from vtkmodules.vtkFiltersCore import vtkFlyingEdges3D, vtkPolyDataNormals, vtkWindowedSincPolyDataFilter
from vtkmodules.vtkFiltersSources import vtkSphereSource
from vtkmodules.vtkInteractionStyle import vtkInteractorStyleTrackballCamera
from vtkmodules.vtkRenderingAnnotation import vtkCornerAnnotation
from vtkmodules.vtkRenderingCore import (
    vtkActor,
    vtkColorTransferFunction,
    vtkPolyDataMapper,
    vtkRenderer,
    vtkVolume,
    vtkVolumeProperty,
)
from vtkmodules.vtkRenderingVolumeOpenGL2 import vtkSmartVolumeMapper
import vtkmodules.vtkRenderingOpenGL2  # noqa: F401
import vtkmodules.vtkRenderingFreeType  # noqa: F401

from reg2rg.engine.regions import REGION_INDEX, REGIONS

from .display import DisplayVolume, SurfaceMesh
from .document import ViewerDocument
from .render_widget import VTK_LOCK, RenderWidget
from .slice_view import PEAK_COLOR, image_from_array
from .style import VOLUME_PRESETS

SURFACE_MAX_DIM = 128     # masks are downsampled to at most this many voxels per axis for meshing
VOLUME_MAX_DIM = 160      # and the CT for volume rendering (software OpenGL must stay interactive)
HEAT_MAX_DIM = 96         # attention maps are coarse (image patches): meshed on a smaller grid
# The attention heatmap in 3D: nested iso-surfaces at these fractions of its peak, each coloured as the
# slice views colour that value, the outer ones more transparent so the core shows through them.
HEAT_ISO_LEVELS = (0.6, 0.75, 0.9)
HEAT_SHELL_OPACITY = (0.25, 0.45, 0.9)
REGION_FADE_UNDER_HEAT = 0.3   # region surfaces' opacity factor while a heatmap is shown
PEAK_GLYPH_FRACTION = 0.025    # the peak's sphere: this fraction of the volume's largest extent as radius


def _stride(shape, max_dim: int) -> int:
    return max(1, int(np.ceil(max(shape) / max_dim)))


def mesh_from_polydata(poly: vtkPolyData) -> SurfaceMesh:
    """The triangles of a VTK surface as arrays (a filter's triangle output; other cells are dropped)."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    points = vtk_to_numpy(poly.GetPoints().GetData()).astype(np.float32) if poly.GetNumberOfPoints() else \
        np.zeros((0, 3), np.float32)
    cells = poly.GetPolys()
    offsets = vtk_to_numpy(cells.GetOffsetsArray()) if cells.GetNumberOfCells() else np.zeros(1, np.int64)
    conn = vtk_to_numpy(cells.GetConnectivityArray()) if cells.GetNumberOfCells() else np.zeros(0, np.int64)
    sizes = np.diff(offsets)
    triangles = conn.reshape(-1, 3).astype(np.int64) if np.all(sizes == 3) else \
        np.array([conn[a:a + 3] for a, n in zip(offsets[:-1], sizes) if n == 3], dtype=np.int64).reshape(-1, 3)
    normals = poly.GetPointData().GetNormals()
    return SurfaceMesh(points, triangles, vtk_to_numpy(normals).astype(np.float32) if normals is not None else None)


def polydata_from_mesh(mesh: SurfaceMesh) -> vtkPolyData:
    """A VTK surface for drawing a `SurfaceMesh` (GUI thread)."""
    from vtkmodules.util.numpy_support import numpy_to_vtk, numpy_to_vtkIdTypeArray
    from vtkmodules.vtkCommonCore import vtkPoints
    from vtkmodules.vtkCommonDataModel import vtkCellArray

    poly = vtkPolyData()
    pts = vtkPoints()
    pts.SetData(numpy_to_vtk(np.ascontiguousarray(mesh.points, dtype=np.float32), deep=True))
    poly.SetPoints(pts)
    cells = vtkCellArray()
    n = len(mesh.triangles)
    offsets = np.arange(0, 3 * n + 1, 3, dtype=np.int64)
    cells.SetData(numpy_to_vtkIdTypeArray(offsets, deep=True),
                  numpy_to_vtkIdTypeArray(np.ascontiguousarray(mesh.triangles.reshape(-1), dtype=np.int64), deep=True))
    poly.SetPolys(cells)
    if mesh.normals is not None:
        normals = numpy_to_vtk(np.ascontiguousarray(mesh.normals, dtype=np.float32), deep=True)
        normals.SetName("Normals")
        poly.GetPointData().SetNormals(normals)
    return poly


def region_surfaces(volume: DisplayVolume, max_dim: int = SURFACE_MAX_DIM) -> dict[str, SurfaceMesh]:
    """Smoothed triangle surfaces of every non-empty region, in display-world mm, as `SurfaceMesh` arrays.

    Pure VTK filters without rendering, so this runs on the loader thread; each region's filters run under
    `render_widget.VTK_LOCK` (VTK is not safe in two threads at once), their objects freed before it is released.
    """
    s = _stride(volume.shape, max_dim)
    labels = volume.labels[::s, ::s, ::s]                                  # (I/s, J/s, K/s)
    spacing = tuple(float(v) * s for v in volume.spacing)
    out: dict[str, SurfaceMesh] = {}
    for region in REGIONS:
        if region not in volume.region_bounds:
            continue
        mask = (labels & np.uint16(1 << REGION_INDEX[region])) > 0
        if not mask.any():
            continue
        padded = np.zeros(tuple(n + 2 for n in mask.shape), dtype=np.float32, order="F")
        padded[1:-1, 1:-1, 1:-1] = mask                                   # closed surfaces at the borders
        with VTK_LOCK:
            out[region] = _smoothed_surface(padded, spacing)
    return out


def _smoothed_surface(padded: np.ndarray, spacing) -> SurfaceMesh:
    """One region's surface (flying edges at 0.5, windowed-sinc smoothing, normals) as arrays."""
    image = image_from_array(padded, spacing)
    image.SetOrigin(*(-v for v in spacing))
    edges = vtkFlyingEdges3D()
    edges.SetInputData(image)
    edges.SetValue(0, 0.5)
    edges.ComputeNormalsOff()
    smooth = vtkWindowedSincPolyDataFilter()
    smooth.SetInputConnection(edges.GetOutputPort())
    smooth.SetNumberOfIterations(12)
    smooth.SetPassBand(0.08)
    smooth.NormalizeCoordinatesOn()
    normals = vtkPolyDataNormals()
    normals.SetInputConnection(smooth.GetOutputPort())
    normals.SetFeatureAngle(80.0)
    normals.Update()
    return mesh_from_polydata(normals.GetOutput())


def heat_surfaces(codes: np.ndarray, spacing, levels=HEAT_ISO_LEVELS,
                  max_dim: int = HEAT_MAX_DIM) -> list[tuple[float, vtkPolyData]]:
    """Iso-surfaces of a heatmap (uint8 codes in display order, 255 = peak) in display-world mm.

    Returns (level, surface) for each fraction of the peak that has a non-empty surface. The map is
    smoothed first (one voxel of the meshing grid) so the patch blocks of the attention grid give
    rounded shells rather than staircases.
    """
    from scipy.ndimage import gaussian_filter

    s = _stride(codes.shape, max_dim)
    heat = gaussian_filter(codes[::s, ::s, ::s].astype(np.float32), sigma=1.0)     # (I/s, J/s, K/s)
    peak = float(heat.max())
    out: list[tuple[float, vtkPolyData]] = []
    if peak <= 0:
        return out
    grid_spacing = tuple(float(v) * s for v in spacing)
    padded = np.zeros(tuple(n + 2 for n in heat.shape), dtype=np.float32, order="F")
    padded[1:-1, 1:-1, 1:-1] = heat                                          # closed shells at the borders
    image = image_from_array(padded, grid_spacing)
    image.SetOrigin(*(-v for v in grid_spacing))
    for level in levels:
        edges = vtkFlyingEdges3D()
        edges.SetInputData(image)
        edges.SetValue(0, level * peak)
        edges.ComputeNormalsOn()
        edges.Update()
        if edges.GetOutput().GetNumberOfPoints() == 0:
            continue
        poly = vtkPolyData()
        poly.DeepCopy(edges.GetOutput())
        out.append((level, poly))
    return out


class View3D(RenderWidget):
    """Region surfaces (coloured as in the slice views) and an optional CT volume rendering."""

    maximiseToggled = Signal()

    def __init__(self, document: ViewerDocument, parent=None) -> None:
        super().__init__(parent)
        self.document = document
        self.setObjectName("view_3d")
        self.setMinimumSize(160, 160)
        self.renderer = vtkRenderer()
        self.renderer.SetBackground(0.07, 0.08, 0.10)
        self.renderer.SetBackground2(0.22, 0.24, 0.30)
        self.renderer.GradientBackgroundOn()
        self.GetRenderWindow().AddRenderer(self.renderer)
        self.GetRenderWindow().GetInteractor().SetInteractorStyle(vtkInteractorStyleTrackballCamera())
        self._actors: dict[str, vtkActor] = {}
        self._volume_actor: vtkVolume | None = None
        self._heat_actors: list[tuple[float, vtkActor]] = []
        self._heat_codes: np.ndarray | None = None     # the map the shells were built from
        self._heat_table: np.ndarray | None = None     # RGBA (256, 4): the slice views' colour map
        self.volume_preset = "Bone"
        self.show_volume = False
        self.show_surfaces = True
        self._cursor_timer = QTimer(self)
        self._cursor_timer.setSingleShot(True)
        self._cursor_timer.setInterval(150)
        self._cursor_timer.timeout.connect(self.request_render)
        sphere = vtkSphereSource()
        sphere.SetRadius(3.0)
        sphere.SetThetaResolution(16)
        sphere.SetPhiResolution(16)
        m = vtkPolyDataMapper()
        m.SetInputConnection(sphere.GetOutputPort())
        self._cursor_actor = vtkActor()
        self._cursor_actor.SetMapper(m)
        self._cursor_actor.GetProperty().SetColor(1.0, 0.85, 0.2)
        self._cursor_actor.VisibilityOff()
        self.renderer.AddActor(self._cursor_actor)
        # The heat layer's peak: a sphere on a second layer with the same camera, drawn over the heat shells
        # (which enclose it) and the surfaces, so it is never hidden inside them.
        self._peak_renderer = vtkRenderer()
        self._peak_renderer.SetLayer(1)
        self._peak_renderer.InteractiveOff()
        self._peak_renderer.SetActiveCamera(self.renderer.GetActiveCamera())
        self.GetRenderWindow().SetNumberOfLayers(2)
        self.GetRenderWindow().AddRenderer(self._peak_renderer)
        self._peak_sphere = vtkSphereSource()
        self._peak_sphere.SetThetaResolution(20)
        self._peak_sphere.SetPhiResolution(20)
        pm = vtkPolyDataMapper()
        pm.SetInputConnection(self._peak_sphere.GetOutputPort())
        self._peak_actor = vtkActor()
        self._peak_actor.SetMapper(pm)
        self._peak_actor.GetProperty().SetColor(*PEAK_COLOR)
        self._peak_actor.PickableOff()
        self._peak_actor.VisibilityOff()
        self._peak_renderer.AddActor(self._peak_actor)
        corner = vtkCornerAnnotation()
        corner.SetText(2, "3D")
        corner.SetMaximumFontSize(14)
        corner.GetTextProperty().SetColor(0.85, 0.85, 0.85)
        self.renderer.AddViewProp(corner)
        document.studyChanged.connect(self._on_study)
        document.regionStylesChanged.connect(self._on_styles)
        document.cursorChanged.connect(self._on_cursor)

    def _on_study(self) -> None:
        for actor in self._actors.values():
            self.renderer.RemoveActor(actor)
        self._actors.clear()
        self._clear_heat()
        self._peak_actor.VisibilityOff()
        if self._volume_actor is not None:
            self.renderer.RemoveVolume(self._volume_actor)
            self._volume_actor = None
        vol = self.document.volume
        self._cursor_actor.SetVisibility(vol is not None)
        if vol is None:
            self.request_render()
            return
        for region, mesh in self.document.surfaces.items():
            mapper = vtkPolyDataMapper()
            mapper.SetInputData(polydata_from_mesh(mesh))
            mapper.ScalarVisibilityOff()
            actor = vtkActor()
            actor.SetMapper(mapper)
            prop = actor.GetProperty()
            prop.SetSpecular(0.25)
            prop.SetSpecularPower(20)
            self.renderer.AddActor(actor)
            self._actors[region] = actor
        self._on_styles(render=False)
        if self.show_volume:
            self._build_volume()
        self.reset_camera()
        self._on_cursor(self.document.cursor)

    def _build_volume(self) -> None:
        vol = self.document.volume
        s = _stride(vol.shape, VOLUME_MAX_DIM)
        ct = np.asfortranarray(vol.ct[::s, ::s, ::s].astype(np.float32))  # (I/s, J/s, K/s)
        image = image_from_array(ct, tuple(v * s for v in vol.spacing))
        mapper = vtkSmartVolumeMapper()
        # On software OpenGL (llvmpipe, remote desktops) the GPU ray caster takes seconds per frame;
        # VTK's CPU ray caster stays interactive at this resolution.
        caps = self.GetRenderWindow().ReportCapabilities() or ""
        if any(name in caps for name in ("llvmpipe", "softpipe", "SWR", "Software Rasterizer")):
            mapper.SetRequestedRenderModeToRayCast()
        mapper.SetInputData(image)
        self._volume_actor = vtkVolume()
        self._volume_actor.SetMapper(mapper)
        self._volume_actor.SetProperty(vtkVolumeProperty())
        self._apply_volume_preset()
        self.renderer.AddVolume(self._volume_actor)

    def _apply_volume_preset(self) -> None:
        preset = VOLUME_PRESETS[self.volume_preset]
        opacity = vtkPiecewiseFunction()
        for hu, a in preset["opacity"]:
            opacity.AddPoint(hu, a)
        color = vtkColorTransferFunction()
        for hu, r, g, b in preset["color"]:
            color.AddRGBPoint(hu, r, g, b)
        prop = self._volume_actor.GetProperty()
        prop.SetScalarOpacity(opacity)
        prop.SetColor(color)
        prop.ShadeOn()
        prop.SetInterpolationTypeToLinear()
        prop.SetAmbient(0.3)
        prop.SetDiffuse(0.7)

    def set_volume_rendering(self, on: bool, preset: str | None = None) -> None:
        """Show or hide the CT volume rendering; ``preset`` is a key of style.VOLUME_PRESETS."""
        if preset is not None:
            self.volume_preset = preset
        self.show_volume = on
        if self.document.volume is None:
            return
        if on and self._volume_actor is None:
            self._build_volume()
        elif self._volume_actor is not None:
            self._apply_volume_preset()
            self._volume_actor.SetVisibility(on)
        self.request_render()

    # -- attention heatmap -------------------------------------------------------------------
    def set_heatmap(self, codes: np.ndarray | None, table: np.ndarray | None = None, opacity: float = 0.5) -> None:
        """Show a heatmap as nested iso-surfaces (see `heat_surfaces`); the arguments are the slice
        views' (`SliceView.set_heatmap`): uint8 codes in display order, an RGBA (256, 4) colour table,
        an overall opacity. None hides it."""
        vol = self.document.volume
        if codes is not None and (vol is None or tuple(codes.shape) != tuple(vol.shape)):
            raise ValueError(f"heatmap shape {codes.shape} is not the display volume's "
                             f"{None if vol is None else vol.shape}")
        if codes is None:
            for _level, actor in self._heat_actors:
                actor.VisibilityOff()
            self._on_styles()
            return
        if codes is not self._heat_codes:        # a new map: mesh it (the same map is only restyled)
            self._clear_heat()
            for level, poly in heat_surfaces(codes, vol.spacing):
                mapper = vtkPolyDataMapper()
                mapper.SetInputData(poly)
                mapper.ScalarVisibilityOff()
                actor = vtkActor()
                actor.SetMapper(mapper)
                actor.PickableOff()
                actor.GetProperty().SetSpecular(0.2)
                self.renderer.AddActor(actor)
                self._heat_actors.append((level, actor))
            self._heat_codes = codes
        if table is not None:
            self._heat_table = np.asarray(table)
        table = self._heat_table
        for i, (level, actor) in enumerate(self._heat_actors):
            rgba = table[int(round(level * (len(table) - 1)))] if table is not None else (255, 80, 0, 255)
            actor.GetProperty().SetColor(*(float(c) / 255.0 for c in rgba[:3]))
            shell = HEAT_SHELL_OPACITY[min(i, len(HEAT_SHELL_OPACITY) - 1)]
            actor.GetProperty().SetOpacity(float(np.clip(opacity * shell * 1.4, 0.0, 1.0)))
            actor.SetVisibility(opacity > 0)
        self._on_styles()

    def set_peak(self, ijk) -> None:
        """Mark the heat layer's maximum (a display voxel) with a sphere; None removes it."""
        vol = self.document.volume
        if ijk is None or vol is None:
            self._peak_actor.VisibilityOff()
        else:
            sp = np.array(vol.spacing, dtype=np.float64)
            self._peak_sphere.SetRadius(PEAK_GLYPH_FRACTION * float(np.max(np.array(vol.shape) * sp)))
            self._peak_actor.SetPosition(*(np.array(ijk, dtype=np.float64) * sp))
            self._peak_actor.VisibilityOn()
        self.request_render()

    def peak_marker_shown(self) -> bool:
        return bool(self._peak_actor.GetVisibility())

    def heat_shown(self) -> bool:
        """Whether heatmap shells are visible now."""
        return any(actor.GetVisibility() for _level, actor in self._heat_actors)

    def _clear_heat(self) -> None:
        for _level, actor in self._heat_actors:
            self.renderer.RemoveActor(actor)
        self._heat_actors = []
        self._heat_codes = None

    def set_surfaces_visible(self, on: bool) -> None:
        self.show_surfaces = on
        self._on_styles()

    def _on_styles(self, render: bool = True) -> None:
        for region, actor in self._actors.items():
            style = self.document.region_styles[region]
            actor.SetVisibility(self.show_surfaces and style.visible)
            actor.GetProperty().SetColor(*(c / 255.0 for c in style.color))
            # Regions nest (mediastinum around heart): translucent by default so inner ones show; while
            # a heatmap is shown they fade further so the heat inside them stays visible.
            opacity = 0.35 if region in ("lung", "pleura", "mediastinum", "abdomen", "bone", "breast") else 1.0
            actor.GetProperty().SetOpacity(opacity * (REGION_FADE_UNDER_HEAT if self.heat_shown() else 1.0))
        if render:
            self.request_render()

    def _on_cursor(self, ijk) -> None:
        vol = self.document.volume
        if vol is None:
            return
        self._cursor_actor.SetPosition(*(np.array(ijk, dtype=float) * np.array(vol.spacing)))
        # A 3D frame costs several slice frames on software OpenGL: while the user scrolls, move the
        # marker once scrolling pauses instead of on every step.
        self._cursor_timer.start()

    def reset_camera(self) -> None:
        """Anterior view, head up, patient's left on the screen's right (as the coronal view)."""
        vol = self.document.volume
        if vol is None:
            return
        size = np.array(vol.shape) * np.array(vol.spacing)
        centre = size / 2.0
        cam = self.renderer.GetActiveCamera()
        cam.SetFocalPoint(*centre)
        cam.SetPosition(*(centre + np.array([0.0, 1.0, 0.0]) * float(np.linalg.norm(size)) * 2.0))
        cam.SetViewUp(0.0, 0.0, 1.0)
        self.renderer.ResetCamera()
        cam.Zoom(1.3)
        self.request_render()

    def mouseDoubleClickEvent(self, ev) -> None:  # noqa: N802
        self.maximiseToggled.emit()
        ev.accept()

    def keyPressEvent(self, ev) -> None:  # noqa: N802
        if ev.text() == "r":
            self.reset_camera()
            ev.accept()
            return
        super().keyPressEvent(ev)
