"""`reg2rg-viewer`: open a study (or the demo), optionally draft a report, optionally save a screenshot."""

from __future__ import annotations

import argparse
import logging
import os
import sys

USAGE_EXAMPLES = """examples:
  reg2rg-viewer --demo --generate
  reg2rg-viewer --server http://127.0.0.1:8765 --demo --generate
  reg2rg-viewer ct.nii.gz --masks seg_ct/
  reg2rg-viewer dicom_folder/ --screenshot view.png
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reg2rg-viewer", description="Reg2RG Viewer: region-guided chest CT report drafting.",
                                epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("volume", nargs="?", help="CT volume: a NIfTI file or a DICOM series folder")
    p.add_argument("--masks", help="region masks: a folder of <region>.nii.gz, a label map or TotalSegmentator output")
    p.add_argument("--model", help="model folder (default: the embedded demo model)")
    p.add_argument("--published", metavar="FILE", help="the published Reg2RG checkpoint (needs --llm)")
    p.add_argument("--llm", metavar="DIR", help="with --published: the local LLaMA-2-7B-chat folder")
    p.add_argument("--non-strict", action="store_true",
                   help="with --published: load a checkpoint whose keys do not match the model (missing weights "
                        "stay random; for inspection only)")
    p.add_argument("--server", metavar="URL", help="draft on a reg2rg-serve at URL instead of in this app")
    p.add_argument("--token-file", metavar="F", help="with --server: the token file (default: $REG2RG_SERVER_TOKEN, "
                                                     "else the file a local reg2rg-serve writes)")
    p.add_argument("--demo", action="store_true", help="open the embedded demo study")
    p.add_argument("--generate", action="store_true", help="draft a report as soon as the study is open")
    p.add_argument("--screenshot", metavar="PNG", help="save a picture of the window once ready, then exit")
    p.add_argument("--size", default="1500x950", help="window size WxH (default 1500x950)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    if args.masks and not args.volume:
        print("reg2rg-viewer: --masks needs a VOLUME", file=sys.stderr)
        return 2
    if args.server and (args.model or args.published):
        print("reg2rg-viewer: --server drafts with the server's model; leave out --model/--published", file=sys.stderr)
        return 2
    if args.token_file and not args.server:
        print("reg2rg-viewer: --token-file goes with --server", file=sys.stderr)
        return 2
    if args.non_strict and not args.published:
        print("reg2rg-viewer: --non-strict applies to --published only", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.screenshot and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from .loader import LoadRequest
    from .main_window import MainWindow, install_excepthook

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("Reg2RG Viewer")
    window = MainWindow()
    try:
        w, h = (int(v) for v in args.size.lower().split("x"))
        window.resize(w, h)
    except ValueError:
        print(f"reg2rg-viewer: --size must look like 1500x950, got {args.size!r}", file=sys.stderr)
        return 2
    install_excepthook(window)
    if bool(args.published) != bool(args.llm):
        print("reg2rg-viewer: --published and --llm go together (the checkpoint and its LLaMA folder)",
              file=sys.stderr)
        return 2
    if args.published:
        from .generation import ModelChoice

        window.session.set_model(ModelChoice(kind="published", checkpoint=args.published, llm_path=args.llm,
                                             strict=not args.non_strict))
    elif args.server:
        from .generation import ModelChoice

        window.session.set_model(ModelChoice(kind="server", url=args.server, token_file=args.token_file))
    elif args.model:
        window.session.set_model_dir(args.model)
    window.show()

    status = {"code": 0}
    if args.screenshot:
        def finish() -> None:
            window.session.wait_for_background()     # e.g. the findings check that follows a draft
            draft = window.session.draft
            if draft is not None:   # what a remote check can read without opening the picture
                regions = ", ".join(s.region for s in draft.sections if s.region and s.text.strip())
                words = sum(len(s.text.split()) for s in draft.sections)
                print(f"draft: {len(draft.sections)} section(s), {words} words; regions: {regions or 'none'}")
            window.save_screenshot(args.screenshot)
            print(f"screenshot saved to {args.screenshot}")
            app.exit(status["code"])

        def fail(message: str) -> None:
            print(f"reg2rg-viewer: {message}", file=sys.stderr)
            status["code"] = 1
            app.exit(1)

        def draft_error(message: str) -> None:
            print(f"reg2rg-viewer: {message}", file=sys.stderr)
            status["code"] = 1

        window.session.errorOccurred.connect(draft_error)

        def after_load() -> None:
            if args.generate and window.session.can_generate():
                window.session.generationFinished.connect(lambda: QTimer.singleShot(200, finish))
                window.session.generate()
            else:
                QTimer.singleShot(300, finish)

        window.studyLoaded.connect(after_load)
        window.loadFailed.connect(fail)
        if not (args.volume or args.demo):
            QTimer.singleShot(300, finish)
        QTimer.singleShot(10 * 60 * 1000, lambda: fail("timed out waiting for the study"))
    elif args.generate:
        window.studyLoaded.connect(lambda: window.session.can_generate() and window.session.generate())

    if args.volume:
        window.open_request(LoadRequest(volume=args.volume, masks=args.masks))
    elif args.demo:
        window.open_request(LoadRequest(demo=True))
    return app.exec()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
