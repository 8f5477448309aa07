"""Viewer speed under Xvfb: open a 512x512x300 study with 10 masks, then scroll the axial view.

Prints the time to open (read from NIfTI + reorient + surfaces) and show the first frame, and the
median time of one slice step while scrolling the axial view (the cursor moves, Qt processes the
renders it asked for), against a naive baseline measured in the same run and window: every linked
view re-rendered on every step, 4x multisampling, and a vtkCornerAnnotation for the slice number.

    .venv/bin/python bench/viewer.py [--shape 512x512x300] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "app"))
import conftest  # noqa: E402, F401  (starts Xvfb when DISPLAY is unset)


def make_big_study(shape):
    """A chest-like synthetic CT with masks for all 10 regions (nested ellipsoids)."""
    from reg2rg.engine.regions import REGIONS
    from reg2rg.engine.study import Study

    X, Y, Z = shape
    x = np.linspace(-1, 1, X, dtype=np.float32)[:, None, None]
    y = np.linspace(-1, 1, Y, dtype=np.float32)[None, :, None]
    z = np.linspace(-1, 1, Z, dtype=np.float32)[None, None, :]
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1                                  # (X, Y, 1)
    vox = np.where(body, np.int16(40), np.int16(-1000)).repeat(Z, axis=2).astype(np.int16)
    rng = np.random.default_rng(0)
    vox += rng.integers(-20, 20, size=(1, 1, Z), dtype=np.int16)
    masks = {}
    for i, region in enumerate(REGIONS):
        cx, cy = np.cos(i * 0.63) * 0.4, np.sin(i * 0.63) * 0.3
        m = ((x - cx) / 0.25) ** 2 + ((y - cy) / 0.2) ** 2 + (z / 0.8) ** 2 < 1
        masks[region] = m
        vox[m] = -850 if region == "lung" else (700 if region == "bone" else 45)
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])
    return Study(voxels=vox, affine=affine, masks=masks, name="bench", source="bench://512")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="512x512x300")
    ap.add_argument("--steps", type=int, default=60)
    args = ap.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass

    from PySide6.QtWidgets import QApplication
    from vtkmodules.vtkRenderingAnnotation import vtkCornerAnnotation

    from reg2rg.app.loader import LoadRequest, load_study
    from reg2rg.app.main_window import MainWindow
    from reg2rg.engine.studyio import write_study

    app = QApplication.instance() or QApplication([])
    with tempfile.TemporaryDirectory() as tmp:
        study = make_big_study(shape)
        write_study(study, Path(tmp) / "ct.nii.gz", Path(tmp) / "masks")
        del study
        win = MainWindow()
        win.resize(1500, 950)
        win.show()
        app.processEvents()
        t0 = time.perf_counter()
        loaded = load_study(LoadRequest(volume=str(Path(tmp) / "ct.nii.gz"), masks=str(Path(tmp) / "masks")))
        t_read = time.perf_counter() - t0
        win._on_loaded(loaded)
        app.processEvents()
        win.render_all()
        t_open = time.perf_counter() - t0

    axial = win.views[2]
    doc = win.document
    views = list(win.views.values())

    def step_time(n_steps: int) -> float:
        """Median time of one slice step as the user scrolls: the cursor moves, events are processed."""
        times = []
        k0 = doc.cursor[2]
        for i in range(n_steps):
            t = time.perf_counter()
            doc.set_cursor((doc.cursor[0], doc.cursor[1], k0 + (i % 40) - 20))
            app.processEvents()        # the renders this step asked for
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    ours = step_time(args.steps)
    frames = axial.render_count
    alone = []
    for i in range(args.steps):
        t = time.perf_counter()
        axial._compose(doc.cursor[2] - 1 - i % 2)
        axial.render_now()
        alone.append(time.perf_counter() - t)
    ours_axial_only = statistics.median(alone)

    # Naive, in the same window: every linked view re-rendered on every step, 4x multisampling, and a
    # vtkCornerAnnotation (font fitted to the viewport each render) showing the slice number.
    corners = []
    for v in views:
        v.lazy_links = False
        v.GetRenderWindow().SetMultiSamples(4)
        c = vtkCornerAnnotation()
        c.SetMinimumFontSize(12)
        c.SetMaximumFontSize(15)
        v.renderer.AddViewProp(c)
        corners.append(c)
    doc.cursorChanged.connect(lambda ijk: [c.SetText(0, f"Slice {ijk[2] + 1}") for c in corners])
    naive = step_time(args.steps)
    print(f"study {shape}, 10 masks: read+prepare {t_read:.2f} s, open to first frame {t_open:.2f} s")
    print(f"slice step as scrolled (ours: scrolled view only, linked views after the pause): "
          f"median {ours * 1000:.1f} ms = {1 / ours:.0f} fps")
    print(f"  compose + render of the axial view alone: median {ours_axial_only * 1000:.1f} ms")
    print(f"naive (every view every step, multisampling, corner annotation): "
          f"median {naive * 1000:.1f} ms = {1 / naive:.0f} fps")
    print(f"ratio naive/ours: {naive / ours:.2f}x  (axial frames rendered while scrolling: {frames})")
    win.close()


if __name__ == "__main__":
    main()
